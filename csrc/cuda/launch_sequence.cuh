// The launch sequence of the ASH CUDA kernels (ash_kernels.cuh, cluster_kernel.cuh): from the
// plan (launch_plan.h), the kernels each regime launches, in order, on the op's stream.
//
// run_ash is generic over a Launcher, so that the very same kernels and sequence also run under
// the CPU emulator in tests/emulation (which defines ASH_EXT_CUDA_EMULATION and provides its own
// <cuda_runtime.h>). A Launcher provides
//   void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_bytes,
//               Args... args);        // on the op's stream, checked
//   void launch_cluster(void (*kernel)(Params...), unsigned grid, unsigned cluster_blocks,
//               unsigned block, size_t shared_bytes, Args... args);  // the same, in clusters
//   void* scratch(int64_t bytes, bool zeroed);  // device memory that outlives the launches
#pragma once

#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>

#include "cuda/ash_kernels.cuh"
#include "cuda/cluster_kernel.cuh"
#include "cuda/launch_plan.h"

namespace ash_ext {
namespace cuda_detail {

static_assert(AshOutput<float, Variant::Prune, false>::kNeedsSums == needs_sums_pass(Variant::Prune) &&
                  AshOutput<float, Variant::Binarize, true>::kNeedsSums == needs_sums_pass(Variant::Binarize) &&
                  AshOutput<float, Variant::Scale, false>::kNeedsSums == needs_sums_pass(Variant::Scale) &&
                  AshOutput<float, Variant::ScaleUnpruned, true>::kNeedsSums ==
                      needs_sums_pass(Variant::ScaleUnpruned) &&
                  AshOutput<float, Variant::Prune, true>::kNeedsSums == needs_sums_pass(Variant::Prune),
              "the planner's traffic model (planned_traffic) must know which variants run a sums pass");

// The clamp-pass tiles: 8 packs of 16 bytes per thread of a block.
constexpr int64_t kClampTileBytes = int64_t(kChunkThreads) * 8 * 16;

// Runs ASH (kBackward: its backward; grad is then non-null) on every sample, or, where
// stats.wanted() (kVariant ASH-S, forward, out null), topk_stats, in the regime plan_launch
// picks for the shape (or the one `request` forces).
template <typename scalar_t, Variant kVariant, bool kBackward, typename Launcher>
void run_ash(Launcher& launcher, const DeviceLimits& limits, const scalar_t* x, const scalar_t* grad, scalar_t* out,
             SampleKs ks, ClampBounds<scalar_t> clamp, StatsOutput<scalar_t> stats, const SampleLayout& layout,
             RegimeRequest request) {
  using acc_t = acc_type<scalar_t>;
  using Output = AshOutput<scalar_t, kVariant, kBackward>;
  const int64_t batch = layout.batch;
  const int64_t n = layout.n;
  const bool want_stats = stats.threshold != nullptr;
  TORCH_INTERNAL_ASSERT(!want_stats || (kVariant == Variant::Scale && !kBackward));
  TORCH_INTERNAL_ASSERT(!(kBackward && clamp.enabled), "ash_ext: the backward is never clamped");
  const LaunchPlan plan = plan_launch(batch, n, static_cast<int64_t>(sizeof(scalar_t)), limits, request);
  const bool stages = plan.regime == Regime::kOnChip || plan.regime == Regime::kCluster;
  if (clamp.enabled && !stages) {
    // Regimes 2 and 3 read the input in every pass (1 and 4 clamp while staging): they run on a clamped copy instead (the
    // output itself where there is one, which is then shaped in place).
    const int64_t count = batch * n;
    scalar_t* clamped = want_stats ? static_cast<scalar_t*>(launcher.scratch(
                                         count * static_cast<int64_t>(sizeof(scalar_t)), /*zeroed=*/false))
                                   : out;
    const int64_t tile = kClampTileBytes / static_cast<int64_t>(sizeof(scalar_t));
    const int64_t grid = min_int64(ceil_div(count, tile), kChunkBlocksPerSm * limits.sm_count);
    launcher.launch(&clamp_kernel<scalar_t>, static_cast<unsigned>(grid), static_cast<unsigned>(kChunkThreads), 0,
                    x, clamped, count, tile, clamp);
    x = clamped;
    clamp.enabled = false;
  }
  // Kernels 1 and 2 loop over samples when there are more than one launch's blocks.
  const unsigned sample_grid = static_cast<unsigned>(batch < INT_MAX ? batch : INT_MAX);
  if (plan.regime == Regime::kOnChip) {
    launcher.launch(&sample_per_block_kernel<scalar_t, kVariant, kBackward, true>, sample_grid,
                    static_cast<unsigned>(plan.threads), plan.shared_bytes, x, grad, out, batch, n, ks, clamp, stats,
                    layout);
    return;
  }
  if (plan.regime == Regime::kCluster) {
    launcher.launch_cluster(&cluster_kernel<scalar_t, kVariant, kBackward>, static_cast<unsigned>(batch * plan.chunks),
                            static_cast<unsigned>(plan.chunks), static_cast<unsigned>(plan.threads), plan.shared_bytes,
                            x, grad, out, n, plan.chunk_len, ks, clamp, stats, layout);
    return;
  }
  if (plan.regime == Regime::kBlockPerSample) {
    launcher.launch(&sample_per_block_kernel<scalar_t, kVariant, kBackward, false>, sample_grid,
                    static_cast<unsigned>(plan.threads), plan.shared_bytes, x, grad, out, batch, n, ks, clamp, stats,
                    layout);
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
    launcher.launch(&chunked_histogram_kernel<scalar_t, false>, grid, threads, 0, x, n, chunk_len, chunks, ks,
                    value_bits, pass, layout, states);
  }
  const int tie_bits = tie_key_bits(n);
  for (int pass = 0; pass < digit_passes(tie_bits); ++pass) {
    launcher.launch(&chunked_histogram_kernel<scalar_t, true>, grid, threads, 0, x, n, chunk_len, chunks, ks,
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
                    chunks, ks, layout, states, partials, outputs, stats);
  }
  if (want_stats) {
    return;  // topk_stats writes no output
  }
  launcher.launch(&chunked_output_kernel<scalar_t, kVariant, kBackward>, grid, threads, 0, x, grad, out, n,
                  chunk_len, chunks, layout, states, static_cast<const Output*>(outputs));
  if (ks.per_sample != nullptr) {
    launcher.launch(&nan_fill_kernel<scalar_t>, grid, threads, 0, out, n, chunk_len, chunks, ks);
  }
}

// What run_variant and run_stats take from the op's ShapeArgs (ash.h), in device terms.
template <typename scalar_t>
ClampBounds<scalar_t> clamp_bounds(bool clamped, double clamp_min, double clamp_max) {
  return ClampBounds<scalar_t>{clamped, clamp_bound<scalar_t>(clamp_min), clamp_bound<scalar_t>(clamp_max)};
}

template <typename scalar_t, bool kBackward, typename Launcher>
void run_variant(Launcher& launcher, const DeviceLimits& limits, Variant variant, const scalar_t* x,
                 const scalar_t* grad, scalar_t* out, SampleKs ks, ClampBounds<scalar_t> clamp,
                 const SampleLayout& layout, RegimeRequest request) {
  const StatsOutput<scalar_t> no_stats{nullptr, nullptr, nullptr};
  switch (variant) {
    case Variant::Prune:
      run_ash<scalar_t, Variant::Prune, kBackward>(launcher, limits, x, grad, out, ks, clamp, no_stats, layout, request);
      return;
    case Variant::Binarize:
      run_ash<scalar_t, Variant::Binarize, kBackward>(launcher, limits, x, grad, out, ks, clamp, no_stats, layout, request);
      return;
    case Variant::Scale:
      run_ash<scalar_t, Variant::Scale, kBackward>(launcher, limits, x, grad, out, ks, clamp, no_stats, layout, request);
      return;
    case Variant::ScaleUnpruned:
      run_ash<scalar_t, Variant::ScaleUnpruned, kBackward>(launcher, limits, x, grad, out, ks, clamp, no_stats,
                                                           layout, request);
      return;
  }
  TORCH_INTERNAL_ASSERT(false, "ash_ext: unknown variant ", static_cast<int64_t>(variant));
}

// topk_stats: ASH-S's forward kernels up to its sums (the very code and order of its factor),
// storing threshold, s1 and s2 instead of shaping.
template <typename scalar_t, typename Launcher>
void run_stats(Launcher& launcher, const DeviceLimits& limits, const scalar_t* x, SampleKs ks,
               ClampBounds<scalar_t> clamp, StatsOutput<scalar_t> stats, const SampleLayout& layout,
               RegimeRequest request) {
  run_ash<scalar_t, Variant::Scale, false>(launcher, limits, x, nullptr, nullptr, ks, clamp, stats, layout, request);
}

}  // namespace cuda_detail
}  // namespace ash_ext
