// The ash_ext op schemas and the front end every backend shares. Nothing here depends on a
// backend, so that any set of backends links with it (the CUDA emulation links it with the
// emulated backend alone); the Python module of the real build is in python_module.cpp.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "ash.h"

namespace ash_ext {
namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// Values per sample. Only an empty batch can have more than fit in int64 (torch refuses such a
// numel otherwise): the count then saturates at kInt64Max, above every k.
int64_t sample_numel(const at::Tensor& x) {
  int64_t n = 1;
  bool saturated = false;
  for (int64_t d = 1; d < x.dim(); ++d) {
    if (x.size(d) == 0) {
      return 0;
    }
    saturated = saturated || __builtin_mul_overflow(n, x.size(d), &n);
  }
  return saturated ? kInt64Max : n;
}

// "samples of n elements" as the messages print it (the Python validator in ash_ext/_ops.py
// prints it the same way).
std::string numel_text(int64_t n) {
  return n == kInt64Max ? "at least " + std::to_string(n) : std::to_string(n);
}

// Layouts and dtypes by their Python names (torch.sparse_coo, torch.int32), as the Python
// validator names them.
const char* layout_name(at::Layout layout) {
  switch (layout) {
    case at::kStrided:
      return "torch.strided";
    case at::kSparse:
      return "torch.sparse_coo";
    case at::kSparseCsr:
      return "torch.sparse_csr";
    case at::kSparseCsc:
      return "torch.sparse_csc";
    case at::kSparseBsr:
      return "torch.sparse_bsr";
    case at::kSparseBsc:
      return "torch.sparse_bsc";
    case at::kMkldnn:
      return "torch._mkldnn";
    case at::kJagged:
      return "torch.jagged";
    default:
      return "an unknown layout";
  }
}

std::string dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

void check_strided(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "ash_ext: ", name, " must be a strided (dense) tensor, got layout ",
                   layout_name(t.layout()));
}

void check_input(const at::Tensor& x) {
  check_strided("the input", x);
  TORCH_CHECK_VALUE(x.dim() >= 2,
                    "ash_ext: the input must have at least 2 dimensions (batch, features...), got a ",
                    x.dim(), "-D tensor of shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "ash_ext: the input must be float16, bfloat16, float32 or float64, got ", dtype_name(dtype));
}

void check_variant(int64_t variant) {
  TORCH_CHECK_VALUE(variant >= 0 && variant < kVariantCount,
                    "ash_ext: variant must be 0 (ASH-P), 1 (ASH-B), 2 (ASH-S) or 3 (SCALE), got ", variant);
}

// Checks k (or the per-sample ks) and the clamp bounds, and returns them as the backends take
// them. `k_per_sample` is returned contiguous in `ks_storage`, which must outlive the call.
ShapeArgs make_args(const at::Tensor& x, int64_t k, const OptionalTensor& k_per_sample, OptionalBound clamp_min,
                    OptionalBound clamp_max, at::Tensor* ks_storage) {
  ShapeArgs args;
  const int64_t n = sample_numel(x);
  if (k_per_sample.has_value()) {
    const at::Tensor& ks = *k_per_sample;
    check_strided("k_per_sample", ks);
    TORCH_CHECK_TYPE(ks.scalar_type() == at::kLong, "ash_ext: k_per_sample must be int64, got ",
                     dtype_name(ks.scalar_type()));
    TORCH_CHECK_VALUE(ks.dim() == 1 && ks.size(0) == x.size(0), "ash_ext: k_per_sample must have shape [",
                      x.size(0), "] (one k per sample), got ", ks.sizes());
    TORCH_CHECK_VALUE(ks.device() == x.device(), "ash_ext: k_per_sample is on ", ks.device(),
                      " but the input is on ", x.device());
    *ks_storage = ks.contiguous();
    if (ks_storage->device().is_cpu() && ks_storage->numel() > 0) {
      // On the CPU the range is checked here; on CUDA that would synchronise with the host, so
      // the kernels turn a sample with k outside [0, n] into NaN instead.
      const auto [low, high] = at::aminmax(*ks_storage);
      const int64_t lowest = low.item<int64_t>();
      const int64_t highest = high.item<int64_t>();
      TORCH_CHECK_VALUE(lowest >= 0 && highest <= n, "ash_ext: every k in k_per_sample must be in [0, ", n,
                        "] for samples of ", numel_text(n), " elements, got values in [", lowest, ", ",
                        highest, "]");
    }
    args.k_per_sample = ks_storage->const_data_ptr<int64_t>();
  } else {
    TORCH_CHECK_VALUE(k >= 0 && k <= n, "ash_ext: k (the number of values kept per sample) must be in [0, ",
                      n, "] for samples of ", numel_text(n), " elements, got ", k);
    args.k = k;
  }
  if (clamp_min.has_value() || clamp_max.has_value()) {
    const double low = clamp_min.value_or(-std::numeric_limits<double>::infinity());
    const double high = clamp_max.value_or(std::numeric_limits<double>::infinity());
    TORCH_CHECK_VALUE(!std::isnan(low) && !std::isnan(high), "ash_ext: the clamp bounds must not be NaN, got [",
                      low, ", ", high, "]");
    TORCH_CHECK_VALUE(low <= high, "ash_ext: clamp_min must not exceed clamp_max, got [", low, ", ", high, "]");
    args.clamped = true;
    args.clamp_min = low;
    args.clamp_max = high;
  }
  return args;
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

// Whether no two elements of t can share memory. Every layout torch's views make (slices,
// transposes, permutes, channels_last) passes: taken by increasing stride, each dimension of size
// > 1 steps past the span of those before it. Layouts that fail (an expanded dimension, an
// overlapping as_strided view, or a rare interleaving one) are not written in place.
bool provably_non_overlapping(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) {
    return true;
  }
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions of size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) {
      dims.emplace_back(t.stride(d), t.size(d));
    }
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // the largest offset reached by the dimensions so far
  for (const auto& [stride, size] : dims) {
    if (stride <= span) {
      return false;
    }
    int64_t extent = 0;
    if (__builtin_mul_overflow(size - 1, stride, &extent) || __builtin_add_overflow(span, extent, &span)) {
      span = kInt64Max;  // no later stride can step past it
    }
  }
  return true;
}

