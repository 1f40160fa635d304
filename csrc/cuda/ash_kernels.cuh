// The ASH CUDA kernels of regimes 1 to 3 (regime 4, clusters: cluster_kernel.cuh; the launch
// sequence: launch_sequence.cuh).
//
// Every sample is handled by a radix select over its order-preserving keys (radix_select.cuh),
// 11 bits per pass, that yields the threshold key T, `need` (how many elements equal to T are
// kept) and the number of such ties. Where need < ties, a second radix select over the ties'
// logical indices finds the cut that keeps the `need` ties with the smallest logical index. Then
// the sums the variant needs are formed in a fixed order, and one pass writes the output (or,
// for topk_stats, the sample's threshold and sums are stored instead).
//
// Per-sample k: each sample's k is read on the device (SampleKs), never by the host. k == 0 skips
// the selection (the "keep nothing" selection below); a k outside [0, n] makes the sample NaN.
// Clamping: the on-chip regime clamps while it stages the sample, so every pass sees clamped
// values at no extra cost; the other two regimes first clamp the input into the output (or a
// scratch copy, for topk_stats) with one elementwise kernel and then run unchanged on that copy.
// That costs the clamped path one more read and write of the input, and keeps the kernels of the
// unclamped path, and the number of kernels compiled, as they were.
//
// The regimes, chosen on the host from the shape and the device (plan_launch, launch_plan.h):
//  1. on chip: a sample that fits in shared memory next to the histogram (up to the device's
//     opt-in limit) goes to one block, which reads it from global memory once into shared
//     memory, runs every pass there, and writes the output once;
//  2. one block per long sample, every pass reading the sample from global memory (L2), when
//     there are enough samples (batch >= 2 x SMs) to fill the GPU;
//  3. a chunked pipeline for long samples that are too few to fill the GPU: each sample is cut
//     into chunks handled by separate blocks, one kernel per radix pass. Blocks count digits in
//     shared memory and add them to the sample's histogram in global memory with integer atomics;
//     the last block of the sample to finish a pass (found with an arrival counter) picks the
//     bucket and stores the selection state for the next kernel. Sums are per-chunk partials that
//     the sample's last block adds in chunk order. The number of launches depends on the shape
//     only, and nothing waits for the host, so the op can be captured in a CUDA graph;
//  4. a thread-block cluster per sample (cluster_kernel.cuh), on sm_90 and later.
#pragma once

#include <c10/util/Exception.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "ash_semantics.h"
#include "block_ops.cuh"
#include "cuda/launch_plan.h"
#include "radix_select.cuh"

namespace ash_ext {
namespace cuda_detail {

#ifndef ASH_EXT_CUDA_EMULATION
// The kernels' dynamic shared memory (the emulator supplies its own).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  return dynamic_shared;
}
#endif

__host__ __device__ __forceinline__ int64_t min_int64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t zero_value() {
  return static_cast<scalar_t>(0.0f);
}

template <typename scalar_t>
__host__ __device__ __forceinline__ scalar_t nan_value() {
  return value_of_key<scalar_t>(static_cast<key_type<scalar_t>>(~key_type<scalar_t>(0)));
}

// Every sample's k: per_sample[b] (device memory) where per_sample is given, else uniform.
struct SampleKs {
  const int64_t* per_sample;
  int64_t uniform;

  __device__ __forceinline__ int64_t of(int64_t sample) const {
    return per_sample != nullptr ? per_sample[sample] : uniform;
  }
};

// A k the op cannot honour (only per-sample ks are unchecked): the sample becomes NaN.
__host__ __device__ __forceinline__ bool invalid_k(int64_t k, int64_t n) {
  return k < 0 || k > n;
}

// The clamp bounds in the input's dtype (clamp_bound, ash_semantics.h), when the op clamps.
template <typename scalar_t>
struct ClampBounds {
  bool enabled;
  scalar_t low;
  scalar_t high;

  __device__ __forceinline__ scalar_t operator()(scalar_t v) const { return clamp_value(v, low, high); }
};

// Where topk_stats stores each sample's threshold (x's dtype) and sums (the accumulation type);
// null pointers when the op shapes instead.
template <typename scalar_t>
struct StatsOutput {
  scalar_t* threshold;
  acc_type<scalar_t>* total;
  acc_type<scalar_t>* kept;

