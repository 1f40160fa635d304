// Declarations shared by the op front end (ops.cpp) and the backends (cpu/, cuda/).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ash_semantics.h"

namespace ash_ext {

// Backend contract. `x`, `out` (and `grad`, `grad_x`) are batch-outer dense with identical
// strides, described by `layout`; 0 <= k <= layout.n has been checked; `out` may alias `x`
// (in-place). Backends write every element of `out`.
using ForwardKernel = void (*)(const at::Tensor& x, const at::Tensor& out, int64_t k, Variant variant,
                               const SampleLayout& layout);
// grad_x = d(ash(x))/dx^T grad for the out-of-place op, with the selection recomputed from x.
using BackwardKernel = void (*)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x,
                                int64_t k, Variant variant, const SampleLayout& layout);

void ash_forward_cpu(const at::Tensor& x, const at::Tensor& out, int64_t k, Variant variant,
                     const SampleLayout& layout);
void ash_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, int64_t k,
                      Variant variant, const SampleLayout& layout);

#ifdef ASH_EXT_WITH_CUDA
void ash_forward_cuda(const at::Tensor& x, const at::Tensor& out, int64_t k, Variant variant,
                      const SampleLayout& layout);
void ash_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, int64_t k,
                       Variant variant, const SampleLayout& layout);
#endif

// The op front end shared by every backend: checks the arguments, brings the tensors into the
// backend contract's layout (copying only where the input's layout does not allow it), and calls
// the backend kernel.
at::Tensor ash_forward(const at::Tensor& x, int64_t k, int64_t variant, ForwardKernel kernel);
void ash_forward_inplace(const at::Tensor& x, int64_t k, int64_t variant, ForwardKernel kernel);
at::Tensor ash_backward(const at::Tensor& grad, const at::Tensor& x, int64_t k, int64_t variant,
                        BackwardKernel kernel);

// The three ops for one backend, registered in a TORCH_LIBRARY_IMPL block:
//   TORCH_LIBRARY_IMPL(ash_ext, CPU, m) { BackendOps<&forward, &backward>::register_impls(m); }
template <ForwardKernel Forward, BackwardKernel Backward>
struct BackendOps {
  static at::Tensor ash(const at::Tensor& x, int64_t k, int64_t variant) {
    return ash_forward(x, k, variant, Forward);
  }
  static void ash_inplace(const at::Tensor& x, int64_t k, int64_t variant) {
    ash_forward_inplace(x, k, variant, Forward);
  }
  static at::Tensor backward(const at::Tensor& grad, const at::Tensor& x, int64_t k, int64_t variant) {
    return ash_backward(grad, x, k, variant, Backward);
  }
  static void register_impls(torch::Library& m) {
    m.impl("ash", &ash);
    m.impl("ash_", &ash_inplace);
    m.impl("ash_backward", &backward);
  }
};

}  // namespace ash_ext
