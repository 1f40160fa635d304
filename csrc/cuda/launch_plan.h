// The CUDA backend's launch planning, as plain host C++: which regime serves a shape and with
// what geometry, and the launches and global-memory traffic that plan costs. Host code only, so
// that the CUDA launcher, the CPU emulator of the kernels (tests/emulation), and the Python
// module (ash_ext._C.cuda_launch_plan, which the resource tests enumerate and
// `python -m ash_ext plan` prints) all run this one planner, with or without a CUDA toolkit.
//
// Four regimes (the kernels are in ash_kernels.cuh and cluster_kernel.cuh):
//  1. on chip: a sample that fits in one block's shared memory next to the histogram goes to
//     one block, which reads it from global memory once, runs every pass on the copy and writes
//     the output once. Sized from the device's opt-in limit (227 KiB on an H100/H200, 163 KiB on
//     an A100), not the 48 KiB default;
//  4. cluster (sm_90 and later): a sample too long for one block -- or one of a batch too small
//     to spread over the GPU one block a sample -- goes to a thread-block cluster whose blocks
//     each stage a slice of it; histograms and sums are combined through distributed shared
//     memory, so the sample is read once and written once, in one launch;
//  2. one block per longer sample, every pass reading the sample from global memory (L2), when
//     there are enough samples (batch >= 2 x SMs) to fill the GPU;
//  3. a chunked pipeline for long samples that are too few to fill the GPU.
// ASH_EXT_CUDA_REGIME=cluster|sample-per-block|chunked forces a regime (a diagnostic switch, so
// that the device check can time every regime on the same inputs); auto, the default, plans as
// above.
#pragma once

#include <c10/util/Exception.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "ash_semantics.h"

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

// Clusters: up to 8 blocks portably, up to 16 where the kernel allows non-portable sizes (the
// launcher sets that attribute for larger clusters). A cluster grows past 8 blocks only when the
// sample needs the shared memory; slices are at least kMinClusterSliceBytes unless the sample
// needs more blocks, since every block pays for the cluster barriers and remote reads.
constexpr int64_t kMaxPortableClusterBlocks = 8;
constexpr int64_t kMaxClusterBlocks = 16;
constexpr int64_t kMinClusterSliceBytes = 16 * 1024;

struct DeviceLimits {
  int64_t sm_count;
  int64_t shared_bytes_per_block;  // the opt-in maximum of dynamic + static shared memory
  int64_t max_cluster_blocks = 0;  // 0: no thread-block clusters (before sm_90)
};

// The dynamic shared-memory limit the launcher gives every kernel that uses dynamic shared
// memory, once per kernel and device: the most any plan uses. One value per device, never
// lowered, so concurrent launches from several host threads cannot undercut each other.
inline size_t max_dynamic_shared_bytes(const DeviceLimits& limits) {
  const int64_t usable = limits.shared_bytes_per_block - static_cast<int64_t>(kStaticSharedAllowance);
  return usable > 0 ? static_cast<size_t>(usable) : 0;
}

enum class Regime { kOnChip = 0, kBlockPerSample = 1, kChunked = 2, kCluster = 3 };

// What the caller asks for: the planner's choice, or one regime (ASH_EXT_CUDA_REGIME).
// kSamplePerBlock is one block per sample: on chip where the sample fits, else from global memory.
enum class RegimeRequest { kAuto = 0, kCluster = 1, kSamplePerBlock = 2, kChunked = 3 };

struct LaunchPlan {
  Regime regime;
  int threads;          // per block
  size_t shared_bytes;  // dynamic shared memory per block
  int64_t chunk_len;    // kChunked: elements per chunk (the last chunk may be shorter);
                        // kCluster: elements per block of a cluster (the last slice may be shorter)
  int64_t chunks;       // kChunked: chunks per sample; kCluster: blocks per cluster (a sample each)
};

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The bytes of shared memory that stage a sample of n elements (16-byte packs).
inline size_t staged_sample_bytes(int64_t n, int64_t element_bytes) {
  return static_cast<size_t>(ceil_div(n * element_bytes, 16) * 16);
}

inline int block_threads_for(int64_t elements) {
  return elements <= 1024 ? 128 : (elements <= 4096 ? 256 : kMaxBlockThreads);
}

// The regime's name, as plans, the plan command and ASH_EXT_CUDA_REGIME spell it.
inline const char* regime_name(Regime regime) {
  switch (regime) {
    case Regime::kOnChip:
      return "on-chip";
    case Regime::kBlockPerSample:
      return "block-per-sample";
    case Regime::kChunked:
      return "chunked";
    case Regime::kCluster:
      return "cluster";
  }
  return "?";
}