  __device__ __forceinline__ bool wanted() const { return threshold != nullptr; }
  __device__ __forceinline__ void store_nan(int64_t sample) const {
    threshold[sample] = nan_value<scalar_t>();
    total[sample] = nan_value<acc_type<scalar_t>>();
    kept[sample] = nan_value<acc_type<scalar_t>>();
  }
};

// What decides whether an element of a sample is kept, once the selection is done.
template <typename scalar_t>
struct SampleSelection {
  using key_t = key_type<scalar_t>;
  key_t threshold;              // T, the key of the k-th largest element
  unsigned long long need;      // elements equal to T that are kept
  unsigned long long tie_cut;   // a tie is kept when its tie key is >= tie_cut; 0 keeps every tie
  int64_t n;
  const SampleLayout* layout;

  __device__ __forceinline__ bool kept(int64_t offset, scalar_t value) const {
    const key_t key = order_key(value);
    if (key != threshold) {
      return key > threshold;
    }
    return tie_cut == 0 || tie_key(*layout, n, offset) >= tie_cut;
  }

  // The selection of k == 0, expressed so that kept() needs no test of its own: no key is above
  // the largest one, and no tie key (at most n - 1) reaches a tie cut of n. Its threshold is the
  // NaN key, which topk_stats reports as the NaN threshold that k == 0 calls for.
  __device__ __forceinline__ static SampleSelection keep_nothing(int64_t n, const SampleLayout* layout) {
    return SampleSelection{static_cast<key_t>(~key_t(0)), 0ull, static_cast<unsigned long long>(n), n, layout};
  }
};

template <typename acc_t>
struct SampleSums {
  acc_t input;  // s1: every element
  acc_t above;  // the elements whose key is above T (s2 = above + need * value(T))
  acc_t grad;   // backward: kept g (ASH-B) or kept g * x (ASH-S)
};

// The per-sample numbers an output element needs beyond its own input, and the sums they come
// from.
template <typename scalar_t, Variant kVariant, bool kBackward>
struct AshOutput {
  using acc_t = acc_type<scalar_t>;
  // ASH-S and SCALE share their sums and factor; SCALE applies it to every element.
  static constexpr bool kScaled = kVariant == Variant::Scale || kVariant == Variant::ScaleUnpruned;
  static constexpr bool kNeedsInputSum = kScaled || (kVariant == Variant::Binarize && !kBackward);
  static constexpr bool kNeedsAboveSum = kScaled;
  static constexpr bool kNeedsGradSum = kBackward && kVariant != Variant::Prune;
  static constexpr bool kNeedsSums = kNeedsInputSum || kNeedsAboveSum || kNeedsGradSum;
  // SCALE's forward output does not depend on the selection.
  static constexpr bool kNeedsMaskForOutput = kBackward || kVariant != Variant::ScaleUnpruned;

  // Forward ASH-B: s1 / k. Forward ASH-S and SCALE: scale_factor(s1, s2) = exp(s1 / s2).
  // Backward ASH-B: (sum of kept g) / k. Backward ASH-S and SCALE: E = exp(s1 / s2).
  acc_t scale;
  acc_t kept_shift;     // backward ASH-S, SCALE: G * s1 / s2^2, subtracted from a kept element's g
  acc_t everywhere;     // backward ASH-S, SCALE: G / s2, added to every element
  bool kept_sum_zero;   // backward ASH-S, SCALE with s2 == 0: the factor is a constant, grad = factor * g

  // Adds one element to the sums (g is ignored by the forward pass).
  __device__ __forceinline__ static void add(SampleSums<acc_t>& sums, const SampleSelection<scalar_t>& selection,
                                             int64_t offset, scalar_t x, scalar_t g) {
    const acc_t x_acc = static_cast<acc_t>(x);
    if constexpr (kNeedsInputSum) {
      sums.input += x_acc;
    }
    if constexpr (kNeedsAboveSum) {
      if (order_key(x) > selection.threshold) {
        sums.above += x_acc;
      }
    }
    if constexpr (kNeedsGradSum) {
      if constexpr (kVariant == Variant::ScaleUnpruned) {
        sums.grad += static_cast<acc_t>(g) * x_acc;  // G over every element: each one is scaled
      } else if (selection.kept(offset, x)) {
        sums.grad += kVariant == Variant::Scale ? static_cast<acc_t>(g) * x_acc : static_cast<acc_t>(g);
      }
    }
  }

