// The CUDA kernels for bfloat16 inputs (see ash_cuda.h).
#include "cuda/ash_cuda_run.cuh"

namespace ash_ext {
namespace cuda_detail {

template void run_ash_cuda<c10::BFloat16>(bool backward, Variant variant, const c10::BFloat16* x,
                                          const c10::BFloat16* grad, c10::BFloat16* out, int64_t k,
                                          const SampleLayout& layout, const at::Tensor& like);

}  // namespace cuda_detail
}  // namespace ash_ext
