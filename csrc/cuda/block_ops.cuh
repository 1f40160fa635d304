// Block-level building blocks of the ASH CUDA kernels: reproducible block reductions and scans,
// and element iteration with a fixed element-to-thread assignment.
//
// Determinism: every floating-point sum in this extension is formed in an order fixed by the
// shape alone. A thread visits its elements in a fixed order (see for_each_element), a warp adds
// its threads' partials with a fixed shuffle tree, and a block adds its warps' partials in warp
// order. No float atomics are used anywhere.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace ash_ext {
namespace cuda_detail {

// A block's static shared variable: ASH_SHARED(name, type) declares `type name` in shared memory
// (arrays too: ASH_SHARED(hist, unsigned[2048])). Under the emulator (tests/emulation) it is a
// reference into the emulated block's own static shared memory, filled with a poison pattern
// when the block starts, so that a read before the first write is caught and blocks that run
// interleaved do not share it.
template <typename T>
using shared_type = T;
#ifdef ASH_EXT_CUDA_EMULATION
#define ASH_SHARED(name, ...)                                                                                 \
  ::ash_ext::cuda_detail::shared_type<__VA_ARGS__>& name =                                                    \
      ::emu::static_shared<::ash_ext::cuda_detail::shared_type<__VA_ARGS__>>([] {                             \
        static const char site = 0;                                                                           \
        return static_cast<const void*>(&site);                                                               \
      }())
#else
#define ASH_SHARED(name, ...) __shared__ ::ash_ext::cuda_detail::shared_type<__VA_ARGS__> name
#endif

constexpr int kWarpSize = 32;
constexpr int kMaxWarpsPerBlock = 32;  // blocks have at most 1024 threads
constexpr unsigned kFullWarpMask = 0xffffffffu;

// Sum over the block, returned to every thread, bitwise reproducible. Every thread of the block
// must call it, and the block size must be a multiple of 32. `warp_totals` is shared scratch of
// kMaxWarpsPerBlock values; the call starts with a barrier, so consecutive calls may reuse it.
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* warp_totals) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(kFullWarpMask, value, offset);  // lane 0 ends with the warp's sum
  }
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  __syncthreads();  // an earlier call may still be reading warp_totals
  if (lane == 0) {
    warp_totals[warp] = value;
  }
  __syncthreads();
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  T total = warp_totals[0];
  for (int w = 1; w < warps; ++w) {
    total += warp_totals[w];
  }
  return total;
}

// Exclusive prefix sum of one count per thread, in thread order. Same calling rules as block_sum.
__device__ __forceinline__ unsigned long long block_exclusive_sum(unsigned long long value,
                                                                  unsigned long long* warp_totals) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  unsigned long long inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const unsigned long long lower = __shfl_up_sync(kFullWarpMask, inclusive, offset);
    if (lane >= offset) {
      inclusive += lower;
    }
  }
  __syncthreads();  // an earlier call may still be reading warp_totals
  if (lane == kWarpSize - 1) {
    warp_totals[warp] = inclusive;
  }
  __syncthreads();
  unsigned long long preceding = 0;
  for (int w = 0; w < warp; ++w) {
    preceding += warp_totals[w];
  }
  return preceding + inclusive - value;
}

// Sixteen bytes of consecutive elements: the unit of every global and shared memory access.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(scalar_t));
  scalar_t v[kSize];
};

// Every access to a tensor's elements goes through load_pack / store_pack or load_element /
// store_element, so that the emulator can count the kernels' global-memory traffic (the launch
// plan's byte counts are tested against that count); shared-memory accesses through them are not
// counted. On a GPU they are plain loads and stores.
#ifdef ASH_EXT_CUDA_EMULATION
__device__ __forceinline__ void note_access(const void* p, size_t bytes, bool write) {
  ::emu::Runtime::get().count_access(p, bytes, write);
}
#else
__device__ __forceinline__ void note_access(const void*, size_t, bool) {}
#endif

template <typename T>
__device__ __forceinline__ T load_element(const T* p) {
  note_access(p, sizeof(T), false);
  return *p;
}

template <typename T>
__device__ __forceinline__ void store_element(T* p, T value) {
  note_access(p, sizeof(T), true);
  *p = value;
}

