// The CUDA kernels for float64 inputs (see ash_cuda.h).
#include "cuda/ash_cuda_run.cuh"

namespace ash_ext {
namespace cuda_detail {

template void run_ash_cuda<double>(bool backward, Variant variant, const double* x, const double* grad, double* out,
                               const ShapeArgs& args, const SampleLayout& layout, const at::Tensor& like);
template void run_stats_cuda<double>(const double* x, const ShapeArgs& args, const SampleLayout& layout,
                                 double* threshold, acc_type<double>* total, acc_type<double>* kept,
                                 const at::Tensor& like);

}  // namespace cuda_detail
}  // namespace ash_ext
