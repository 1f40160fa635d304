// CUDA backend of the ASH op: the ATen glue around the kernels of ash_kernels.cuh (dtype and
// variant dispatch, the device guard and stream, scratch memory from the caching allocator) and
// the op registrations for the CUDA dispatch key.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "ash.h"
#include "cuda/ash_kernels.cuh"

namespace ash_ext {

void ash_forward_cuda(const at::Tensor& x, const at::Tensor& out, int64_t k, Variant variant,
                      const SampleLayout& layout);
void ash_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, int64_t k,
                       Variant variant, const SampleLayout& layout);

namespace {

// Launches on the current stream of the current device; scratch comes from the caching allocator
// (stream-ordered, so releasing it when the op returns is safe, and fine under graph capture).
// Nothing here synchronises with the host.
class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Tensor& like)
      : stream_(at::cuda::getCurrentCUDAStream()), byte_options_(like.options().dtype(at::kByte)) {}

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_bytes, Args... args) {
    if (shared_bytes > kDefaultDynamicSharedLimit) {
      // A host-side setting of the kernel (no stream work), so also fine under graph capture.
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
    }
    kernel<<<grid, block, shared_bytes, stream_>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void* scratch(int64_t bytes, bool zeroed) {
    buffers_.push_back(zeroed ? at::zeros({bytes}, byte_options_) : at::empty({bytes}, byte_options_));
    return buffers_.back().data_ptr();
  }

 private:
  static constexpr size_t kDefaultDynamicSharedLimit = 48 * 1024;
  cudaStream_t stream_;
  at::TensorOptions byte_options_;
  std::vector<at::Tensor> buffers_;
};

cuda_detail::DeviceLimits current_device_limits() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return cuda_detail::DeviceLimits{props->multiProcessorCount,
                                   static_cast<int64_t>(props->sharedMemPerBlockOptin)};
}

}  // namespace

void ash_forward_cuda(const at::Tensor& x, const at::Tensor& out, int64_t k, Variant variant,
                      const SampleLayout& layout) {
  TORCH_INTERNAL_ASSERT(x.is_cuda() && out.device() == x.device() && out.strides() == x.strides());
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (k == 0) {
    out.zero_();  // nothing is kept
    return;
  }
  CudaLauncher launcher(x);
  const cuda_detail::DeviceLimits limits = current_device_limits();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_forward_cuda", [&] {
    cuda_detail::run_variant<scalar_t, false>(launcher, limits, variant, x.data_ptr<scalar_t>(), nullptr,
                                              out.data_ptr<scalar_t>(), k, layout);
  });
}

void ash_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, int64_t k,
                       Variant variant, const SampleLayout& layout) {
  TORCH_INTERNAL_ASSERT(x.is_cuda() && grad.device() == x.device() && grad_x.device() == x.device());
  TORCH_INTERNAL_ASSERT(grad.strides() == x.strides() && grad_x.strides() == x.strides());
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (k == 0) {
    grad_x.zero_();  // nothing is kept; ASH-B's gradient is 0 then too
    return;
  }
  CudaLauncher launcher(x);
  const cuda_detail::DeviceLimits limits = current_device_limits();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_backward_cuda", [&] {
    cuda_detail::run_variant<scalar_t, true>(launcher, limits, variant, x.data_ptr<scalar_t>(),
                                             grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), k, layout);
  });
}

namespace {

at::Tensor ash_cuda_op(const at::Tensor& x, int64_t k, int64_t variant) {
  return ash_forward(x, k, variant, &ash_forward_cuda);
}

void ash_inplace_cuda_op(const at::Tensor& x, int64_t k, int64_t variant) {
  ash_forward_inplace(x, k, variant, &ash_forward_cuda);
}

at::Tensor ash_backward_cuda_op(const at::Tensor& grad, const at::Tensor& x, int64_t k, int64_t variant) {
  return ash_backward(grad, x, k, variant, &ash_backward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(ash_ext, CUDA, m) {
  m.impl("ash", &ash_cuda_op);
  m.impl("ash_", &ash_inplace_cuda_op);
  m.impl("ash_backward", &ash_backward_cuda_op);
}

}  // namespace ash_ext
