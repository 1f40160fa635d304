// The CUDA kernels for float32 inputs (see ash_cuda.h).
#include "cuda/ash_cuda_run.cuh"

namespace ash_ext {
namespace cuda_detail {

template void run_ash_cuda<float>(bool backward, Variant variant, const float* x, const float* grad, float* out,
                               const ShapeArgs& args, const SampleLayout& layout, const at::Tensor& like);
template void run_stats_cuda<float>(const float* x, const ShapeArgs& args, const SampleLayout& layout,
                                 float* threshold, acc_type<float>* total, acc_type<float>* kept,
                                 const at::Tensor& like);

}  // namespace cuda_detail
}  // namespace ash_ext