  // s2, the sum of the k kept values: those above T plus the `need` ties at T (none for k == 0,
  // whose T, the NaN key, must not enter the sum).
  __device__ __forceinline__ static acc_t kept_sum(const SampleSums<acc_t>& sums,
                                                   const SampleSelection<scalar_t>& selection) {
    if (selection.need == 0ull) {
      return sums.above;
    }
    return sums.above + static_cast<acc_t>(selection.need) *
                            static_cast<acc_t>(value_of_key<scalar_t>(selection.threshold));
  }

  __device__ __forceinline__ static AshOutput make(const SampleSums<acc_t>& sums,
                                                   const SampleSelection<scalar_t>& selection, int64_t k) {
    AshOutput output{acc_t(1), acc_t(0), acc_t(0), false};
    if constexpr (kVariant == Variant::Binarize) {
      // k == 0 keeps nothing: the forward writes no fill, and the gradient is 0 (not 0 / 0).
      output.scale = k == 0 ? acc_t(0) : (kBackward ? sums.grad : sums.input) / static_cast<acc_t>(k);
    } else if constexpr (kScaled) {
      const acc_t s1 = sums.input;
      const acc_t s2 = kept_sum(sums, selection);
      output.scale = scale_factor(s1, s2);
      if constexpr (kBackward) {
        output.kept_sum_zero = s2 == acc_t(0);
        if (!output.kept_sum_zero) {
          output.kept_shift = sums.grad * s1 / (s2 * s2);
          output.everywhere = sums.grad / s2;
        }
      }
    }
    return output;
  }

  __device__ __forceinline__ scalar_t forward(bool kept, scalar_t x) const {
    if (!kept) {
      return zero_value<scalar_t>();
    }
    if constexpr (kVariant == Variant::Prune) {
      return x;
    } else if constexpr (kVariant == Variant::Binarize) {
      return static_cast<scalar_t>(scale);
    } else {
      return static_cast<scalar_t>(static_cast<acc_t>(x) * scale);
    }
  }

  // SCALE: every element, kept or not.
  __device__ __forceinline__ scalar_t forward_unpruned(scalar_t x) const {
    return static_cast<scalar_t>(static_cast<acc_t>(x) * scale);
  }