inline RegimeRequest parse_regime_request(const char* name) {
  if (name == nullptr || name[0] == '\0' || std::strcmp(name, "auto") == 0) {
    return RegimeRequest::kAuto;
  }
  if (std::strcmp(name, "cluster") == 0) {
    return RegimeRequest::kCluster;
  }
  if (std::strcmp(name, "sample-per-block") == 0) {
    return RegimeRequest::kSamplePerBlock;
  }
  if (std::strcmp(name, "chunked") == 0) {
    return RegimeRequest::kChunked;
  }
  TORCH_CHECK_VALUE(false, "ASH_EXT_CUDA_REGIME=", name, ": expected auto, cluster, sample-per-block or chunked");
}

// ASH_EXT_CUDA_REGIME, read at every launch sequence, so that a process can time the regimes side
// by side by changing it between calls.
inline RegimeRequest regime_request_from_env() {
  return parse_regime_request(std::getenv("ASH_EXT_CUDA_REGIME"));
}

// Elements per block when a sample of n is cut into `blocks` slices of whole 16-byte packs.
inline int64_t cluster_slice_elements(int64_t n, int64_t element_bytes, int64_t blocks) {
  const int64_t pack = element_bytes >= 16 ? 1 : 16 / element_bytes;
  return ceil_div(ceil_div(n, blocks), pack) * pack;
}

// The cluster of `blocks` blocks for samples of n elements, if each block's slice fits its
// shared memory, no block is left without elements and the grid stays within one launch.
inline bool cluster_geometry(int64_t batch, int64_t n, int64_t element_bytes, const DeviceLimits& limits,
                             int64_t blocks, LaunchPlan* plan) {
  const int64_t slice = cluster_slice_elements(n, element_bytes, blocks);
  if (ceil_div(n, slice) != blocks || slice > int64_t(INT_MAX) || batch > int64_t(INT_MAX) / blocks) {
    return false;
  }
  const size_t bytes = kHistogramBytes + staged_sample_bytes(slice, element_bytes);
  if (bytes > max_dynamic_shared_bytes(limits)) {
    return false;
  }
  *plan = LaunchPlan{Regime::kCluster, block_threads_for(slice), bytes, slice, blocks};
  return true;
}

// The cluster size for the shape: the smallest that holds the sample, grown (up to 8 blocks, or
// to the size the sample needs) while that lowers the bytes the busiest multiprocessor stages --
// blocks per multiprocessor, rounded up, times a block's slice -- so that small batches spread
// over the GPU and large ones keep few blocks per sample. A cluster of one block is the on-chip
// regime. False where no cluster holds the sample (or the device has no clusters).
inline bool plan_cluster(int64_t batch, int64_t n, int64_t element_bytes, const DeviceLimits& limits,
                         LaunchPlan* plan) {
  const int64_t largest = limits.max_cluster_blocks < kMaxClusterBlocks ? limits.max_cluster_blocks
                                                                        : kMaxClusterBlocks;
  int64_t fit = 1;
  while (fit <= largest && !cluster_geometry(batch, n, element_bytes, limits, fit, plan)) {
    ++fit;
  }
  if (fit > largest) {
    return false;
  }
  auto busiest_bytes = [&](const LaunchPlan& p) {
    return ceil_div(batch * p.chunks, limits.sm_count) * static_cast<int64_t>(staged_sample_bytes(p.chunk_len, element_bytes));
  };
  const int64_t spread_limit = fit > kMaxPortableClusterBlocks ? fit
                               : (largest < kMaxPortableClusterBlocks ? largest : kMaxPortableClusterBlocks);
  LaunchPlan best = *plan;
  for (int64_t blocks = fit + 1; blocks <= spread_limit; ++blocks) {
    LaunchPlan candidate{};
    if (cluster_geometry(batch, n, element_bytes, limits, blocks, &candidate) &&
        static_cast<int64_t>(staged_sample_bytes(candidate.chunk_len, element_bytes)) >= kMinClusterSliceBytes &&
        busiest_bytes(candidate) < busiest_bytes(best)) {
      best = candidate;
    }
  }
  *plan = best;
  return true;
}

