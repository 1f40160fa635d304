// The definition of run_ash_cuda (ash_cuda.h): the kernels of ash_kernels.cuh launched on the
// current stream, with scratch memory from the caching allocator. Included only by the
// per-dtype translation units ash_cuda_<dtype>.cu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <map>
#include <mutex>
#include <vector>

#include "cuda/ash_cuda.h"
#include "cuda/launch_sequence.cuh"
#include "cuda/kernel_setup.h"

namespace ash_ext {
namespace cuda_detail {

// Launches on the current stream of the current device; scratch comes from the caching allocator
// (stream-ordered, so releasing it when the op returns is safe, and fine under graph capture).
// Nothing here synchronises with the host; every launch is prepared and checked by
// prepare_launch (kernel_setup.h), which the emulator runs too.
class CudaLauncher {
 public:
  CudaLauncher(const at::Tensor& like, const DeviceLimits& limits)
      : stream_(at::cuda::getCurrentCUDAStream()),
        device_(like.get_device()),
        dynamic_limit_(max_dynamic_shared_bytes(limits)),
        byte_options_(like.options().dtype(at::kByte)) {}

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_bytes, Args... args) {
    prepare_launch(reinterpret_cast<const void*>(kernel), device_, grid, block, shared_bytes, dynamic_limit_);
    kernel<<<grid, block, shared_bytes, stream_>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // A launch in clusters of cluster_blocks blocks (cudaLaunchKernelEx: <<< >>> has no cluster
  // dimension); the grid is a whole number of clusters.
  template <typename... Params, typename... Args>
  void launch_cluster(void (*kernel)(Params...), unsigned grid, unsigned cluster_blocks, unsigned block,
                      size_t shared_bytes, Args... args) {
    prepare_launch(reinterpret_cast<const void*>(kernel), device_, grid, block, shared_bytes, dynamic_limit_,
                   cluster_blocks);
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(grid, 1, 1);
    config.blockDim = dim3(block, 1, 1);
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream_;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster_blocks;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void* scratch(int64_t bytes, bool zeroed) {
    buffers_.push_back(zeroed ? at::zeros({bytes}, byte_options_) : at::empty({bytes}, byte_options_));
    return buffers_.back().data_ptr();
  }

 private:
  cudaStream_t stream_;
  int device_;
  size_t dynamic_limit_;
  at::TensorOptions byte_options_;
  std::vector<at::Tensor> buffers_;
};

// Whether the cluster kernels run on the current device as sm_90 code: a build for older
// architectures only (whose PTX a Hopper would JIT) has them as trapping stubs (cluster_ops.cuh).
// Asked once per device and dtype, of this dtype's own kernel (each dtype's kernels are in a
// translation unit of their own; naming another's would compile it again here).
template <typename scalar_t>
bool cluster_kernels_compiled_for(int device) {
  static std::mutex mutex;
  static std::map<int, bool> known;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(device);
  if (found == known.end()) {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(
        &attributes, reinterpret_cast<const void*>(&cluster_kernel<scalar_t, Variant::Prune, false>)));
    found = known.emplace(device, attributes.binaryVersion >= 90).first;
  }
  return found->second;
}

// Clusters from sm_90 on, up to 16 blocks (non-portable above 8; H100 and H200 allow 16).
template <typename scalar_t>
DeviceLimits current_device_limits() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const bool clusters = props->major >= 9 && cluster_kernels_compiled_for<scalar_t>(c10::cuda::current_device());
  return DeviceLimits{props->multiProcessorCount, static_cast<int64_t>(props->sharedMemPerBlockOptin),
                      clusters ? kMaxClusterBlocks : 0};
}

template <typename scalar_t>
void run_ash_cuda(bool backward, Variant variant, const scalar_t* x, const scalar_t* grad, scalar_t* out,
                  const ShapeArgs& args, const SampleLayout& layout, const at::Tensor& like) {
  const DeviceLimits limits = current_device_limits<scalar_t>();
  const RegimeRequest request = regime_request_from_env();
  CudaLauncher launcher(like, limits);
  const SampleKs ks{args.k_per_sample, args.k};
  const ClampBounds<scalar_t> clamp = clamp_bounds<scalar_t>(args.clamped, args.clamp_min, args.clamp_max);
  if (backward) {
    run_variant<scalar_t, true>(launcher, limits, variant, x, grad, out, ks, clamp, layout, request);
  } else {
    run_variant<scalar_t, false>(launcher, limits, variant, x, grad, out, ks, clamp, layout, request);
  }
}

template <typename scalar_t>
void run_stats_cuda(const scalar_t* x, const ShapeArgs& args, const SampleLayout& layout, scalar_t* threshold,
                    acc_type<scalar_t>* total, acc_type<scalar_t>* kept, const at::Tensor& like) {
  const DeviceLimits limits = current_device_limits<scalar_t>();
  CudaLauncher launcher(like, limits);
  run_stats<scalar_t>(launcher, limits, x, SampleKs{args.k_per_sample, args.k},
                      clamp_bounds<scalar_t>(args.clamped, args.clamp_min, args.clamp_max),
                      StatsOutput<scalar_t>{threshold, total, kept}, layout, regime_request_from_env());
}

}  // namespace cuda_detail
}  // namespace ash_ext