// at::empty_like(x): a dense input's strides (channels_last in, channels_last out), else the
// layout empty_like suggests. The fake implementation in Python is empty_like(x), so compiled
// graphs see the real strides. For a dense x this is empty_like's own first case, without its
// second dispatch (about 0.4 us of a call on a [1, 2048] input).
at::Tensor output_like(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) {
    return at::empty_strided(x.sizes(), x.strides(), x.options());
  }
  return at::empty_like(x);
}

}  // namespace

at::Tensor ash_forward(const at::Tensor& x, int64_t k, int64_t variant, const OptionalTensor& k_per_sample,
                       OptionalBound clamp_min, OptionalBound clamp_max, ForwardKernel kernel) {
  check_input(x);
  check_variant(variant);
  at::Tensor ks;
  const ShapeArgs args = make_args(x, k, k_per_sample, clamp_min, clamp_max, &ks);
  const c10::OptionalDeviceGuard guard(x.device());
  at::Tensor out = output_like(x);
  if (x.numel() == 0) {
    return out;
  }
  const auto v = static_cast<Variant>(variant);
  SampleLayout layout;
  if (x.strides() == out.strides() && usable_layout(x, &layout)) {
    kernel(x, out, args, v, layout);
  } else if (usable_layout(out, &layout)) {
    // A non-dense input (a slice, an expanded view): copied once into the output, which the
    // kernel then shapes in place (every backend reads a sample fully before writing it), so
    // that no second buffer of the output's size is needed -- an expanded view of 2^31 values
    // over a tiny storage costs one output, not two.
    out.copy_(x);
    kernel(out, out, args, v, layout);
  } else {
    // A dense layout whose batch dimension is not outermost: a contiguous copy, shaped in place.
    at::Tensor staged = x.contiguous();
    TORCH_INTERNAL_ASSERT(!staged.is_same(x) && usable_layout(staged, &layout));
    kernel(staged, staged, args, v, layout);
    out.copy_(staged);
  }
  return out;
}