inline LaunchPlan chunked_plan(int64_t batch, int64_t n, const DeviceLimits& limits) {
  const int64_t chunks_wanted = ceil_div(kChunkBlocksPerSm * limits.sm_count, batch);
  int64_t chunk_len = ceil_div(ceil_div(n, chunks_wanted), kChunkTile) * kChunkTile;
  chunk_len = chunk_len < kMaxChunkElements ? chunk_len : kMaxChunkElements;
  const int64_t chunks = ceil_div(n, chunk_len);
  TORCH_CHECK(batch * chunks <= INT_MAX, "ash_ext: ", batch, " samples of ", n,
              " elements need more thread blocks than one launch allows");
  return LaunchPlan{Regime::kChunked, kChunkThreads, 0, chunk_len, chunks};
}

// The regime and launch geometry for `batch` samples of n elements, from the shape and the
// device alone (and the request, ASH_EXT_CUDA_REGIME).
inline LaunchPlan plan_launch(int64_t batch, int64_t n, int64_t element_bytes, const DeviceLimits& limits,
                              RegimeRequest request = RegimeRequest::kAuto) {
  TORCH_CHECK(batch >= 1 && n >= 1 && element_bytes >= 1, "ash_ext: no launch plan for ", batch, " samples of ", n,
              " elements of ", element_bytes, " bytes");
  const size_t on_chip_bytes = kHistogramBytes + staged_sample_bytes(n, element_bytes);
  const bool fits_on_chip = n <= int64_t(INT_MAX) && on_chip_bytes <= max_dynamic_shared_bytes(limits);
  const LaunchPlan on_chip{Regime::kOnChip, block_threads_for(n), on_chip_bytes, 0, 0};
  // One block per sample counts in 32-bit shared counters, hence the bound on n.
  const LaunchPlan block_per_sample{Regime::kBlockPerSample, kMaxBlockThreads, kHistogramBytes, 0, 0};
  LaunchPlan cluster{};
  switch (request) {
    case RegimeRequest::kCluster:
      TORCH_CHECK_VALUE(limits.max_cluster_blocks >= 1, "ASH_EXT_CUDA_REGIME=cluster: this GPU has no thread-block ",
                        "clusters (they need sm_90 or later)");
      TORCH_CHECK_VALUE(plan_cluster(batch, n, element_bytes, limits, &cluster), "ASH_EXT_CUDA_REGIME=cluster: a ",
                        "sample of ", n, " elements of ", element_bytes, " bytes does not fit the shared memory of a ",
                        "cluster of ", limits.max_cluster_blocks, " blocks");
      return cluster;
    case RegimeRequest::kSamplePerBlock:
      if (fits_on_chip) {
        return on_chip;
      }
      TORCH_CHECK_VALUE(n <= int64_t(UINT32_MAX), "ASH_EXT_CUDA_REGIME=sample-per-block: samples of ", n,
                        " elements are too long for one block's 32-bit counters");
      return block_per_sample;
    case RegimeRequest::kChunked:
      return chunked_plan(batch, n, limits);
    case RegimeRequest::kAuto:
      break;
  }
  if (plan_cluster(batch, n, element_bytes, limits, &cluster)) {
    return cluster.chunks == 1 ? on_chip : cluster;
  }
  if (fits_on_chip) {
    return on_chip;
  }
  if (batch >= kSamplesPerSmForBlockPerSample * limits.sm_count && n <= int64_t(UINT32_MAX)) {
    return block_per_sample;
  }
  return chunked_plan(batch, n, limits);
}

// ---------------------------------------------------------------------------------------------
// What a plan costs: launches, and the bytes of tensor data (x, the gradient, the output, and
// the clamped copy regimes 2 and 3 make) read from and written to global memory. Besides these,
// every regime moves O(batch) bytes (per-sample ks, topk_stats' results, the chunked pipeline's
// selection state and partial sums), which the plan bounds separately (small_bytes).

// The op a launch sequence runs, as far as its traffic depends on it.
struct PlannedWork {
  Variant variant;
  bool backward;
  bool clamped;       // forward only
  bool per_sample_k;  // ks read from device memory (a NaN fill for ks outside [0, n])
  bool stats;         // topk_stats: sums only, no output
};

// The samples, as far as traffic depends on them: how many select (0 < k <= n), how many of those
// must break ties at the threshold (fewer ties kept than there are), how many keep nothing
// (k == 0) and how many have a k outside [0, n] (NaN).
struct SampleCounts {
  int64_t selecting;
  int64_t tied;
  int64_t empty;
  int64_t invalid;
};

