// The CUDA kernels for float16 inputs (see ash_cuda.h).
#include "cuda/ash_cuda_run.cuh"

namespace ash_ext {
namespace cuda_detail {

template void run_ash_cuda<c10::Half>(bool backward, Variant variant, const c10::Half* x, const c10::Half* grad, c10::Half* out,
                               const ShapeArgs& args, const SampleLayout& layout, const at::Tensor& like);
template void run_stats_cuda<c10::Half>(const c10::Half* x, const ShapeArgs& args, const SampleLayout& layout,
                                 c10::Half* threshold, acc_type<c10::Half>* total, acc_type<c10::Half>* kept,
                                 const at::Tensor& like);

}  // namespace cuda_detail
}  // namespace ash_ext
