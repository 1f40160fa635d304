// The CUDA backend's launch planning, as plain host C++: which regime serves a shape and with
// what geometry. Host code only, so that the CUDA launcher, the CPU emulator of the kernels
// (tests/emulation) and the Python module (ash_ext._C.cuda_launch_plan, which the resource tests
// enumerate) all run this one planner, with or without a CUDA toolkit.
//
// Three regimes (the kernels are in ash_kernels.cuh):
//  1. on chip: a sample that fits in one block's shared memory next to the histogram goes to
//     one block, which reads it from global memory once, runs every pass on the copy and writes
//     the output once. Sized from the device's opt-in limit (227 KiB on an H100/H200, 163 KiB on
//     an A100), not the 48 KiB default;
//  2. one block per longer sample, every pass reading the sample from global memory (L2), when
//     there are enough samples (batch >= 2 x SMs) to fill the GPU;
//  3. a chunked pipeline for long samples that are too few to fill the GPU.
#pragma once

#include <c10/util/Exception.h>

#include <climits>
#include <cstddef>
#include <cstdint>

namespace ash_ext {
namespace cuda_detail {

// 11-bit radix digits: three passes for 32-bit keys, two for 16-bit keys, six for 64-bit keys,
// and 2048 counters (8 KiB) for a block's histogram.
constexpr int kDigitBits = 11;
constexpr int kNumBins = 1 << kDigitBits;
constexpr size_t kHistogramBytes = kNumBins * sizeof(unsigned);

// The most static shared memory any kernel declares (reduction and scan scratch, a few hundred
// bytes). The planner keeps dynamic + this within the device's opt-in limit, the launcher raises
// each kernel's dynamic limit to the opt-in limit minus this, and the resource tests check every
// compiled kernel's static shared memory against it (tests/test_cuda_resources.py).
constexpr size_t kStaticSharedAllowance = 2048;
// The dynamic shared memory a kernel may use without cudaFuncSetAttribute is 48 KiB minus its
// static shared memory; the emulator enforces that rule.
constexpr size_t kDefaultSharedLimit = 48 * 1024;

constexpr int kMaxBlockThreads = 512;
// Regime 1's forward kernels keep two blocks of kMaxBlockThreads resident per multiprocessor (64
// registers a thread) where shared memory allows; its backward kernels and regime 2 one block,
// whose 128 registers a thread hold the loads in flight that hide the latency of the global
// memory regime 2 reads in every pass, without spills.
constexpr int kMinBlocksPerSmOnChip = 2;
// Regime 2 needs at least this many samples per multiprocessor.
constexpr int64_t kSamplesPerSmForBlockPerSample = 2;
// Regime 3: blocks of kChunkThreads threads, about kChunkBlocksPerSm blocks per multiprocessor in
// all, chunks a multiple of kChunkTile elements (a multiple of every pack size) and at most
// kMaxChunkElements, so that a block's shared-memory counts fit 32 bits.
constexpr int kChunkThreads = 512;
constexpr int64_t kChunkBlocksPerSm = 4;
// The chunked kernels' __launch_bounds__: two blocks resident per multiprocessor, 64 registers a
// thread (what ptxas picks for them anyway), with loads in flight sized to fit without spills;
// one block (128 registers) for the backward sums and output, which hold more per-sample terms,
// and for the output of 16-bit types, whose packs hold twice the elements to shape.
constexpr int kChunkBlocksResidentPerSm = 2;
constexpr int64_t kChunkTile = kChunkThreads * 8;
constexpr int64_t kMaxChunkElements = int64_t(1) << 30;

struct DeviceLimits {
  int64_t sm_count;
  int64_t shared_bytes_per_block;  // the opt-in maximum of dynamic + static shared memory
};

// The dynamic shared-memory limit the launcher gives every kernel that uses dynamic shared
// memory, once per kernel and device: the most any plan uses. One value per device, never
// lowered, so concurrent launches from several host threads cannot undercut each other.
inline size_t max_dynamic_shared_bytes(const DeviceLimits& limits) {
  const int64_t usable = limits.shared_bytes_per_block - static_cast<int64_t>(kStaticSharedAllowance);
  return usable > 0 ? static_cast<size_t>(usable) : 0;
}

enum class Regime { kOnChip = 0, kBlockPerSample = 1, kChunked = 2 };

struct LaunchPlan {
  Regime regime;
  int threads;          // per block
  size_t shared_bytes;  // dynamic shared memory per block
  int64_t chunk_len;    // kChunked: elements per chunk (the last chunk may be shorter)
  int64_t chunks;       // kChunked: chunks per sample
};

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The bytes of shared memory that stage a sample of n elements (16-byte packs).
inline size_t staged_sample_bytes(int64_t n, int64_t element_bytes) {
  return static_cast<size_t>(ceil_div(n * element_bytes, 16) * 16);
}

// The regime and launch geometry for `batch` samples of n elements, from the shape alone.
inline LaunchPlan plan_launch(int64_t batch, int64_t n, int64_t element_bytes, const DeviceLimits& limits) {
  TORCH_CHECK(batch >= 1 && n >= 1 && element_bytes >= 1, "ash_ext: no launch plan for ", batch, " samples of ", n,
              " elements of ", element_bytes, " bytes");
  const size_t on_chip_bytes = kHistogramBytes + staged_sample_bytes(n, element_bytes);
  if (n <= int64_t(INT_MAX) && on_chip_bytes <= max_dynamic_shared_bytes(limits)) {
    const int threads = n <= 1024 ? 128 : (n <= 4096 ? 256 : kMaxBlockThreads);
    return LaunchPlan{Regime::kOnChip, threads, on_chip_bytes, 0, 0};
  }
  // One block per sample counts in 32-bit shared counters, hence the bound on n.
  if (batch >= kSamplesPerSmForBlockPerSample * limits.sm_count && n <= int64_t(UINT32_MAX)) {
    return LaunchPlan{Regime::kBlockPerSample, kMaxBlockThreads, kHistogramBytes, 0, 0};
  }
  const int64_t chunks_wanted = ceil_div(kChunkBlocksPerSm * limits.sm_count, batch);
  int64_t chunk_len = ceil_div(ceil_div(n, chunks_wanted), kChunkTile) * kChunkTile;
  chunk_len = chunk_len < kMaxChunkElements ? chunk_len : kMaxChunkElements;
  const int64_t chunks = ceil_div(n, chunk_len);
  TORCH_CHECK(batch * chunks <= INT_MAX, "ash_ext: ", batch, " samples of ", n,
              " elements need more thread blocks than one launch allows");
  return LaunchPlan{Regime::kChunked, kChunkThreads, 0, chunk_len, chunks};
}

}  // namespace cuda_detail
}  // namespace ash_ext
