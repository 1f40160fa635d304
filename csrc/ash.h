// Declarations shared by the op front end (ops.cpp) and the backends (cpu/, cuda/).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "ash_semantics.h"

namespace ash_ext {

// What a call asks of the backend beyond the tensors: how many values each sample keeps and
// how values are clamped before anything else looks at them.
struct ShapeArgs {
  // Every sample's k, when k_per_sample is null.
  int64_t k = 0;
  // One k per sample ([batch] int64, contiguous, on the tensors' device), or null. On the CPU the
  // front end has checked every value is in [0, n]. On CUDA the values are not checked (that would
  // need a host synchronisation): a sample whose k is outside [0, n] gets NaN in every output
  // element and in every statistic.
  const int64_t* k_per_sample = nullptr;
  // Forward, in-place and statistics only: every value read from x is first clamped to
  // [clamp_min, clamp_max] (the bounds rounded to x's dtype; NaN stays NaN), and the selection,
  // the sums and the output all see the clamped value. -inf / +inf leave a side open. The
  // backward is always called with clamped == false, on an x the caller has clamped already.
  bool clamped = false;
  double clamp_min = -std::numeric_limits<double>::infinity();
  double clamp_max = std::numeric_limits<double>::infinity();

  // Host-side k of sample b (CPU backends; CUDA kernels read k_per_sample on the device).
  int64_t k_of(int64_t b) const { return k_per_sample != nullptr ? k_per_sample[b] : k; }
};

// Backend contract. `x`, `out` (and `grad`, `grad_x`) are batch-outer dense with identical
// strides, described by `layout`; `out` may alias `x` (in-place). Backends write every element
// of `out`.
using ForwardKernel = void (*)(const at::Tensor& x, const at::Tensor& out, const ShapeArgs& args, Variant variant,
                               const SampleLayout& layout);
// grad_x = d(shape(x))/dx^T grad for the out-of-place op, with the selection recomputed from x
// (args.clamped is false: the front end passes the clamped x and masks the result).
using BackwardKernel = void (*)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x,
                                const ShapeArgs& args, Variant variant, const SampleLayout& layout);
// Per-sample statistics, each a contiguous [batch] tensor on x's device: `threshold` (x's dtype)
// the k-th largest value (NaN where k == 0), `total` (s1) and `kept` (s2, the sum of the k kept
// values), both in the accumulation dtype (float32, float64 for float64 inputs), summed exactly as
// that backend sums them for ASH-S.
using StatsKernel = void (*)(const at::Tensor& x, const ShapeArgs& args, const SampleLayout& layout,
                             const at::Tensor& threshold, const at::Tensor& total, const at::Tensor& kept);

void ash_forward_cpu(const at::Tensor& x, const at::Tensor& out, const ShapeArgs& args, Variant variant,
                     const SampleLayout& layout);
void ash_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, const ShapeArgs& args,
                      Variant variant, const SampleLayout& layout);
void ash_stats_cpu(const at::Tensor& x, const ShapeArgs& args, const SampleLayout& layout,
                   const at::Tensor& threshold, const at::Tensor& total, const at::Tensor& kept);

#ifdef ASH_EXT_WITH_CUDA
void ash_forward_cuda(const at::Tensor& x, const at::Tensor& out, const ShapeArgs& args, Variant variant,
                      const SampleLayout& layout);
void ash_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, const ShapeArgs& args,
                       Variant variant, const SampleLayout& layout);
void ash_stats_cuda(const at::Tensor& x, const ShapeArgs& args, const SampleLayout& layout,
                    const at::Tensor& threshold, const at::Tensor& total, const at::Tensor& kept);
#endif

// The op front end shared by every backend: checks the arguments, brings the tensors into the
// backend contract's layout (copying only where the input's layout does not allow it), and calls
// the backend kernel.
using OptionalTensor = std::optional<at::Tensor>;
using OptionalBound = std::optional<double>;
at::Tensor ash_forward(const at::Tensor& x, int64_t k, int64_t variant, const OptionalTensor& k_per_sample,
                       OptionalBound clamp_min, OptionalBound clamp_max, ForwardKernel kernel);
void ash_forward_inplace(const at::Tensor& x, int64_t k, int64_t variant, const OptionalTensor& k_per_sample,
                         OptionalBound clamp_min, OptionalBound clamp_max, ForwardKernel kernel);
at::Tensor ash_backward(const at::Tensor& grad, const at::Tensor& x, int64_t k, int64_t variant,
                        const OptionalTensor& k_per_sample, BackwardKernel kernel);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ash_stats(const at::Tensor& x, int64_t k,
                                                         const OptionalTensor& k_per_sample, OptionalBound clamp_min,
                                                         OptionalBound clamp_max, StatsKernel kernel);

// The four ops for one backend, registered in a TORCH_LIBRARY_IMPL block:
//   TORCH_LIBRARY_IMPL(ash_ext, CPU, m) { BackendOps<&forward, &backward, &stats>::register_impls(m); }
template <ForwardKernel Forward, BackwardKernel Backward, StatsKernel Stats>
struct BackendOps {
  static at::Tensor ash(const at::Tensor& x, int64_t k, int64_t variant, const OptionalTensor& k_per_sample,
                        OptionalBound clamp_min, OptionalBound clamp_max) {
    return ash_forward(x, k, variant, k_per_sample, clamp_min, clamp_max, Forward);
  }
  static void ash_inplace(const at::Tensor& x, int64_t k, int64_t variant, const OptionalTensor& k_per_sample,
                          OptionalBound clamp_min, OptionalBound clamp_max) {
    ash_forward_inplace(x, k, variant, k_per_sample, clamp_min, clamp_max, Forward);
  }
  static at::Tensor backward(const at::Tensor& grad, const at::Tensor& x, int64_t k, int64_t variant,
                             const OptionalTensor& k_per_sample) {
    return ash_backward(grad, x, k, variant, k_per_sample, Backward);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> stats(const at::Tensor& x, int64_t k,
                                                              const OptionalTensor& k_per_sample,
                                                              OptionalBound clamp_min, OptionalBound clamp_max) {
    return ash_stats(x, k, k_per_sample, clamp_min, clamp_max, Stats);
  }
  static void register_impls(torch::Library& m) {
    m.impl("ash", &ash);
    m.impl("ash_", &ash_inplace);
    m.impl("ash_backward", &backward);
    m.impl("topk_stats", &stats);
  }
};

}  // namespace ash_ext
