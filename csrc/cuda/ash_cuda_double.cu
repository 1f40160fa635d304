// The CUDA kernels for float64 inputs (see ash_cuda.h).
#include "cuda/ash_cuda_run.cuh"

namespace ash_ext {
namespace cuda_detail {

template void run_ash_cuda<double>(bool backward, Variant variant, const double* x, const double* grad,
                                  double* out, int64_t k, const SampleLayout& layout, const at::Tensor& like);

}  // namespace cuda_detail
}  // namespace ash_ext
