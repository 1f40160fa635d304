// The definition of run_ash_cuda (ash_cuda.h): the kernels of ash_kernels.cuh launched on the
// current stream, with scratch memory from the caching allocator. Included only by the
// per-dtype translation units ash_cuda_<dtype>.cu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <vector>

#include "cuda/ash_cuda.h"
#include "cuda/ash_kernels.cuh"

namespace ash_ext {
namespace cuda_detail {

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

template <typename scalar_t>
void run_ash_cuda(bool backward, Variant variant, const scalar_t* x, const scalar_t* grad, scalar_t* out,
                  int64_t k, const SampleLayout& layout, const at::Tensor& like) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const DeviceLimits limits{props->multiProcessorCount, static_cast<int64_t>(props->sharedMemPerBlockOptin)};
  CudaLauncher launcher(like);
  if (backward) {
    run_variant<scalar_t, true>(launcher, limits, variant, x, grad, out, k, layout);
  } else {
    run_variant<scalar_t, false>(launcher, limits, variant, x, grad, out, k, layout);
  }
}

}  // namespace cuda_detail
}  // namespace ash_ext
