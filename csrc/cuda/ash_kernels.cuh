// The ASH CUDA kernels and their launch sequence.
//
// Every sample is handled by a radix select over its order-preserving keys (radix_select.cuh),
// 11 bits per pass, that yields the threshold key T, `need` (how many elements equal to T are
// kept) and the number of such ties. Where need < ties, a second radix select over the ties'
// logical indices finds the cut that keeps the `need` ties with the smallest logical index. Then
// the sums the variant needs are formed in a fixed order, and one pass writes the output.
//
// Three regimes, chosen on the host from the shape alone (plan_launch, launch_plan.h):
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
//     only, and nothing waits for the host, so the op can be captured in a CUDA graph.
//
// The launch sequence (run_ash) is generic over a Launcher, so that the very same kernels and
// sequence also run under the CPU emulator in tests/emulation (which defines
// ASH_EXT_CUDA_EMULATION and provides its own <cuda_runtime.h>).
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
  static constexpr bool kNeedsInputSum =
      kVariant == Variant::Scale || (kVariant == Variant::Binarize && !kBackward);
  static constexpr bool kNeedsAboveSum = kVariant == Variant::Scale;
  static constexpr bool kNeedsGradSum = kBackward && kVariant != Variant::Prune;
  static constexpr bool kNeedsSums = kNeedsInputSum || kNeedsAboveSum || kNeedsGradSum;

  // Forward ASH-B: s1 / k. Forward ASH-S: exp(s1 / s2). Backward ASH-B: (sum of kept g) / k.
  // Backward ASH-S: E = exp(s1 / s2).
  acc_t scale;
  acc_t kept_shift;  // backward ASH-S: G * s1 / s2^2, subtracted from a kept element's g
  acc_t everywhere;  // backward ASH-S: G / s2, added to every element
  bool prune_only;   // backward ASH-S with s2 == 0: the gradient is ASH-P's

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
      if (selection.kept(offset, x)) {
        sums.grad += kVariant == Variant::Scale ? static_cast<acc_t>(g) * x_acc : static_cast<acc_t>(g);
      }
    }
  }

  __device__ __forceinline__ static AshOutput make(const SampleSums<acc_t>& sums,
                                                   const SampleSelection<scalar_t>& selection, int64_t k) {
    AshOutput output{acc_t(1), acc_t(0), acc_t(0), false};
    if constexpr (kVariant == Variant::Binarize) {
      output.scale = (kBackward ? sums.grad : sums.input) / static_cast<acc_t>(k);
    } else if constexpr (kVariant == Variant::Scale) {
      const acc_t s1 = sums.input;
      const acc_t s2 = sums.above + static_cast<acc_t>(selection.need) *
                                        static_cast<acc_t>(value_of_key<scalar_t>(selection.threshold));
      output.scale = scale_factor(s1, s2);
      if constexpr (kBackward) {
        output.prune_only = s2 == acc_t(0);
        if (!output.prune_only) {
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

  __device__ __forceinline__ scalar_t backward(bool kept, scalar_t g) const {
    if constexpr (kVariant == Variant::Binarize) {
      return static_cast<scalar_t>(scale);
    } else {
      if (kVariant == Variant::Prune || prune_only) {
        return kept ? g : zero_value<scalar_t>();
      }
      // A non-kept element gets only the G / s2 term (also when its g is not finite).
      const acc_t own = kept ? static_cast<acc_t>(g) - kept_shift : acc_t(0);
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

// The whole selection of one sample by one block. Ends with a barrier after the last read of
// `sample`.
template <int kLoadsInFlight, typename scalar_t>
__device__ __forceinline__ SampleSelection<scalar_t> select_in_block(const scalar_t* sample, int64_t n, int64_t k,
                                                                     const SampleLayout& layout, unsigned* hist,
                                                                     SelectScratch& scratch) {
  using key_t = key_type<scalar_t>;
  constexpr int kValueKeyBits = static_cast<int>(8 * sizeof(key_t));
  const RadixSelection by_value = block_radix_select<kLoadsInFlight>(
      sample, n, kValueKeyBits, static_cast<unsigned long long>(k),
      [](int64_t, scalar_t value, unsigned long long* key) {
        *key = order_key(value);
        return true;
      },
      hist, scratch);
  SampleSelection<scalar_t> selection{static_cast<key_t>(by_value.key), by_value.rank_in_bucket, 0ull, n,
                                      &layout};
  if (by_value.rank_in_bucket < by_value.bucket_size) {
    const key_t threshold = selection.threshold;
    const RadixSelection by_index = block_radix_select<kLoadsInFlight>(
        sample, n, tie_key_bits(n), by_value.rank_in_bucket,
        [&](int64_t offset, scalar_t value, unsigned long long* key) {
          if (order_key(value) != threshold) {
            return false;
          }
          *key = tie_key(layout, n, offset);
          return true;
        },
        hist, scratch);
    selection.tie_cut = by_index.key;
  }
  return selection;
}

// kStaged (regime 1): the sample is copied to shared memory first and every later pass reads the
// copy. Otherwise (regime 2) every pass reads global memory. Dynamic shared memory: the histogram
// (kNumBins counters), then the staged sample.
template <typename scalar_t, Variant kVariant, bool kBackward, bool kStaged>
__global__ void __launch_bounds__(kMaxBlockThreads, kStaged && !kBackward ? kMinBlocksPerSmOnChip : 1)
    sample_per_block_kernel(const scalar_t* x, const scalar_t* grad, scalar_t* out, int64_t batch, int64_t n,
                            int64_t k, const __grid_constant__ SampleLayout layout) {
  using acc_t = acc_type<scalar_t>;
  using Output = AshOutput<scalar_t, kVariant, kBackward>;
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
    scalar_t* sample_out = out + b * n;
    if constexpr (kStaged) {
      __syncthreads();  // the previous sample's output pass may still be reading `staged`
      copy_to_shared(sample, staged, n);
      __syncthreads();
      sample = staged;
    }
    const SampleSelection<scalar_t> selection =
        select_in_block<kLoadsInFlight>(sample, n, k, layout, hist, select_scratch);
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
      output = Output::make(block_sums<Output>(sums, sum_scratch), selection, k);
    }
    // Every read of the sample other than the output pass's own is behind a barrier by now (the
    // selection ends with one, block_sum starts with one), so in-place output is safe: each
    // element is read and then written by the same thread.
    if constexpr (kBackward) {
      map_element_pairs<kLoadsInFlight>(sample, sample_grad, sample_out, 0, n,
                                        [&](int64_t offset, scalar_t value, scalar_t g) {
        return output.backward(selection.kept(offset, value), g);
      });
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
    chunked_histogram_kernel(const scalar_t* x, int64_t n, int64_t chunk_len, int64_t chunks, int64_t k,
                             int key_bits, int pass, const __grid_constant__ SampleLayout layout,
                             ChunkedSampleState* states) {
  using key_t = key_type<scalar_t>;
  ASH_SHARED(hist, unsigned[kNumBins]);
  ASH_SHARED(scratch, SelectScratch);
  const int64_t sample = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  ChunkedSampleState* state = states + sample;

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
                        int64_t k, const __grid_constant__ SampleLayout layout, ChunkedSampleState* states,
                        SampleSums<acc_type<scalar_t>>* partials, AshOutput<scalar_t, kVariant, kBackward>* outputs) {
  using acc_t = acc_type<scalar_t>;
  using Output = AshOutput<scalar_t, kVariant, kBackward>;
  ASH_SHARED(sum_scratch, acc_t[kMaxWarpsPerBlock]);
  const int64_t sample = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  ChunkedSampleState* state = states + sample;
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
  const SampleSelection<scalar_t> selection = load_selection<scalar_t>(states + sample, n, &layout);
  Output output{};
  if constexpr (Output::kNeedsSums) {
    output = outputs[sample];
  }
  const int64_t begin = chunk * chunk_len;
  const int64_t end = min_int64(n, begin + chunk_len);
  // Each element is read and then written by the same thread, so `out` may alias `x`.
  if constexpr (kBackward) {
    map_element_pairs<1>(x + sample * n, grad + sample * n, out + sample * n, begin, end,
                      [&](int64_t offset, scalar_t value, scalar_t g) {
                        return output.backward(selection.kept(offset, value), g);
                      });
  } else {
    map_elements<2>(x + sample * n, out + sample * n, begin, end, [&](int64_t offset, scalar_t value) {
      return output.forward(selection.kept(offset, value), value);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Launch planning and the launch sequence.

// Runs ASH (kBackward: its backward; grad is then non-null) on every sample, k >= 1. A Launcher
// provides
//   void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_bytes,
//               Args... args);        // on the op's stream, checked
//   void* scratch(int64_t bytes, bool zeroed);  // device memory that outlives the launches
template <typename scalar_t, Variant kVariant, bool kBackward, typename Launcher>
void run_ash(Launcher& launcher, const DeviceLimits& limits, const scalar_t* x, const scalar_t* grad, scalar_t* out,
             int64_t k, const SampleLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  using Output = AshOutput<scalar_t, kVariant, kBackward>;
  const int64_t batch = layout.batch;
  const int64_t n = layout.n;
  const LaunchPlan plan = plan_launch(batch, n, static_cast<int64_t>(sizeof(scalar_t)), limits);
  // Kernels 1 and 2 loop over samples when there are more than one launch's blocks.
  const unsigned sample_grid = static_cast<unsigned>(batch < INT_MAX ? batch : INT_MAX);
  if (plan.regime == Regime::kOnChip) {
    launcher.launch(&sample_per_block_kernel<scalar_t, kVariant, kBackward, true>, sample_grid,
                    static_cast<unsigned>(plan.threads), plan.shared_bytes, x, grad, out, batch, n, k, layout);
    return;
  }
  if (plan.regime == Regime::kBlockPerSample) {
    launcher.launch(&sample_per_block_kernel<scalar_t, kVariant, kBackward, false>, sample_grid,
                    static_cast<unsigned>(plan.threads), plan.shared_bytes, x, grad, out, batch, n, k, layout);
    return;
  }

  const int64_t chunk_len = plan.chunk_len;
  const int64_t chunks = plan.chunks;
  const unsigned grid = static_cast<unsigned>(batch * chunks);
  const unsigned threads = static_cast<unsigned>(plan.threads);
  auto* states = static_cast<ChunkedSampleState*>(
      launcher.scratch(batch * static_cast<int64_t>(sizeof(ChunkedSampleState)), /*zeroed=*/true));
  const int value_bits = static_cast<int>(8 * sizeof(key_type<scalar_t>));
  for (int pass = 0; pass < digit_passes(value_bits); ++pass) {
    launcher.launch(&chunked_histogram_kernel<scalar_t, false>, grid, threads, 0, x, n, chunk_len, chunks, k,
                    value_bits, pass, layout, states);
  }
  const int tie_bits = tie_key_bits(n);
  for (int pass = 0; pass < digit_passes(tie_bits); ++pass) {
    launcher.launch(&chunked_histogram_kernel<scalar_t, true>, grid, threads, 0, x, n, chunk_len, chunks, k,
                    tie_bits, pass, layout, states);
  }
  Output* outputs = nullptr;
  if constexpr (Output::kNeedsSums) {
    const int64_t partial_bytes = batch * chunks * static_cast<int64_t>(sizeof(SampleSums<acc_t>));
    const int64_t output_bytes = batch * static_cast<int64_t>(sizeof(Output));
    // Partials first: both element types' alignments divide the partials' size.
    auto* bytes = static_cast<unsigned char*>(launcher.scratch(partial_bytes + output_bytes, /*zeroed=*/false));
    auto* partials = reinterpret_cast<SampleSums<acc_t>*>(bytes);
    outputs = reinterpret_cast<Output*>(bytes + partial_bytes);
    launcher.launch(&chunked_sums_kernel<scalar_t, kVariant, kBackward>, grid, threads, 0, x, grad, n, chunk_len,
                    chunks, k, layout, states, partials, outputs);
  }
  launcher.launch(&chunked_output_kernel<scalar_t, kVariant, kBackward>, grid, threads, 0, x, grad, out, n,
                  chunk_len, chunks, layout, states, static_cast<const Output*>(outputs));
}

template <typename scalar_t, bool kBackward, typename Launcher>
void run_variant(Launcher& launcher, const DeviceLimits& limits, Variant variant, const scalar_t* x,
                 const scalar_t* grad, scalar_t* out, int64_t k, const SampleLayout& layout) {
  switch (variant) {
    case Variant::Prune:
      run_ash<scalar_t, Variant::Prune, kBackward>(launcher, limits, x, grad, out, k, layout);
      return;
    case Variant::Binarize:
      run_ash<scalar_t, Variant::Binarize, kBackward>(launcher, limits, x, grad, out, k, layout);
      return;
    case Variant::Scale:
      run_ash<scalar_t, Variant::Scale, kBackward>(launcher, limits, x, grad, out, k, layout);
      return;
  }
  TORCH_INTERNAL_ASSERT(false, "ash_ext: unknown variant ", static_cast<int64_t>(variant));
}

}  // namespace cuda_detail
}  // namespace ash_ext