struct PlannedTraffic {
  int64_t launches;
  int64_t bytes_read;
  int64_t bytes_written;
  int64_t small_bytes;  // an upper bound on the O(batch) bytes besides the tensor data
};

// A sums pass runs for every variant but ASH-P (forward: s1 and s2; backward: the gradient sums).
constexpr bool needs_sums_pass(Variant variant) {
  return variant != Variant::Prune;
}

// The radix passes of the value phase and (where ties must be broken) the tie phase.
inline int value_digit_passes(int64_t element_bytes) {
  return static_cast<int>((8 * element_bytes + kDigitBits - 1) / kDigitBits);
}
inline int tie_digit_passes(int64_t n) {
  int bits = 0;
  for (uint64_t rest = static_cast<uint64_t>(n - 1); rest != 0; rest >>= 1) {
    ++bits;
  }
  return (bits + kDigitBits - 1) / kDigitBits;
}

inline PlannedTraffic planned_traffic(const LaunchPlan& plan, int64_t n, int64_t element_bytes, const PlannedWork& work,
                                      const SampleCounts& samples) {
  const int64_t batch = samples.selecting + samples.empty + samples.invalid;
  const int64_t sample_bytes = n * element_bytes;
  const int64_t valid = samples.selecting + samples.empty;
  const bool sums = needs_sums_pass(work.variant) || work.stats;
  const bool output = !work.stats;
  // Elements read per element of an input, per pass that reads x (and, backward, the gradient).
  const int64_t inputs = work.backward ? 2 : 1;
  PlannedTraffic t{0, 0, 0, 0};
  t.small_bytes = batch * (work.per_sample_k ? 8 : 0) + batch * (work.stats ? 3 * 8 : 0);
  if (plan.regime == Regime::kOnChip || plan.regime == Regime::kCluster) {
    // x once into shared memory; the gradient (backward) once per pass that needs it.
    t.launches = 1;
    t.bytes_read = valid * sample_bytes * (1 + (work.backward ? (sums ? 2 : 1) : 0));
    t.bytes_written = output ? batch * sample_bytes : 0;  // (a cluster's histograms and sums stay on chip)
    return t;
  }
  const int64_t clamp_bytes = work.clamped ? batch * sample_bytes : 0;
  t.bytes_read = clamp_bytes;
  t.bytes_written = clamp_bytes;
  t.launches = work.clamped ? 1 : 0;
  const int64_t selection_reads =
      (samples.selecting * value_digit_passes(element_bytes) + samples.tied * tie_digit_passes(n)) * sample_bytes;
  t.bytes_read += selection_reads;
  if (plan.regime == Regime::kBlockPerSample) {
    t.launches += 1;
    t.bytes_read += sums ? valid * inputs * sample_bytes : 0;
    t.bytes_read += output ? valid * inputs * sample_bytes : 0;
    t.bytes_written += output ? batch * sample_bytes : 0;
    return t;
  }
  // Chunked: the zeroed selection state (a fill), a kernel per radix pass of both phases, the
  // sums, the output, the NaN fill for per-sample ks. The output kernel shapes every sample.
  const int64_t digit_kernels = value_digit_passes(element_bytes) + tie_digit_passes(n);
  t.launches += 1 + digit_kernels + (sums ? 1 : 0) + (output ? 1 : 0) + (output && work.per_sample_k ? 1 : 0);
  t.bytes_read += sums ? valid * inputs * sample_bytes : 0;
  t.bytes_read += output ? batch * inputs * sample_bytes : 0;
  t.bytes_written += output ? batch * sample_bytes : 0;
  t.bytes_written += output && work.per_sample_k ? samples.invalid * sample_bytes : 0;
  // The state (a histogram of 64-bit counters and a few words per sample): zeroed once; per digit
  // kernel, each chunk's block adds at most min(bins, chunk) counts with 8-byte atomics, and the
  // last block reads the counters and zeroes them; the partial sums, written and read per chunk.
  const int64_t bins = int64_t(kNumBins);
  const int64_t state_bytes = bins * 8 + 64;
  const int64_t counts_per_chunk = plan.chunk_len < bins ? plan.chunk_len : bins;
  const int64_t per_digit_kernel = plan.chunks * counts_per_chunk * 8 + 2 * state_bytes;
  t.small_bytes += batch * (state_bytes + digit_kernels * per_digit_kernel + plan.chunks * 2 * 3 * 8);
  return t;
}

}  // namespace cuda_detail
}  // namespace ash_ext
