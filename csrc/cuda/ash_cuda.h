// The entry points from the CUDA backend's ATen glue (ash_cuda.cu) into the kernels. Their
// instantiations live in one translation unit per dtype (ash_cuda_<dtype>.cu), which nvcc
// compiles in parallel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "ash.h"
#include "ash_semantics.h"

namespace ash_ext {
namespace cuda_detail {

// Runs the forward (grad == nullptr) or backward op on the current device and stream, with the
// ks and clamp of `args` (args.k_per_sample in device memory, read only by the kernels). `like`
// is a tensor on that device (for the scratch buffers' options).
template <typename scalar_t>
void run_ash_cuda(bool backward, Variant variant, const scalar_t* x, const scalar_t* grad, scalar_t* out,
                  const ShapeArgs& args, const SampleLayout& layout, const at::Tensor& like);

// topk_stats on the current device and stream: per sample the threshold (x's dtype) and the sums
// s1 and s2 (the accumulation type), each a [batch] array.
template <typename scalar_t>
void run_stats_cuda(const scalar_t* x, const ShapeArgs& args, const SampleLayout& layout, scalar_t* threshold,
                    acc_type<scalar_t>* total, acc_type<scalar_t>* kept, const at::Tensor& like);

#define ASH_EXT_DECLARE_CUDA_ENTRIES(scalar_t)                                                                  \
  extern template void run_ash_cuda<scalar_t>(bool, Variant, const scalar_t*, const scalar_t*, scalar_t*,      \
                                              const ShapeArgs&, const SampleLayout&, const at::Tensor&);       \
  extern template void run_stats_cuda<scalar_t>(const scalar_t*, const ShapeArgs&, const SampleLayout&,        \
                                                scalar_t*, acc_type<scalar_t>*, acc_type<scalar_t>*,           \
                                                const at::Tensor&);
ASH_EXT_DECLARE_CUDA_ENTRIES(float)
ASH_EXT_DECLARE_CUDA_ENTRIES(double)
ASH_EXT_DECLARE_CUDA_ENTRIES(c10::Half)
ASH_EXT_DECLARE_CUDA_ENTRIES(c10::BFloat16)
#undef ASH_EXT_DECLARE_CUDA_ENTRIES

}  // namespace cuda_detail
}  // namespace ash_ext