  __device__ __forceinline__ scalar_t backward(bool kept, scalar_t g) const {
    if constexpr (kVariant == Variant::Binarize) {
      return static_cast<scalar_t>(scale);
    } else if constexpr (kVariant == Variant::Prune) {
      return kept ? g : zero_value<scalar_t>();
    } else if constexpr (kVariant == Variant::Scale) {
      if (kept_sum_zero) {
        // The factor (0 or 1) does not depend on x: the gradient is ASH-P's, scaled by it.
        return kept ? static_cast<scalar_t>(scale * static_cast<acc_t>(g)) : zero_value<scalar_t>();
      }
      // A non-kept element gets only the G / s2 term (also when its g is not finite).
      const acc_t own = kept ? static_cast<acc_t>(g) - kept_shift : acc_t(0);
      return static_cast<scalar_t>(scale * (own + everywhere));
    } else {
      if (kept_sum_zero) {
        return static_cast<scalar_t>(scale * static_cast<acc_t>(g));
      }
      // Every element carries its own E g; only kept ones the -G s1 / s2^2 term of s2's change.
      const acc_t own = kept ? static_cast<acc_t>(g) - kept_shift : static_cast<acc_t>(g);
      return static_cast<scalar_t>(scale * (own + everywhere));
    }
  }
};

// Block-wide totals of the sums the variant needs (bitwise reproducible; see block_sum).
template <typename Output, typename acc_t>
__device__ __forceinline__ SampleSums<acc_t> block_sums(SampleSums<acc_t> sums, acc_t* scratch) {
  if constexpr (Output::kNeedsInputSum) {
    sums.input = block_sum(sums.input, scratch);
  }
  if constexpr (Output::kNeedsAboveSum) {
    sums.above = block_sum(sums.above, scratch);
  }
  if constexpr (Output::kNeedsGradSum) {
    sums.grad = block_sum(sums.grad, scratch);
  }
  return sums;
}

// ---------------------------------------------------------------------------------------------
// Regimes 1 and 2: one block per sample.

// The whole selection of one sample: by one block (BlockHistogram; data is the sample, begin 0,
// len n) or by a cluster (ClusterHistogram; data is this block's slice [begin, begin + len) of
// the sample, and every block of the cluster calls it). Ends with a barrier after the last read
// of `data`.
// first_digit_counted: the value phase's first digit is counted already (stage_and_count_first_digit).
template <int kLoadsInFlight, typename scalar_t, typename Histogram>
__device__ __forceinline__ SampleSelection<scalar_t> select_sample(const scalar_t* data, int64_t begin, int64_t len,
                                                                   int64_t n, int64_t k, const SampleLayout& layout,
                                                                   const Histogram& histogram, SelectScratch& scratch,
                                                                   bool first_digit_counted = false) {
  using key_t = key_type<scalar_t>;
  constexpr int kValueKeyBits = static_cast<int>(8 * sizeof(key_t));
  const RadixSelection by_value = radix_select<kLoadsInFlight>(
      data, len, kValueKeyBits, static_cast<unsigned long long>(k),
      [](int64_t, scalar_t value, unsigned long long* key) {
        *key = order_key(value);
        return true;
      },
      histogram, scratch, first_digit_counted);
  SampleSelection<scalar_t> selection{static_cast<key_t>(by_value.key), by_value.rank_in_bucket, 0ull, n,
                                      &layout};
  // bucket_size counts the whole sample's ties (the cluster's, combined): every block agrees.
  if (by_value.rank_in_bucket < by_value.bucket_size) {
    const key_t threshold = selection.threshold;
    const RadixSelection by_index = radix_select<kLoadsInFlight>(
        data, len, tie_key_bits(n), by_value.rank_in_bucket,
        [&](int64_t offset, scalar_t value, unsigned long long* key) {
          if (order_key(value) != threshold) {
            return false;
          }
          *key = tie_key(layout, n, begin + offset);
          return true;
        },
        histogram, scratch);
    selection.tie_cut = by_index.key;
  }
  return selection;
}

// Writes NaN to the n elements of a sample whose k is invalid (a rare path: no packs).
template <typename scalar_t>
__device__ __forceinline__ void fill_nan(scalar_t* data, int64_t begin, int64_t end) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    store_element(data + i, nan_value<scalar_t>());
  }
}

