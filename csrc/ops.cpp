// The ash_ext op schemas and the front end every backend shares. Nothing here depends on a
// backend, so that any set of backends links with it (the CUDA emulation links it with the
// emulated backend alone); the Python module of the real build is in python_module.cpp.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "ash.h"

namespace ash_ext {
namespace {

int64_t sample_numel(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d) {
    n *= x.size(d);
  }
  return n;
}

void check_input(const at::Tensor& x, int64_t k, int64_t variant) {
  TORCH_CHECK_VALUE(x.dim() >= 2,
                    "ash_ext: the input must have at least 2 dimensions (batch, features...), got a ",
                    x.dim(), "-D tensor of shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "ash_ext: the input must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t n = sample_numel(x);
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "ash_ext: k (the number of values kept per sample) must be in [0, ", n,
                    "] for samples of ", n, " elements, got ", k);
  TORCH_CHECK_VALUE(variant >= 0 && variant <= 2,
                    "ash_ext: variant must be 0 (ASH-P), 1 (ASH-B) or 2 (ASH-S), got ", variant);
}

// Whether every sample is a dense block of n elements at offset b * n (any order inside).
bool is_batch_outer_dense(const at::Tensor& t) {
  const int64_t n = sample_numel(t);
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == n);
}

// Describes a batch-outer dense tensor's samples. Returns false where a permuted layout has more
// sample dimensions than the backends' fixed-size description holds.
bool describe_layout(const at::Tensor& t, SampleLayout* layout) {
  layout->batch = t.size(0);
  layout->n = sample_numel(t);
  layout->permuted = false;
  layout->ndim = 0;
  // Row-major strides of the sample dimensions, skipping size-1 dims whose strides mean nothing.
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) {
      layout->permuted = true;
    }
    expected *= t.size(d);
  }
  if (!layout->permuted) {
    return true;
  }
  int64_t logical_stride = 1;
  int kept_dims = 0;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1) {
      ++kept_dims;
    }
  }
  if (kept_dims > kMaxSampleDims) {
    return false;
  }
  int slot = kept_dims - 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) == 1) {
      continue;
    }
    layout->sizes[slot] = t.size(d);
    layout->mem_strides[slot] = t.stride(d);
    layout->logical_strides[slot] = logical_stride;
    logical_stride *= t.size(d);
    --slot;
  }
  layout->ndim = kept_dims;
  return true;
}

bool usable_layout(const at::Tensor& t, SampleLayout* layout) {
  return is_batch_outer_dense(t) && describe_layout(t, layout);
}

}  // namespace

at::Tensor ash_forward(const at::Tensor& x, int64_t k, int64_t variant, ForwardKernel kernel) {
  check_input(x, k, variant);
  const c10::OptionalDeviceGuard guard(x.device());
  // empty_like keeps a dense input's strides (channels_last in, channels_last out); the fake
  // implementation in Python makes the same choice, so compiled graphs see the real strides.
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) {
    return out;
  }
  const auto v = static_cast<Variant>(variant);
  SampleLayout layout;
  if (x.strides() == out.strides() && usable_layout(x, &layout)) {
    kernel(x, out, k, v, layout);
  } else if (usable_layout(out, &layout)) {
    // A non-dense input (a slice, an expanded view): one copy into the output's layout.
    at::Tensor staged = at::empty_like(out);
    staged.copy_(x);
    kernel(staged, out, k, v, layout);
  } else {
    // A dense layout whose batch dimension is not outermost: work on contiguous copies.
    at::Tensor staged = x.contiguous();
    at::Tensor result = at::empty_like(staged);
    TORCH_INTERNAL_ASSERT(usable_layout(staged, &layout));
    kernel(staged, result, k, v, layout);
    out.copy_(result);
  }
  return out;
}

void ash_forward_inplace(const at::Tensor& x, int64_t k, int64_t variant, ForwardKernel kernel) {
  check_input(x, k, variant);
  TORCH_CHECK_VALUE(at::has_internal_overlap(x) != at::MemOverlap::Yes,
                    "ash_ext: inplace=True needs an input whose elements do not share memory "
                    "(an expanded tensor cannot be written in place); use inplace=False");
  const c10::OptionalDeviceGuard guard(x.device());
  if (x.numel() == 0) {
    return;
  }
  const auto v = static_cast<Variant>(variant);
  SampleLayout layout;
  if (usable_layout(x, &layout)) {
    kernel(x, x, k, v, layout);  // each backend reads a sample fully before writing it
  } else {
    at::Tensor staged = x.contiguous();
    TORCH_INTERNAL_ASSERT(usable_layout(staged, &layout));
    kernel(staged, staged, k, v, layout);
    x.copy_(staged);
  }
}

at::Tensor ash_backward(const at::Tensor& grad, const at::Tensor& x, int64_t k, int64_t variant,
                        BackwardKernel kernel) {
  check_input(x, k, variant);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "ash_ext: the gradient's shape ", grad.sizes(),
                    " differs from the input's ", x.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "ash_ext: the gradient's dtype ", grad.scalar_type(),
                   " differs from the input's ", x.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == x.device(), "ash_ext: the gradient is on ", grad.device(),
                    " but the input is on ", x.device());
  const c10::OptionalDeviceGuard guard(x.device());
  at::Tensor x_staged = x;
  SampleLayout layout;
  if (!usable_layout(x_staged, &layout)) {
    x_staged = x.contiguous();
    TORCH_INTERNAL_ASSERT(usable_layout(x_staged, &layout));
  }
  // The result takes x's layout where the backend can write it directly (the fake
  // implementation promises empty_like(x)); otherwise it is computed contiguous and copied.
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) {
    return grad_x;
  }
  at::Tensor result = grad_x.strides() == x_staged.strides() ? grad_x : at::empty_like(x_staged);
  at::Tensor grad_staged = grad;
  if (grad.strides() != x_staged.strides()) {
    grad_staged = at::empty_like(x_staged);
    grad_staged.copy_(grad);
  }
  kernel(grad_staged, x_staged, result, k, static_cast<Variant>(variant), layout);
  if (!result.is_same(grad_x)) {
    grad_x.copy_(result);
  }
  return grad_x;
}

TORCH_LIBRARY(ash_ext, m) {
  m.def("ash(Tensor x, int k, int variant) -> Tensor");
  m.def("ash_(Tensor(a!) x, int k, int variant) -> ()");
  m.def("ash_backward(Tensor grad, Tensor x, int k, int variant) -> Tensor");
}

}  // namespace ash_ext