void ash_forward_inplace(const at::Tensor& x, int64_t k, int64_t variant, const OptionalTensor& k_per_sample,
                         OptionalBound clamp_min, OptionalBound clamp_max, ForwardKernel kernel) {
  check_input(x);
  check_variant(variant);
  at::Tensor ks;
  ShapeArgs args = make_args(x, k, k_per_sample, clamp_min, clamp_max, &ks);
  TORCH_CHECK_VALUE(x.numel() == 0 || provably_non_overlapping(x),
                    "ash_ext: inplace=True needs an input whose elements do not share memory, got sizes ", x.sizes(),
                    " and strides ", x.strides(), " (an expanded or overlapping view cannot be written in place); ",
                    "use inplace=False");
  const c10::OptionalDeviceGuard guard(x.device());
  if (x.numel() == 0) {
    return;
  }
  if (args.k_per_sample != nullptr && at::get_overlap_status(ks, x) != at::MemOverlapStatus::No) {
    // The ks share memory with x (a view of x's storage as int64): the kernel would read ks it
    // has already overwritten, so it reads a copy.
    ks = ks.clone();
    args.k_per_sample = ks.const_data_ptr<int64_t>();
  }
  const auto v = static_cast<Variant>(variant);
  SampleLayout layout;
  if (usable_layout(x, &layout)) {
    kernel(x, x, args, v, layout);  // each backend reads a sample fully before writing it
  } else {
    at::Tensor staged = x.contiguous();
    TORCH_INTERNAL_ASSERT(usable_layout(staged, &layout));
    kernel(staged, staged, args, v, layout);
    x.copy_(staged);
  }
}

at::Tensor ash_backward(const at::Tensor& grad, const at::Tensor& x, int64_t k, int64_t variant,
                        const OptionalTensor& k_per_sample, BackwardKernel kernel) {
  check_strided("the gradient", grad);
  check_input(x);
  check_variant(variant);
  at::Tensor ks;
  const ShapeArgs args = make_args(x, k, k_per_sample, std::nullopt, std::nullopt, &ks);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "ash_ext: the gradient's shape ", grad.sizes(),
                    " differs from the input's ", x.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "ash_ext: the gradient's dtype ",
                   dtype_name(grad.scalar_type()), " differs from the input's ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(grad.device() == x.device(), "ash_ext: the gradient is on ", grad.device(),
                    " but the input is on ", x.device());
  const c10::OptionalDeviceGuard guard(x.device());
  // The result takes x's layout where the backend can write it directly (the fake
  // implementation promises empty_like(x)); otherwise it is computed contiguous and copied.
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) {
    return grad_x;
  }
  at::Tensor x_staged = x;
  SampleLayout layout;
  if (!usable_layout(x_staged, &layout)) {
    x_staged = x.contiguous();
    TORCH_INTERNAL_ASSERT(usable_layout(x_staged, &layout));
  }
  at::Tensor result = grad_x.strides() == x_staged.strides() ? grad_x : at::empty_like(x_staged);
  at::Tensor grad_staged = grad;
  if (grad.strides() != x_staged.strides()) {
    grad_staged = at::empty_like(x_staged);
    grad_staged.copy_(grad);
  }
  kernel(grad_staged, x_staged, result, args, static_cast<Variant>(variant), layout);
  if (!result.is_same(grad_x)) {
    grad_x.copy_(result);
  }
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ash_stats(const at::Tensor& x, int64_t k,
                                                         const OptionalTensor& k_per_sample, OptionalBound clamp_min,
                                                         OptionalBound clamp_max, StatsKernel kernel) {
  check_input(x);
  at::Tensor ks;
  const ShapeArgs args = make_args(x, k, k_per_sample, clamp_min, clamp_max, &ks);
  const c10::OptionalDeviceGuard guard(x.device());
  const int64_t batch = x.size(0);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor threshold = at::empty({batch}, x.options());
  at::Tensor total = at::empty({batch}, x.options().dtype(acc));
  at::Tensor kept = at::empty({batch}, x.options().dtype(acc));
  if (x.numel() == 0) {
    // Empty samples (or no samples): k is 0, nothing is kept and every sum is 0.
    threshold.fill_(std::numeric_limits<double>::quiet_NaN());
    total.zero_();
    kept.zero_();
    return {threshold, total, kept};
  }
  SampleLayout layout;
  if (usable_layout(x, &layout)) {
    kernel(x, args, layout, threshold, total, kept);
  } else {
    const at::Tensor staged = x.contiguous();
    TORCH_INTERNAL_ASSERT(usable_layout(staged, &layout));
    kernel(staged, args, layout, threshold, total, kept);
  }
  return {threshold, total, kept};
}