template <typename scalar_t>
__device__ __forceinline__ bool is_pack_aligned(const scalar_t* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const scalar_t* p, bool aligned) {
  note_access(p, sizeof(Pack<scalar_t>), false);
  Pack<scalar_t> pack;
  if (aligned) {
    pack = *reinterpret_cast<const Pack<scalar_t>*>(p);
  } else {
#pragma unroll
    for (int j = 0; j < Pack<scalar_t>::kSize; ++j) {
      pack.v[j] = p[j];
    }
  }
  return pack;
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t>& pack, bool aligned) {
  note_access(p, sizeof(Pack<scalar_t>), true);
  if (aligned) {
    *reinterpret_cast<Pack<scalar_t>*>(p) = pack;
  } else {
#pragma unroll
    for (int j = 0; j < Pack<scalar_t>::kSize; ++j) {
      p[j] = pack.v[j];
    }
  }
}

// The element-to-thread assignment shared by every pass over a range [begin, end) of a sample:
// the range is cut into packs of Pack::kSize consecutive elements counted from `begin`; pack g
// belongs to thread g % blockDim.x, which visits its packs in increasing g, and a pack's elements
// in increasing offset; the partial pack at the end (if any) belongs to the next thread in line.
// Only how a pack is loaded depends on the pointers' alignment, never which thread gets which
// element, so a thread's partial sums -- and the block sums built from them -- do not depend on
// where the tensor happens to sit in memory.
//
// kWithSecond: also read `second` at the same offsets (the gradient, in the backward pass).
// kWrite: store fn's result to `out` at the same offsets. A pack is loaded completely before its
// result is stored, by the same thread, so `out` may alias `first` (in-place).
template <bool kWithSecond, bool kWrite, int kLoadsInFlight, typename scalar_t, typename Fn>
__device__ __forceinline__ void visit_range(const scalar_t* first, const scalar_t* second, scalar_t* out,
                                            int64_t begin, int64_t end, Fn&& fn) {
  constexpr int kPackSize = Pack<scalar_t>::kSize;
  const int64_t packs = (end - begin) / kPackSize;
  bool aligned = is_pack_aligned(first + begin);
  if constexpr (kWithSecond) {
    aligned = aligned && is_pack_aligned(second + begin);
  }
  if constexpr (kWrite) {
    aligned = aligned && is_pack_aligned(out + begin);
  }
  // One pack, loaded completely before its result is stored.
  auto visit_pack = [&](int64_t offset, const Pack<scalar_t>& first_pack, const Pack<scalar_t>& second_pack) {
    [[maybe_unused]] Pack<scalar_t> result;
#pragma unroll
    for (int j = 0; j < kPackSize; ++j) {
      if constexpr (kWrite && kWithSecond) {
        result.v[j] = fn(offset + j, first_pack.v[j], second_pack.v[j]);
      } else if constexpr (kWrite) {
        result.v[j] = fn(offset + j, first_pack.v[j]);
      } else if constexpr (kWithSecond) {
        fn(offset + j, first_pack.v[j], second_pack.v[j]);
      } else {
        fn(offset + j, first_pack.v[j]);
      }
    }
    if constexpr (kWrite) {
      store_pack(out + offset, result, aligned);
    }
  };
  // A thread's packs are loaded kLoadsInFlight ahead of their use (a shift register of packs),
  // so that enough bytes are in flight to cover the latency of HBM with one copy of the
  // per-element code; they are still visited in the order g, g + blockDim.x, ..., which keeps
  // each thread's sums in a fixed order.
  static_assert(kLoadsInFlight >= 1, "at least the pack in use");
  const int64_t stride = blockDim.x;
  Pack<scalar_t> a[kLoadsInFlight];
  [[maybe_unused]] Pack<scalar_t> b[kLoadsInFlight];
  auto load_ahead = [&](int slot, int64_t g) {
    if (g < packs) {
      a[slot] = load_pack(first + begin + g * kPackSize, aligned);
      if constexpr (kWithSecond) {
        b[slot] = load_pack(second + begin + g * kPackSize, aligned);
      }
    }
  };
#pragma unroll
  for (int u = 0; u < kLoadsInFlight; ++u) {
    load_ahead(u, threadIdx.x + u * stride);
  }
  for (int64_t g = threadIdx.x; g < packs; g += stride) {
    const Pack<scalar_t> current = a[0];
    [[maybe_unused]] Pack<scalar_t> current_second;
    if constexpr (kWithSecond) {
      current_second = b[0];
    }
#pragma unroll
    for (int u = 0; u + 1 < kLoadsInFlight; ++u) {
      a[u] = a[u + 1];
      if constexpr (kWithSecond) {
        b[u] = b[u + 1];
      }
    }
    load_ahead(kLoadsInFlight - 1, g + kLoadsInFlight * stride);
    visit_pack(begin + g * kPackSize, current, current_second);
  }
  const int64_t tail = begin + packs * kPackSize;
  if (tail < end && static_cast<int64_t>(threadIdx.x) == packs % static_cast<int64_t>(blockDim.x)) {
    for (int64_t i = tail; i < end; ++i) {
      if constexpr (kWrite && kWithSecond) {
        store_element(out + i, fn(i, load_element(first + i), load_element(second + i)));
      } else if constexpr (kWrite) {
        store_element(out + i, fn(i, load_element(first + i)));
      } else if constexpr (kWithSecond) {
        fn(i, load_element(first + i), load_element(second + i));
      } else {
        fn(i, load_element(first + i));
      }
    }
  }
}