// kStaged (regime 1): the sample is copied to shared memory first (clamped on the way where the
// op clamps) and every later pass reads the copy. Otherwise (regime 2) every pass reads global
// memory, and `clamp` is never enabled (the launch sequence has clamped the input already).
// Dynamic shared memory: the histogram (kNumBins counters), then the staged sample.
// `stats` (forward ASH-S only): store each sample's threshold and sums instead of its output.
template <typename scalar_t, Variant kVariant, bool kBackward, bool kStaged>
__global__ void __launch_bounds__(kMaxBlockThreads, kStaged && !kBackward ? kMinBlocksPerSmOnChip : 1)
    sample_per_block_kernel(const scalar_t* x, const scalar_t* grad, scalar_t* out, int64_t batch, int64_t n,
                            SampleKs ks, ClampBounds<scalar_t> clamp, StatsOutput<scalar_t> stats,
                            const __grid_constant__ SampleLayout layout) {
  using acc_t = acc_type<scalar_t>;
  using Output = AshOutput<scalar_t, kVariant, kBackward>;
  constexpr bool kMayStoreStats = kVariant == Variant::Scale && !kBackward;
  // (The backward pass reads two arrays, and its registers are tighter.)
  constexpr int kLoadsInFlight = kStaged ? 1 : (kBackward ? 2 : kGlobalLoadsInFlight);
  unsigned char* dynamic_shared = dynamic_shared_memory();
  unsigned* hist = reinterpret_cast<unsigned*>(dynamic_shared);
  scalar_t* staged = reinterpret_cast<scalar_t*>(dynamic_shared + kNumBins * sizeof(unsigned));
  ASH_SHARED(select_scratch, SelectScratch);
  ASH_SHARED(sum_scratch, acc_t[kMaxWarpsPerBlock]);

  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* sample = x + b * n;
    const scalar_t* sample_grad = kBackward ? grad + b * n : nullptr;
    scalar_t* sample_out = out != nullptr ? out + b * n : nullptr;  // null for topk_stats
    const int64_t k = ks.of(b);  // the same for the whole block: every branch on it is uniform
    if (invalid_k(k, n)) {
      if constexpr (kMayStoreStats) {
        if (stats.wanted()) {
          if (threadIdx.x == 0) {
            stats.store_nan(b);
          }
          continue;
        }
      }
      fill_nan(sample_out, 0, n);
      continue;
    }
    if constexpr (kStaged) {
      // The previous sample's output pass may still be reading `staged` (its selection's last
      // use of `hist` ended at a barrier).
      __syncthreads();
      for (int d = static_cast<int>(threadIdx.x); d < kNumBins; d += static_cast<int>(blockDim.x)) {
        hist[d] = 0u;
      }
      __syncthreads();
      // Staged with the first radix digit counted on the way (clamped first where the op clamps);
      // the forward kernels' 64 registers a thread hold two float32 / float64 packs in flight
      // without spilling, and one of 16-bit types (8 values to count a pack).
      constexpr int kStagingLoads = kBackward ? 4 : (sizeof(scalar_t) == 2 ? 1 : 2);
      if (!kBackward && clamp.enabled) {
        stage_and_count_first_digit<kStagingLoads>(sample, staged, n, clamp, hist);
      } else {
        stage_and_count_first_digit<kStagingLoads>(sample, staged, n, [](scalar_t v) { return v; }, hist);
      }
      __syncthreads();
      sample = staged;
    }
    const SampleSelection<scalar_t> selection =
        k == 0 ? SampleSelection<scalar_t>::keep_nothing(n, &layout)
               : select_sample<kLoadsInFlight>(sample, 0, n, n, k, layout, BlockHistogram{hist}, select_scratch,
                                               kStaged);
    Output output{};
    if constexpr (Output::kNeedsSums) {
      SampleSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
      if constexpr (kBackward) {
        for_each_element_pair<kLoadsInFlight>(sample, sample_grad, 0, n, [&](int64_t offset, scalar_t value, scalar_t g) {
          Output::add(sums, selection, offset, value, g);
        });
      } else {
        for_each_element<kLoadsInFlight>(sample, 0, n, [&](int64_t offset, scalar_t value) {
          Output::add(sums, selection, offset, value, value);
        });
      }
      sums = block_sums<Output>(sums, sum_scratch);
      if constexpr (kMayStoreStats) {
        if (stats.wanted()) {
          if (threadIdx.x == 0) {
            stats.threshold[b] = value_of_key<scalar_t>(selection.threshold);
            stats.total[b] = sums.input;
            stats.kept[b] = Output::kept_sum(sums, selection);
          }
          continue;  // no output pass; the next sample's staging starts with a barrier
        }
      }
      output = Output::make(sums, selection, k);
    }
    // Every read of the sample other than the output pass's own is behind a barrier by now (the
    // selection ends with one, block_sum starts with one), so in-place output is safe: each
    // element is read and then written by the same thread.
    if constexpr (kBackward) {
      map_element_pairs<kLoadsInFlight>(sample, sample_grad, sample_out, 0, n,
                                        [&](int64_t offset, scalar_t value, scalar_t g) {
        return output.backward(selection.kept(offset, value), g);
      });
    } else if constexpr (!Output::kNeedsMaskForOutput) {
      map_elements<kLoadsInFlight>(sample, sample_out, 0, n,
                                   [&](int64_t, scalar_t value) { return output.forward_unpruned(value); });
    } else {
      map_elements<kLoadsInFlight>(sample, sample_out, 0, n, [&](int64_t offset, scalar_t value) {
        return output.forward(selection.kept(offset, value), value);
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Regime 3: the chunked pipeline.

// One sample's selection state in global memory, zeroed before the first kernel.
struct ChunkedSampleState {
  unsigned long long hist[kNumBins];  // digit counts of the pass under way; all zero between passes
  unsigned long long prefix;          // digits decided so far in the current phase (values, then ties)
  unsigned long long rank;            // the rank wanted among the candidates that start with `prefix`
  unsigned long long threshold_key;   // T, once the value phase is done
  unsigned long long need;            // ties kept, once the value phase is done
  unsigned long long ties;            // elements equal to T, once the value phase is done
  unsigned long long tie_cut;         // see SampleSelection::tie_cut; 0 until the tie phase decides
  unsigned int arrivals;              // blocks of the sample that have finished the kernel under way
};

// Counts this block's arrival at the end of a kernel and returns, on every thread, whether it
// was the last of the sample's `expected` blocks; the last block then sees every global write
// the others made before arriving. Every thread must call it (once per kernel).
//
// The barrier orders the block's writes before thread 0's fence (fences are cumulative), so one
// thread fences and takes the atomic for the block: release before the arrival, and in the last
// block acquire after it, before the barrier that releases the other threads to read.
__device__ __forceinline__ bool arrive_last(unsigned int* arrivals, int64_t expected) {
  ASH_SHARED(is_last, bool);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // release: the block's global writes and atomics before the arrival
    const bool last = atomicAdd(arrivals, 1u) + 1u == static_cast<unsigned int>(expected);
    if (last) {
      __threadfence();  // acquire: the other blocks' writes before the reads that follow
    }
    is_last = last;
  }
  __syncthreads();
  return is_last;
}

template <typename scalar_t>
__device__ __forceinline__ SampleSelection<scalar_t> load_selection(const ChunkedSampleState* state, int64_t n,
                                                                     const SampleLayout* layout) {
  return SampleSelection<scalar_t>{static_cast<key_type<scalar_t>>(__ldcg(&state->threshold_key)),
                                   __ldcg(&state->need), __ldcg(&state->tie_cut), n, layout};
}

// One radix pass of the value phase (kTiePhase false: keys are order keys) or of the tie phase
// (keys are tie keys of the elements equal to T). Block `blockIdx.x` handles chunk
// blockIdx.x % chunks of sample blockIdx.x / chunks.
template <typename scalar_t, bool kTiePhase>
__global__ void __launch_bounds__(kChunkThreads, kChunkBlocksResidentPerSm)
    chunked_histogram_kernel(const scalar_t* x, int64_t n, int64_t chunk_len, int64_t chunks, SampleKs ks,
                             int key_bits, int pass, const __grid_constant__ SampleLayout layout,
                             ChunkedSampleState* states) {
  using key_t = key_type<scalar_t>;
  ASH_SHARED(hist, unsigned[kNumBins]);
  ASH_SHARED(scratch, SelectScratch);
  const int64_t sample = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  ChunkedSampleState* state = states + sample;
  const int64_t k = ks.of(sample);
  if (k == 0 || invalid_k(k, n)) {
    // Nothing to select: the first pass stores the keep-nothing selection (see
    // SampleSelection::keep_nothing; ties = 0 makes the tie phase leave too), and every block of
    // the sample leaves every pass without arriving. The later kernels see an invalid k themselves.
    if (!kTiePhase && pass == 0 && chunk == 0 && threadIdx.x == 0) {
      state->threshold_key = static_cast<key_t>(~key_t(0));
      state->need = 0ull;
      state->ties = 0ull;
      state->tie_cut = static_cast<unsigned long long>(n);
    }
    return;
  }

  [[maybe_unused]] key_t threshold = 0;
  if constexpr (kTiePhase) {
    // Where every tie is kept there is nothing to break: all blocks of the sample leave, none
    // arrives, and the state stays as the value phase left it (tie_cut 0).
    if (!(__ldcg(&state->need) < __ldcg(&state->ties))) {
      return;
    }
    threshold = static_cast<key_t>(__ldcg(&state->threshold_key));
  }
  const DigitPass digit = digit_pass(key_bits, pass);
  const unsigned long long decided = digit.decided_mask();
  const unsigned long long prefix = __ldcg(&state->prefix);

  for (int d = static_cast<int>(threadIdx.x); d < digit.bins(); d += static_cast<int>(blockDim.x)) {
    hist[d] = 0u;
  }
  __syncthreads();
  const int64_t begin = chunk * chunk_len;
  const int64_t end = min_int64(n, begin + chunk_len);
  // The tie phase's keys need the layout's divisions: registers are short for loads ahead there.
  count_digits<kTiePhase ? 1 : kGlobalLoadsInFlight>(x + sample * n, begin, end, hist, [&](int64_t offset,
                                                                                          scalar_t value) {
    unsigned long long key;
    if constexpr (kTiePhase) {
      if (order_key(value) != threshold) {
        return kNoDigit;
      }
      key = tie_key(layout, n, offset);
    } else {
      key = order_key(value);
    }
    return (key & decided) == prefix ? digit.digit(key) : kNoDigit;
  });
  __syncthreads();
  for (int d = static_cast<int>(threadIdx.x); d < digit.bins(); d += static_cast<int>(blockDim.x)) {
    const unsigned count = hist[d];
    if (count != 0u) {
      atomicAdd(&state->hist[d], static_cast<unsigned long long>(count));
    }
  }
  if (!arrive_last(&state->arrivals, chunks)) {
    return;
  }

  // The sample's last block: its histogram is complete. Pick the bucket and advance the state.
  const unsigned long long rank = (!kTiePhase && pass == 0) ? static_cast<unsigned long long>(k)
                                                            : __ldcg(&state->rank);
  choose_bucket([&](int d) { return __ldcg(&state->hist[d]); }, digit.bins(), rank, scratch.scan,
                &scratch.choice);
  const BucketChoice choice = scratch.choice;
  for (int d = static_cast<int>(threadIdx.x); d < digit.bins(); d += static_cast<int>(blockDim.x)) {
    state->hist[d] = 0ull;  // ready for the next pass (choose_bucket's reads ended at its barrier)
  }
  if (threadIdx.x == 0) {
    const unsigned long long key = prefix | (static_cast<unsigned long long>(choice.digit) << digit.shift);
    const unsigned long long rank_in_bucket = rank - choice.above;
    const bool phase_done = pass + 1 == digit_passes(key_bits);
    if (!phase_done) {
      state->prefix = key;
      state->rank = rank_in_bucket;
    } else if (!kTiePhase) {
      state->threshold_key = key;
      state->need = rank_in_bucket;
      state->ties = choice.count;
      state->tie_cut = 0ull;
      state->prefix = 0ull;  // the tie phase starts from scratch, wanting `need` ties
      state->rank = rank_in_bucket;
    } else {
      state->tie_cut = key;
    }
    // Atomic: the other blocks' arrivals are atomics, and a plain store would race with them in
    // the memory model (nothing orders it after their RMWs but the counts this block read).
    atomicExch(&state->arrivals, 0u);
  }
}

// The sums of one chunk, then (by the sample's last block) the sample's totals in chunk order and
// the output coefficients.
template <typename scalar_t, Variant kVariant, bool kBackward>
__global__ void __launch_bounds__(kChunkThreads, kBackward ? 1 : kChunkBlocksResidentPerSm)
    chunked_sums_kernel(const scalar_t* x, const scalar_t* grad, int64_t n, int64_t chunk_len, int64_t chunks,
                        SampleKs ks, const __grid_constant__ SampleLayout layout, ChunkedSampleState* states,
                        SampleSums<acc_type<scalar_t>>* partials, AshOutput<scalar_t, kVariant, kBackward>* outputs,
                        StatsOutput<scalar_t> stats) {
  using acc_t = acc_type<scalar_t>;
  using Output = AshOutput<scalar_t, kVariant, kBackward>;
  constexpr bool kMayStoreStats = kVariant == Variant::Scale && !kBackward;
  ASH_SHARED(sum_scratch, acc_t[kMaxWarpsPerBlock]);
  const int64_t sample = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  ChunkedSampleState* state = states + sample;
  const int64_t k = ks.of(sample);
  if (invalid_k(k, n)) {
    // NaN comes later (nan_fill_kernel); no block of the sample arrives (the counter stays 0).
    // The output kernel still reads the sample's coefficients: they must be initialised.
    if (chunk == 0 && threadIdx.x == 0) {
      outputs[sample] = Output{};
      if constexpr (kMayStoreStats) {
        if (stats.wanted()) {
          stats.store_nan(sample);
        }
      }
    }
    return;
  }
  const SampleSelection<scalar_t> selection = load_selection<scalar_t>(state, n, &layout);

  const int64_t begin = chunk * chunk_len;
  const int64_t end = min_int64(n, begin + chunk_len);
  SampleSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
  if constexpr (kBackward) {
    for_each_element_pair<1>(x + sample * n, grad + sample * n, begin, end,
                          [&](int64_t offset, scalar_t value, scalar_t g) {
                            Output::add(sums, selection, offset, value, g);
                          });
  } else {
    for_each_element(x + sample * n, begin, end,
                     [&](int64_t offset, scalar_t value) { Output::add(sums, selection, offset, value, value); });
  }
  sums = block_sums<Output>(sums, sum_scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sums;
  }
  if (!arrive_last(&state->arrivals, chunks)) {
    return;
  }
  if (threadIdx.x == 0) {
    SampleSums<acc_t> total{acc_t(0), acc_t(0), acc_t(0)};
    const SampleSums<acc_t>* own = partials + sample * chunks;
    for (int64_t c = 0; c < chunks; ++c) {
      total.input += __ldcg(&own[c].input);
      total.above += __ldcg(&own[c].above);
      total.grad += __ldcg(&own[c].grad);
    }
    if constexpr (kMayStoreStats) {
      if (stats.wanted()) {
        stats.threshold[sample] = value_of_key<scalar_t>(selection.threshold);
        stats.total[sample] = total.input;
        stats.kept[sample] = Output::kept_sum(total, selection);
      }
    }
    outputs[sample] = Output::make(total, selection, k);
    // Atomic: the other blocks' arrivals are atomics, and a plain store would race with them in
    // the memory model (nothing orders it after their RMWs but the counts this block read).
    atomicExch(&state->arrivals, 0u);
  }
}

template <typename scalar_t, Variant kVariant, bool kBackward>
__global__ void __launch_bounds__(kChunkThreads, kBackward || sizeof(scalar_t) == 2 ? 1 : kChunkBlocksResidentPerSm)
    chunked_output_kernel(const scalar_t* x, const scalar_t* grad, scalar_t* out, int64_t n, int64_t chunk_len,
                          int64_t chunks, const __grid_constant__ SampleLayout layout,
                          const ChunkedSampleState* states, const AshOutput<scalar_t, kVariant, kBackward>* outputs) {
  using Output = AshOutput<scalar_t, kVariant, kBackward>;
  const int64_t sample = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = min_int64(n, begin + chunk_len);
  // A sample with an invalid k is shaped here as if nothing were kept; nan_fill_kernel overwrites
  // it afterwards (a branch for it here cost the float64 ASH-S kernel a spill).
  const SampleSelection<scalar_t> selection = load_selection<scalar_t>(states + sample, n, &layout);
  Output output{};
  if constexpr (Output::kNeedsSums) {
    output = outputs[sample];
  }
  // Each element is read and then written by the same thread, so `out` may alias `x`.
  if constexpr (kBackward) {
    map_element_pairs<1>(x + sample * n, grad + sample * n, out + sample * n, begin, end,
                      [&](int64_t offset, scalar_t value, scalar_t g) {
                        return output.backward(selection.kept(offset, value), g);
                      });
  } else if constexpr (!Output::kNeedsMaskForOutput) {
    map_elements<2>(x + sample * n, out + sample * n, begin, end,
                    [&](int64_t, scalar_t value) { return output.forward_unpruned(value); });
  } else {
    map_elements<2>(x + sample * n, out + sample * n, begin, end, [&](int64_t offset, scalar_t value) {
      return output.forward(selection.kept(offset, value), value);
    });
  }
}

// Regime 3 with per-sample ks: NaN over each sample whose k is outside [0, n], after the output
// kernel, one block per chunk as there.
template <typename scalar_t>
__global__ void __launch_bounds__(kChunkThreads, kChunkBlocksResidentPerSm)
    nan_fill_kernel(scalar_t* out, int64_t n, int64_t chunk_len, int64_t chunks, SampleKs ks) {
  const int64_t sample = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  if (invalid_k(ks.of(sample), n)) {
    const int64_t begin = chunk * chunk_len;
    fill_nan(out + sample * n, begin, min_int64(n, begin + chunk_len));
  }
}

// The clamped copy of `count` elements that regimes 2 and 3 run on: tiles of `tile` elements
// (a multiple of every pack size) go to blocks in turn. `out` may alias `x`.
template <typename scalar_t>
__global__ void __launch_bounds__(kChunkThreads, kChunkBlocksResidentPerSm)
    clamp_kernel(const scalar_t* x, scalar_t* out, int64_t count, int64_t tile, ClampBounds<scalar_t> clamp) {
  for (int64_t begin = static_cast<int64_t>(blockIdx.x) * tile; begin < count;
       begin += static_cast<int64_t>(gridDim.x) * tile) {
    map_elements(x, out, begin, min_int64(count, begin + tile), [&](int64_t, scalar_t value) { return clamp(value); });
  }
}

}  // namespace cuda_detail
}  // namespace ash_ext