namespace {

// The kernels of the dispatch keys of non-strided tensors (sparse, mkldnn): without them the
// dispatcher's own error would only say that the op has no kernel for that backend. They name
// the first non-strided argument, in the order of the schema.
[[noreturn]] void reject_layouts(std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors) {
    if (t != nullptr) {
      check_strided(name, *t);
    }
  }
  TORCH_CHECK_TYPE(false, "ash_ext: every tensor argument must be a strided (dense) tensor");
}

const at::Tensor* optional_ptr(const OptionalTensor& t) { return t.has_value() ? &*t : nullptr; }

at::Tensor ash_non_strided(const at::Tensor& x, int64_t, int64_t, const OptionalTensor& k_per_sample, OptionalBound,
                           OptionalBound) {
  reject_layouts({{"the input", &x}, {"k_per_sample", optional_ptr(k_per_sample)}});
}

void ash_inplace_non_strided(const at::Tensor& x, int64_t, int64_t, const OptionalTensor& k_per_sample,
                             OptionalBound, OptionalBound) {
  reject_layouts({{"the input", &x}, {"k_per_sample", optional_ptr(k_per_sample)}});
}

at::Tensor backward_non_strided(const at::Tensor& grad, const at::Tensor& x, int64_t, int64_t,
                                const OptionalTensor& k_per_sample) {
  reject_layouts({{"the gradient", &grad}, {"the input", &x}, {"k_per_sample", optional_ptr(k_per_sample)}});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stats_non_strided(const at::Tensor& x, int64_t,
                                                                 const OptionalTensor& k_per_sample, OptionalBound,
                                                                 OptionalBound) {
  reject_layouts({{"the input", &x}, {"k_per_sample", optional_ptr(k_per_sample)}});
}

void register_non_strided(torch::Library& m) {
  m.impl("ash", &ash_non_strided);
  m.impl("ash_", &ash_inplace_non_strided);
  m.impl("ash_backward", &backward_non_strided);
  m.impl("topk_stats", &stats_non_strided);
}

}  // namespace

TORCH_LIBRARY_IMPL(ash_ext, SparseCPU, m) { register_non_strided(m); }
TORCH_LIBRARY_IMPL(ash_ext, SparseCUDA, m) { register_non_strided(m); }
TORCH_LIBRARY_IMPL(ash_ext, SparseMeta, m) { register_non_strided(m); }
TORCH_LIBRARY_IMPL(ash_ext, SparseCsrCPU, m) { register_non_strided(m); }
TORCH_LIBRARY_IMPL(ash_ext, SparseCsrCUDA, m) { register_non_strided(m); }
TORCH_LIBRARY_IMPL(ash_ext, SparseCsrMeta, m) { register_non_strided(m); }
TORCH_LIBRARY_IMPL(ash_ext, MkldnnCPU, m) { register_non_strided(m); }

TORCH_LIBRARY(ash_ext, m) {
  // k_per_sample, when given, replaces k (one k per sample); the clamp bounds, when given, clamp
  // every value first (the backward takes the clamped x and no bounds).
  m.def("ash(Tensor x, int k, int variant, Tensor? k_per_sample=None, float? clamp_min=None, "
        "float? clamp_max=None) -> Tensor");
  m.def("ash_(Tensor(a!) x, int k, int variant, Tensor? k_per_sample=None, float? clamp_min=None, "
        "float? clamp_max=None) -> ()");
  m.def("ash_backward(Tensor grad, Tensor x, int k, int variant, Tensor? k_per_sample=None) -> Tensor");
  // (threshold, total, kept) per sample: see StatsKernel in ash.h.
  m.def("topk_stats(Tensor x, int k, Tensor? k_per_sample=None, float? clamp_min=None, "
        "float? clamp_max=None) -> (Tensor, Tensor, Tensor)");
}

}  // namespace ash_ext
