// Regime 4: a thread-block cluster per sample (sm_90 and later; launch_plan.h chooses it).
//
// Block r of a cluster of C blocks stages slice r of the sample -- elements
// [r * slice_len, min(n, (r + 1) * slice_len)) -- in its shared memory (clamped on the way where
// the op clamps), and every pass then runs on the staged slices:
//  * the radix select of the threshold (its first digit counted while staging) and, where ties
//    must be broken, of the tie cut
//    (select_sample with a ClusterHistogram: each block counts its slice, and after a cluster
//    barrier every block adds the C histograms through distributed shared memory, so that every
//    block makes the same choice);
//  * the sums: each block's over its slice in the order of for_each_element, then the C block
//    totals in rank order -- the chunked pipeline's order, with slices for chunks;
//  * the output of the slice, written once.
// So the sample is read from global memory once and written once, in one launch, whatever its
// length up to what C blocks' shared memory holds. A sample with an invalid k (per-sample ks)
// is NaN: every block of its cluster writes its slice and leaves without a barrier, touching no
// other block's memory.
#pragma once

#include "cuda/ash_kernels.cuh"
#include "cuda/cluster_ops.cuh"

namespace ash_ext {
namespace cuda_detail {

// Dynamic shared memory per block: the histogram (kNumBins counters), then the staged slice
// (the plan's shared_bytes).
template <typename scalar_t, Variant kVariant, bool kBackward>
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    cluster_kernel(const scalar_t* x, const scalar_t* grad, scalar_t* out, int64_t n, int64_t slice_len, SampleKs ks,
                   ClampBounds<scalar_t> clamp, StatsOutput<scalar_t> stats,
                   const __grid_constant__ SampleLayout layout) {
  using acc_t = acc_type<scalar_t>;
  using Output = AshOutput<scalar_t, kVariant, kBackward>;
  constexpr bool kMayStoreStats = kVariant == Variant::Scale && !kBackward;
  unsigned char* dynamic_shared = dynamic_shared_memory();
  unsigned* hist = reinterpret_cast<unsigned*>(dynamic_shared);
  scalar_t* staged = reinterpret_cast<scalar_t*>(dynamic_shared + kNumBins * sizeof(unsigned));
  ASH_SHARED(select_scratch, SelectScratch);
  ASH_SHARED(sum_scratch, acc_t[kMaxWarpsPerBlock]);
  ASH_SHARED(block_totals, SampleSums<acc_t>);  // read by the other blocks of the cluster

  const unsigned blocks = cluster_block_count();
  const unsigned rank = cluster_block_rank();
  const int64_t sample = blockIdx.x / blocks;
  const int64_t begin = static_cast<int64_t>(rank) * slice_len;
  const int64_t len = min_int64(n, begin + slice_len) - begin;  // > 0: the planner leaves no block empty
  scalar_t* slice_out = out != nullptr ? out + sample * n + begin : nullptr;  // null for topk_stats
  const scalar_t* slice_grad = kBackward ? grad + sample * n + begin : nullptr;
  const int64_t k = ks.of(sample);  // the same for the whole cluster: every branch on it is uniform
  if (invalid_k(k, n)) {
    if constexpr (kMayStoreStats) {
      if (stats.wanted()) {
        if (rank == 0 && threadIdx.x == 0) {
          stats.store_nan(sample);
        }
        return;
      }
    }
    fill_nan(slice_out, 0, len);
    return;
  }
  // Staged with the first radix digit counted on the way (see select_sample), clamped first where
  // the op clamps.
  for (int d = static_cast<int>(threadIdx.x); d < kNumBins; d += static_cast<int>(blockDim.x)) {
    hist[d] = 0u;
  }
  __syncthreads();
  if (!kBackward && clamp.enabled) {
    stage_and_count_first_digit<4>(x + sample * n + begin, staged, len, clamp, hist);
  } else {
    stage_and_count_first_digit<4>(x + sample * n + begin, staged, len, [](scalar_t v) { return v; }, hist);
  }
  __syncthreads();
  const SampleSelection<scalar_t> selection =
      k == 0 ? SampleSelection<scalar_t>::keep_nothing(n, &layout)
             : select_sample<1>(static_cast<const scalar_t*>(staged), begin, len, n, k, layout,
                                ClusterHistogram{hist, blocks}, select_scratch, /*first_digit_counted=*/true);
  Output output{};
  if constexpr (Output::kNeedsSums) {
    SampleSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
    if constexpr (kBackward) {
      for_each_element_pair<1>(static_cast<const scalar_t*>(staged), slice_grad, 0, len,
                               [&](int64_t i, scalar_t value, scalar_t g) {
                                 Output::add(sums, selection, begin + i, value, g);
                               });
    } else {
      for_each_element<1>(static_cast<const scalar_t*>(staged), 0, len, [&](int64_t i, scalar_t value) {
        Output::add(sums, selection, begin + i, value, value);
      });
    }
    sums = block_sums<Output>(sums, sum_scratch);
    if (threadIdx.x == 0) {
      block_totals = sums;
    }
    cluster_sync();  // every block's totals are written
    SampleSums<acc_t> total{acc_t(0), acc_t(0), acc_t(0)};
    for (unsigned r = 0; r < blocks; ++r) {
      if constexpr (Output::kNeedsInputSum) {
        total.input += cluster_read(&block_totals.input, r);
      }
      if constexpr (Output::kNeedsAboveSum) {
        total.above += cluster_read(&block_totals.above, r);
      }
      if constexpr (Output::kNeedsGradSum) {
        total.grad += cluster_read(&block_totals.grad, r);
      }
    }
    cluster_sync();  // no block leaves (or its totals go) before every block has read them
    if constexpr (kMayStoreStats) {
      if (stats.wanted()) {
        if (rank == 0 && threadIdx.x == 0) {
          stats.threshold[sample] = value_of_key<scalar_t>(selection.threshold);
          stats.total[sample] = total.input;
          stats.kept[sample] = Output::kept_sum(total, selection);
        }
        return;
      }
    }
    output = Output::make(total, selection, k);
  }
  // Each block writes its own slice from its staged copy; every global read of the sample
  // happened in the staging, so in-place output is safe.
  const scalar_t* slice = staged;
  if constexpr (kBackward) {
    map_element_pairs<1>(slice, slice_grad, slice_out, 0, len, [&](int64_t i, scalar_t value, scalar_t g) {
      return output.backward(selection.kept(begin + i, value), g);
    });
  } else if constexpr (!Output::kNeedsMaskForOutput) {
    map_elements<1>(slice, slice_out, 0, len, [&](int64_t, scalar_t value) { return output.forward_unpruned(value); });
  } else {
    map_elements<1>(slice, slice_out, 0, len, [&](int64_t i, scalar_t value) {
      return output.forward(selection.kept(begin + i, value), value);
    });
  }
}

}  // namespace cuda_detail
}  // namespace ash_ext
