// The entry point from the CUDA backend's ATen glue (ash_cuda.cu) into the kernels. Its
// instantiations live in one translation unit per dtype (ash_cuda_<dtype>.cu), which nvcc
// compiles in parallel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "ash_semantics.h"

namespace ash_ext {
namespace cuda_detail {

// Runs the forward (grad == nullptr) or backward op on the current device and stream, k >= 1.
// `like` is a tensor on that device (for the scratch buffers' options).
template <typename scalar_t>
void run_ash_cuda(bool backward, Variant variant, const scalar_t* x, const scalar_t* grad, scalar_t* out,
                  int64_t k, const SampleLayout& layout, const at::Tensor& like);

extern template void run_ash_cuda<float>(bool, Variant, const float*, const float*, float*, int64_t,
                                         const SampleLayout&, const at::Tensor&);
extern template void run_ash_cuda<double>(bool, Variant, const double*, const double*, double*, int64_t,
                                          const SampleLayout&, const at::Tensor&);
extern template void run_ash_cuda<c10::Half>(bool, Variant, const c10::Half*, const c10::Half*, c10::Half*,
                                             int64_t, const SampleLayout&, const at::Tensor&);
extern template void run_ash_cuda<c10::BFloat16>(bool, Variant, const c10::BFloat16*, const c10::BFloat16*,
                                                 c10::BFloat16*, int64_t, const SampleLayout&, const at::Tensor&);

}  // namespace cuda_detail
}  // namespace ash_ext
