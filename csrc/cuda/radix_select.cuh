// Radix selection of the rank-th largest key among a sample's candidates, digit by digit from the
// most significant end; shared by the one-block-per-sample kernels and the chunked pipeline.
//
// A selection runs in passes. Before a pass, `prefix` holds the digits decided so far and `rank`
// says which candidate (1 = the largest) is wanted among those whose key starts with `prefix`.
// The pass counts those candidates per value of the next digit; the bucket holding the rank-th
// largest becomes part of the prefix, and rank drops by the number of candidates in the buckets
// above it. After the last pass, prefix is the wanted key itself, rank is how many candidates
// with exactly that key are wanted, and the last bucket's count is how many there are.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "ash_semantics.h"
#include "block_ops.cuh"
#include "cuda/launch_plan.h"

namespace ash_ext {
namespace cuda_detail {

// Which bits of the key one pass looks at.
struct DigitPass {
  int shift;  // position of the digit's lowest bit
  int width;  // bits in the digit, 1..kDigitBits

  // The bits above this digit, all decided by earlier passes.
  __host__ __device__ unsigned long long decided_mask() const {
    const int top = shift + width;
    return top >= 64 ? 0ull : ~0ull << top;
  }
  __host__ __device__ unsigned digit(unsigned long long key) const {
    return static_cast<unsigned>(key >> shift) & ((1u << width) - 1u);
  }
  __host__ __device__ int bins() const { return 1 << width; }
};

__host__ __device__ inline int digit_passes(int key_bits) {
  return (key_bits + kDigitBits - 1) / kDigitBits;
}

// Pass `pass` of a key_bits-wide key; the last pass takes whatever bits are left.
__host__ __device__ inline DigitPass digit_pass(int key_bits, int pass) {
  const int top = key_bits - kDigitBits * pass;
  const int shift = top > kDigitBits ? top - kDigitBits : 0;
  return DigitPass{shift, top - shift};
}

// Tie-breaking selects among the elements equal to the threshold by their logical index: the
// `need` smallest indices win. As a "largest keys" selection, the key is n - 1 - index, which
// needs as many bits as n - 1.
__host__ __device__ inline int tie_key_bits(int64_t n) {
  int bits = 0;
  for (uint64_t rest = static_cast<uint64_t>(n - 1); rest != 0; rest >>= 1) {
    ++bits;
  }
  return bits;
}

// Inlined: a call (as __noinline__ had it) made every kernel that might break a tie keep a
// stack frame and spill around the call; only tied elements of permuted layouts pay for the
// divisions in logical_index.
__device__ __forceinline__ unsigned long long tie_key(const SampleLayout& layout, int64_t n, int64_t offset) {
  return static_cast<unsigned long long>(n - 1 - logical_index(layout, offset));
}

// Digit value meaning "not a candidate" in count_digits.
constexpr unsigned kNoDigit = 0xffffffffu;

// Adds one to hist[digit] for every lane of the warp whose digit is not kNoDigit. Lanes with the
// same digit are combined into one atomic: runs of equal values (ReLU's zeros, say) would
// otherwise all hit one shared counter and serialise. Every lane of the warp must call it.
__device__ __forceinline__ void warp_count_digit(unsigned* hist, unsigned digit) {
  const unsigned peers = __match_any_sync(kFullWarpMask, digit);
  const unsigned lane = threadIdx.x % kWarpSize;
  if (digit != kNoDigit && lane == static_cast<unsigned>(__ffs(peers) - 1)) {
    atomicAdd(&hist[digit], static_cast<unsigned>(__popc(peers)));
  }
}

// Counts digit_of(offset, value) (a digit, or kNoDigit) of the elements [begin, end) of `data`
// into the shared histogram. Elements go to threads as in for_each_element, but every lane of a
// warp runs the same number of rounds (lanes past the end count nothing), so that the warp-wide
// match in warp_count_digit always has the whole warp. Every thread of the block calls it.
template <int kLoadsInFlight = kGlobalLoadsInFlight, typename scalar_t, typename DigitOf>
__device__ __forceinline__ void count_digits(const scalar_t* data, int64_t begin, int64_t end, unsigned* hist,
                                             DigitOf digit_of) {
  constexpr int kPackSize = Pack<scalar_t>::kSize;
  // Packs loaded ahead of their use, as in visit_range.
  const int64_t packs = (end - begin) / kPackSize;
  const bool aligned = is_pack_aligned(data + begin);
  const int64_t lane = threadIdx.x % kWarpSize;
  const int64_t stride = blockDim.x;
  Pack<scalar_t> ahead[kLoadsInFlight];
#pragma unroll
  for (int u = 0; u < kLoadsInFlight; ++u) {
    const int64_t g = threadIdx.x + u * stride;
    if (g < packs) {
      ahead[u] = load_pack(data + begin + g * kPackSize, aligned);
    }
  }
  for (int64_t warp_first = threadIdx.x - lane; warp_first < packs; warp_first += stride) {
    const int64_t g = warp_first + lane;
    const bool in_range = g < packs;
    const int64_t offset = begin + g * kPackSize;
    const Pack<scalar_t> pack = ahead[0];
#pragma unroll
    for (int u = 0; u + 1 < kLoadsInFlight; ++u) {
      ahead[u] = ahead[u + 1];
    }
    if (g + kLoadsInFlight * stride < packs) {
      ahead[kLoadsInFlight - 1] = load_pack(data + offset + kLoadsInFlight * stride * kPackSize, aligned);
    }
#pragma unroll
    for (int j = 0; j < kPackSize; ++j) {
      warp_count_digit(hist, in_range ? digit_of(offset + j, pack.v[j]) : kNoDigit);
    }
  }
  const int64_t tail = begin + packs * kPackSize;
  if (tail < end && static_cast<int64_t>(threadIdx.x) == packs % static_cast<int64_t>(blockDim.x)) {
    for (int64_t i = tail; i < end; ++i) {
      const unsigned digit = digit_of(i, load_element(data + i));
      if (digit != kNoDigit) {
        atomicAdd(&hist[digit], 1u);
      }
    }
  }
}

// Stages the `len` elements at `source` (global memory) in `staged` (shared, 16-byte aligned) as
// transform(value) (the clamp, where the op clamps: every later pass reads clamped values) and
// counts, on the way, the first digit of the value phase's keys (order_key of the staged value)
// into `hist`, which the caller has zeroed behind a barrier: the first radix pass then needs no
// pass over the staged sample of its own (radix_select with first_pass_counted), and its counting
// overlaps the loads in flight. Elements
// go to threads as in count_digits (every lane of a warp runs the same rounds), with
// kLoadsInFlight packs a thread loaded ahead (fewer where registers are short). Every thread of
// the block calls it; the counts are complete after the next barrier.
template <int kLoadsInFlight, typename scalar_t, typename Transform>
__device__ __forceinline__ void stage_and_count_first_digit(const scalar_t* source, scalar_t* staged, int64_t len,
                                                            Transform transform, unsigned* hist) {
  constexpr int kPackSize = Pack<scalar_t>::kSize;
  const DigitPass digit = digit_pass(static_cast<int>(8 * sizeof(key_type<scalar_t>)), 0);
  const int64_t packs = len / kPackSize;
  const bool aligned = is_pack_aligned(source);
  const int64_t lane = threadIdx.x % kWarpSize;
  const int64_t stride = blockDim.x;
  auto* staged_packs = reinterpret_cast<Pack<scalar_t>*>(staged);
  Pack<scalar_t> ahead[kLoadsInFlight];
#pragma unroll
  for (int u = 0; u < kLoadsInFlight; ++u) {
    const int64_t g = threadIdx.x + u * stride;
    if (g < packs) {
      ahead[u] = load_pack(source + g * kPackSize, aligned);
    }
  }
  for (int64_t warp_first = threadIdx.x - lane; warp_first < packs; warp_first += stride) {
    const int64_t g = warp_first + lane;
    const bool in_range = g < packs;
    const Pack<scalar_t> pack = transform_pack(ahead[0], transform);
#pragma unroll
    for (int u = 0; u + 1 < kLoadsInFlight; ++u) {
      ahead[u] = ahead[u + 1];
    }
    if (g + kLoadsInFlight * stride < packs) {
      ahead[kLoadsInFlight - 1] = load_pack(source + (g + kLoadsInFlight * stride) * kPackSize, aligned);
    }
    if (in_range) {
      staged_packs[g] = pack;
    }
#pragma unroll
    for (int j = 0; j < kPackSize; ++j) {
      warp_count_digit(hist, in_range ? digit.digit(order_key(pack.v[j])) : kNoDigit);
    }
  }
  const int64_t tail = packs * kPackSize;
  if (tail < len && static_cast<int64_t>(threadIdx.x) == packs % stride) {
    for (int64_t i = tail; i < len; ++i) {
      const scalar_t value = transform(load_element(source + i));
      staged[i] = value;
      atomicAdd(&hist[digit.digit(order_key(value))], 1u);
    }
  }
}

struct BucketChoice {
  unsigned digit;
  unsigned long long above;  // candidates in the buckets above the chosen one
  unsigned long long count;  // candidates in the chosen bucket
};

// Finds the bucket holding the rank-th largest candidate (1-based), given count_of(bucket) for
// buckets 0..bins-1: the bucket d with above(d) < rank <= above(d) + count(d), where above(d)
// counts the candidates in buckets > d. Needs 1 <= rank <= the total count, which makes the
// bucket unique. Every thread of the block calls it; on return (after a barrier) `choice` holds
// the answer and every call of count_of has been made.
template <typename CountOf>
__device__ __forceinline__ void choose_bucket(CountOf count_of, int bins, unsigned long long rank,
                                              unsigned long long* scan_scratch, BucketChoice* choice) {
  if (threadIdx.x == 0) {
    *choice = BucketChoice{0u, 0ull, 0ull};  // stays only if the rank were out of range
  }
  // Thread t owns a run of buckets counted from the top, so that the exclusive scan over threads
  // gives each thread the count of every bucket above its run.
  const int per_thread = (bins + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
  const int first = static_cast<int>(threadIdx.x) * per_thread;
  const int last = min(first + per_thread, bins);
  unsigned long long own = 0;
  for (int q = first; q < last; ++q) {
    own += count_of(bins - 1 - q);
  }
  unsigned long long above = block_exclusive_sum(own, scan_scratch);  // barriers order the reset above
  for (int q = first; q < last; ++q) {
    const int bucket = bins - 1 - q;
    const unsigned long long count = count_of(bucket);
    if (above < rank && rank <= above + count) {
      *choice = BucketChoice{static_cast<unsigned>(bucket), above, count};
    }
    above += count;
  }
  __syncthreads();
}

// Shared scratch of block_radix_select.
struct SelectScratch {
  unsigned long long scan[kMaxWarpsPerBlock];
  BucketChoice choice;
};

struct RadixSelection {
  unsigned long long key;             // the rank-th largest candidate key
  unsigned long long rank_in_bucket;  // how many candidates equal to `key` are among the rank largest
  unsigned long long bucket_size;     // how many candidates equal `key`
};

// Where a selection's digit counts live. One block selecting alone: its shared histogram, made
// complete by a block barrier. A cluster selecting together (ClusterHistogram, cluster_ops.cuh):
// every block's histogram, combined through distributed shared memory after a cluster barrier.
struct BlockHistogram {
  unsigned* hist;

  // After the block's counting: the counts are complete and visible to every thread.
  __device__ __forceinline__ void counted() const { __syncthreads(); }
  __device__ __forceinline__ unsigned long long count(int digit) const { return hist[digit]; }
  // After the bucket is chosen: nobody reads the counts any more, the next pass may clear them.
  __device__ __forceinline__ void read() const { __syncthreads(); }
};

// The rank-th largest key among the candidates of the `len` elements at `data` (a sample, or in a
// cluster this block's slice of it), found by the block (or the cluster, whose blocks all call it
// with the same rank). key_of(offset, value, &key) -- offset within data -- says whether the
// element is a candidate and gives its key (at most key_bits wide). histogram.hist is shared
// memory of kNumBins counters (a histogram's counts must stay below 2^32). first_pass_counted:
// the first pass's counts are in the histogram already (stage_and_count_first_digit; value keys,
// every element a candidate). Every thread calls it and gets the same answer; it ends with a
// barrier after the block's last read of `data`.
template <int kLoadsInFlight, typename scalar_t, typename KeyOf, typename Histogram>
__device__ __forceinline__ RadixSelection radix_select(const scalar_t* data, int64_t len, int key_bits,
                                                       unsigned long long rank, KeyOf key_of,
                                                       const Histogram& histogram, SelectScratch& scratch,
                                                       bool first_pass_counted = false) {
  RadixSelection result{0ull, rank, 0ull};
  unsigned* hist = histogram.hist;
  const int passes = digit_passes(key_bits);
  for (int pass = 0; pass < passes; ++pass) {
    const DigitPass digit = digit_pass(key_bits, pass);
    const unsigned long long decided = digit.decided_mask();
    const unsigned long long prefix = result.key;
    if (pass > 0 || !first_pass_counted) {
      for (int d = static_cast<int>(threadIdx.x); d < digit.bins(); d += static_cast<int>(blockDim.x)) {
        hist[d] = 0u;
      }
      __syncthreads();
      count_digits<kLoadsInFlight>(data, 0, len, hist, [&](int64_t offset, scalar_t value) {
        unsigned long long key;
        return key_of(offset, value, &key) && (key & decided) == prefix ? digit.digit(key) : kNoDigit;
      });
    }
    histogram.counted();
    choose_bucket([&](int d) { return histogram.count(d); }, digit.bins(), result.rank_in_bucket, scratch.scan,
                  &scratch.choice);
    const BucketChoice choice = scratch.choice;
    result.key = prefix | (static_cast<unsigned long long>(choice.digit) << digit.shift);
    result.rank_in_bucket -= choice.above;
    result.bucket_size = choice.count;
    // Every thread has read `choice` (and choose_bucket has finished reading the counts) before
    // the next pass clears the histogram or a later choose_bucket resets `choice`.
    histogram.read();
  }
  return result;
}

}  // namespace cuda_detail
}  // namespace ash_ext
