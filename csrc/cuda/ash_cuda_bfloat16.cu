// The CUDA kernels for bfloat16 inputs (see ash_cuda.h).
#include "cuda/ash_cuda_run.cuh"

namespace ash_ext {
namespace cuda_detail {

template void run_ash_cuda<c10::BFloat16>(bool backward, Variant variant, const c10::BFloat16* x, const c10::BFloat16* grad, c10::BFloat16* out,
                               const ShapeArgs& args, const SampleLayout& layout, const at::Tensor& like);
template void run_stats_cuda<c10::BFloat16>(const c10::BFloat16* x, const ShapeArgs& args, const SampleLayout& layout,
                                 c10::BFloat16* threshold, acc_type<c10::BFloat16>* total, acc_type<c10::BFloat16>* kept,
                                 const at::Tensor& like);

}  // namespace cuda_detail
}  // namespace ash_ext
