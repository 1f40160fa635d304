// The CUDA kernels for float16 inputs (see ash_cuda.h).
#include "cuda/ash_cuda_run.cuh"

namespace ash_ext {
namespace cuda_detail {

template void run_ash_cuda<c10::Half>(bool backward, Variant variant, const c10::Half* x, const c10::Half* grad,
                                      c10::Half* out, int64_t k, const SampleLayout& layout, const at::Tensor& like);

}  // namespace cuda_detail
}  // namespace ash_ext
