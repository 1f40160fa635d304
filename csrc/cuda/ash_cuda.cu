// CUDA backend of the ASH op: the ATen glue (device guard, dtype dispatch) and the op
// registrations for the CUDA dispatch key. The kernels are in ash_kernels.cuh, launched by
// run_ash_cuda (ash_cuda_run.cuh), compiled once per dtype in ash_cuda_<dtype>.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "ash.h"
#include "cuda/ash_cuda.h"

namespace ash_ext {

// No shortcut on k here (the old `k == 0: out.zero_()`): SCALE and topk_stats need s1 even then,
// and per-sample ks live on the device. The kernels handle k == 0 without a selection.
void ash_forward_cuda(const at::Tensor& x, const at::Tensor& out, const ShapeArgs& args, Variant variant,
                      const SampleLayout& layout) {
  TORCH_INTERNAL_ASSERT(x.is_cuda() && out.device() == x.device() && out.strides() == x.strides());
  const c10::cuda::CUDAGuard device_guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_forward_cuda", [&] {
    cuda_detail::run_ash_cuda<scalar_t>(/*backward=*/false, variant, x.data_ptr<scalar_t>(), nullptr,
                                        out.data_ptr<scalar_t>(), args, layout, x);
  });
}

void ash_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, const ShapeArgs& args,
                       Variant variant, const SampleLayout& layout) {
  TORCH_INTERNAL_ASSERT(x.is_cuda() && grad.device() == x.device() && grad_x.device() == x.device());
  TORCH_INTERNAL_ASSERT(grad.strides() == x.strides() && grad_x.strides() == x.strides());
  TORCH_INTERNAL_ASSERT(!args.clamped, "ash_ext: the backward is never clamped (the front end passes clamped x)");
  const c10::cuda::CUDAGuard device_guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_backward_cuda", [&] {
    cuda_detail::run_ash_cuda<scalar_t>(/*backward=*/true, variant, x.data_ptr<scalar_t>(),
                                        grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), args, layout, x);
  });
}

void ash_stats_cuda(const at::Tensor& x, const ShapeArgs& args, const SampleLayout& layout,
                    const at::Tensor& threshold, const at::Tensor& total, const at::Tensor& kept) {
  TORCH_INTERNAL_ASSERT(x.is_cuda() && threshold.device() == x.device() && total.device() == x.device() &&
                        kept.device() == x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_stats_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    cuda_detail::run_stats_cuda<scalar_t>(x.data_ptr<scalar_t>(), args, layout, threshold.data_ptr<scalar_t>(),
                                          total.data_ptr<acc_t>(), kept.data_ptr<acc_t>(), x);
  });
}

TORCH_LIBRARY_IMPL(ash_ext, CUDA, m) {
  BackendOps<&ash_forward_cuda, &ash_backward_cuda, &ash_stats_cuda>::register_impls(m);
}

}  // namespace ash_ext