// How many 16-byte loads per thread a pass keeps in flight when it reads global memory: enough
// for HBM3/HBM3e at the occupancy of the kernels (about 32 KiB per multiprocessor). Passes over
// a sample staged in shared memory use 1 (shared memory needs no hiding, registers are dearer).
constexpr int kGlobalLoadsInFlight = 4;

// fn(offset, value) for every element of [begin, end).
template <int kLoadsInFlight = kGlobalLoadsInFlight, typename scalar_t, typename Fn>
__device__ __forceinline__ void for_each_element(const scalar_t* data, int64_t begin, int64_t end, Fn&& fn) {
  visit_range<false, false, kLoadsInFlight>(data, static_cast<const scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr), begin,
                            end, fn);
}

// fn(offset, first[offset], second[offset]) for every offset of [begin, end). Two arrays: half
// the packs of each in flight.
template <int kLoadsInFlight = kGlobalLoadsInFlight, typename scalar_t, typename Fn>
__device__ __forceinline__ void for_each_element_pair(const scalar_t* first, const scalar_t* second, int64_t begin,
                                                      int64_t end, Fn&& fn) {
  visit_range<true, false, (kLoadsInFlight + 1) / 2>(first, second, static_cast<scalar_t*>(nullptr), begin, end, fn);
}

// out[offset] = fn(offset, data[offset]) for every offset of [begin, end); out may alias data.
template <int kLoadsInFlight = kGlobalLoadsInFlight, typename scalar_t, typename Fn>
__device__ __forceinline__ void map_elements(const scalar_t* data, scalar_t* out, int64_t begin, int64_t end,
                                             Fn&& fn) {
  visit_range<false, true, kLoadsInFlight>(data, static_cast<const scalar_t*>(nullptr), out, begin, end, fn);
}

// out[offset] = fn(offset, first[offset], second[offset]) for every offset of [begin, end).
template <int kLoadsInFlight = kGlobalLoadsInFlight, typename scalar_t, typename Fn>
__device__ __forceinline__ void map_element_pairs(const scalar_t* first, const scalar_t* second, scalar_t* out,
                                                  int64_t begin, int64_t end, Fn&& fn) {
  visit_range<true, true, (kLoadsInFlight + 1) / 2>(first, second, out, begin, end, fn);
}

template <typename scalar_t, typename Transform>
__device__ __forceinline__ Pack<scalar_t> transform_pack(Pack<scalar_t> pack, Transform transform) {
#pragma unroll
  for (int j = 0; j < Pack<scalar_t>::kSize; ++j) {
    pack.v[j] = transform(pack.v[j]);
  }
  return pack;
}

}  // namespace cuda_detail
}  // namespace ash_ext
