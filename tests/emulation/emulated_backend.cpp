// The CUDA backend's kernels and launch sequence (csrc/cuda/ash_kernels.cuh), run on the CPU by
// the emulator in shim/cuda_runtime.h and registered as the ash_ext ops' CPU implementation.
//
// Built together with csrc/ops.cpp (the op schemas and the shared front end) into a module of
// its own, so it must never be loaded in a process that has also loaded ash_ext._C: the
// ash_ext namespace can be defined only once. run_emulation.py takes care of that.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "ash.h"
#include "cuda/launch_sequence.cuh"
#include "cuda/kernel_setup.h"

namespace {

using namespace ash_ext;

cuda_detail::DeviceLimits g_limits{132, 227 * 1024};
int g_device = 0;  // a new emulated device for every set_device_limits
std::vector<std::string> g_launch_log;

// The emulated twin of CudaLauncher (csrc/cuda/ash_cuda_run.cuh): the same prepare_launch
// (kernel_setup.h) over the shim's runtime calls, then the grid on the emulator, which checks
// the launch rules itself.
class EmulatedLauncher {
 public:
  explicit EmulatedLauncher(const at::Tensor& like)
      : dynamic_limit_(cuda_detail::max_dynamic_shared_bytes(g_limits)),
        byte_options_(like.options().dtype(at::kByte)) {}

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_bytes, Args... args) {
    const void* entry = reinterpret_cast<const void*>(kernel);
    cuda_detail::prepare_launch(entry, g_device, grid, block, shared_bytes, dynamic_limit_);
    g_launch_log.push_back(std::to_string(grid) + "x" + std::to_string(block) + "+" + std::to_string(shared_bytes));
    emu::Runtime::get().run_grid(entry, grid, block, shared_bytes, [&] { kernel(args...); });
  }

  template <typename... Params, typename... Args>
  void launch_cluster(void (*kernel)(Params...), unsigned grid, unsigned cluster_blocks, unsigned block,
                      size_t shared_bytes, Args... args) {
    const void* entry = reinterpret_cast<const void*>(kernel);
    cuda_detail::prepare_launch(entry, g_device, grid, block, shared_bytes, dynamic_limit_, cluster_blocks);
    g_launch_log.push_back(std::to_string(grid) + "x" + std::to_string(block) + "+" + std::to_string(shared_bytes) +
                           " cluster " + std::to_string(cluster_blocks));
    emu::Runtime::get().run_grid(entry, grid, block, shared_bytes, [&] { kernel(args...); }, cluster_blocks);
  }

  // "Uninitialised" scratch is filled with a pattern, so that reliance on zeros shows up.
  void* scratch(int64_t bytes, bool zeroed) {
    buffers_.push_back(zeroed ? at::zeros({bytes}, byte_options_) : at::full({bytes}, 0xA5, byte_options_));
    return buffers_.back().data_ptr();
  }

 private:
  size_t dynamic_limit_;
  at::TensorOptions byte_options_;
  std::vector<at::Tensor> buffers_;
};

// fn(scalar_t{}) for x's dtype. ASH_EMU_SKIP_HALF, _BFLOAT16 and _DOUBLE leave those dtypes'
// kernels out of the build (each dtype is a quarter of the build time), for the sanitizer and
// planted-bug runs that check fewer dtypes.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
#ifndef ASH_EMU_SKIP_HALF
    case at::kHalf:
      return fn(c10::Half{});
#endif
#ifndef ASH_EMU_SKIP_BFLOAT16
    case at::kBFloat16:
      return fn(c10::BFloat16{});
#endif
#ifndef ASH_EMU_SKIP_DOUBLE
    case at::kDouble:
      return fn(double{});
#endif
    default:
      TORCH_CHECK(false, "this emulation build has no kernels for ", dtype);
  }
}

// As ash_cuda.cu: no host-side shortcut on k; the kernels read per-sample ks themselves (here
// from the CPU tensor the front end passes, which stands in for device memory).
void forward_emulated(const at::Tensor& x, const at::Tensor& out, const ShapeArgs& args, Variant variant,
                      const SampleLayout& layout) {
  EmulatedLauncher launcher(x);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    cuda_detail::run_variant<scalar_t, false>(
        launcher, g_limits, variant, x.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(),
        cuda_detail::SampleKs{args.k_per_sample, args.k},
        cuda_detail::clamp_bounds<scalar_t>(args.clamped, args.clamp_min, args.clamp_max), layout,
        cuda_detail::regime_request_from_env());
  });
}

void backward_emulated(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, const ShapeArgs& args,
                       Variant variant, const SampleLayout& layout) {
  TORCH_INTERNAL_ASSERT(!args.clamped);
  EmulatedLauncher launcher(x);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    cuda_detail::run_variant<scalar_t, true>(
        launcher, g_limits, variant, x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
        cuda_detail::SampleKs{args.k_per_sample, args.k},
        cuda_detail::clamp_bounds<scalar_t>(false, args.clamp_min, args.clamp_max), layout,
        cuda_detail::regime_request_from_env());
  });
}

void stats_emulated(const at::Tensor& x, const ShapeArgs& args, const SampleLayout& layout,
                    const at::Tensor& threshold, const at::Tensor& total, const at::Tensor& kept) {
  EmulatedLauncher launcher(x);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    cuda_detail::run_stats<scalar_t>(
        launcher, g_limits, x.data_ptr<scalar_t>(), cuda_detail::SampleKs{args.k_per_sample, args.k},
        cuda_detail::clamp_bounds<scalar_t>(args.clamped, args.clamp_min, args.clamp_max),
        cuda_detail::StatsOutput<scalar_t>{threshold.data_ptr<scalar_t>(), total.data_ptr<acc_t>(),
                                           kept.data_ptr<acc_t>()},
        layout, cuda_detail::regime_request_from_env());
  });
}

// max_cluster_blocks 0: a device before sm_90 (no clusters).
void set_device_limits(int64_t sm_count, int64_t shared_bytes_per_block, int64_t max_cluster_blocks) {
  g_limits = cuda_detail::DeviceLimits{sm_count, shared_bytes_per_block, max_cluster_blocks};
  emu::Runtime::get().select_device(++g_device, static_cast<size_t>(shared_bytes_per_block), max_cluster_blocks > 0);
}

// The regime the CUDA backend picks for `batch` samples of n elements (ASH_EXT_CUDA_REGIME
// honoured): (regime, threads, dynamic shared bytes, chunk length, chunks), regime 0 on chip,
// 1 block per sample, 2 chunked, 3 cluster (chunk length: slice length; chunks: cluster blocks).
std::vector<int64_t> plan(int64_t batch, int64_t n, int64_t element_bytes) {
  const cuda_detail::LaunchPlan p =
      cuda_detail::plan_launch(batch, n, element_bytes, g_limits, cuda_detail::regime_request_from_env());
  return {static_cast<int64_t>(p.regime), p.threads, static_cast<int64_t>(p.shared_bytes), p.chunk_len, p.chunks};
}

// The plan's launches and tensor-data bytes read and written (planned_traffic, launch_plan.h)
// for that work and those sample counts.
std::vector<int64_t> planned_traffic(int64_t batch, int64_t n, int64_t element_bytes, int64_t variant, bool backward,
                                     bool clamped, bool per_sample_k, bool stats, int64_t tied, int64_t empty,
                                     int64_t invalid) {
  namespace cd = cuda_detail;
  const cd::LaunchPlan p = cd::plan_launch(batch, n, element_bytes, g_limits, cd::regime_request_from_env());
  const cd::PlannedTraffic t = cd::planned_traffic(
      p, n, element_bytes, cd::PlannedWork{static_cast<Variant>(variant), backward, clamped, per_sample_k, stats},
      cd::SampleCounts{batch - empty - invalid, tied, empty, invalid});
  return {t.launches, t.bytes_read, t.bytes_written, t.small_bytes};
}

// Bytes of global memory the kernels read and wrote since the last call (and launches).
std::vector<int64_t> take_traffic() {
  const auto [read, written] = emu::Runtime::get().take_traffic();
  return {static_cast<int64_t>(read), static_cast<int64_t>(written)};
}

std::vector<std::string> take_launch_log() {
  std::vector<std::string> log;
  log.swap(g_launch_log);
  return log;
}

// The kernels on contiguous tensors without the front end, for what the front end rejects on the
// CPU but the CUDA kernels must handle: per-sample ks outside [0, n] (NaN samples). k_per_sample
// is a contiguous int64 [batch] tensor; variant -1 runs topk_stats into (out, total, kept).
void run_unchecked(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& out, const at::Tensor& k_per_sample,
                   int64_t variant, const at::Tensor& total, const at::Tensor& kept) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && k_per_sample.is_contiguous() &&
              k_per_sample.scalar_type() == at::kLong && k_per_sample.numel() == x.size(0));
  SampleLayout layout;
  layout.batch = x.size(0);
  layout.n = x.numel() / x.size(0);
  ShapeArgs args;
  args.k_per_sample = k_per_sample.const_data_ptr<int64_t>();
  if (variant < 0) {
    stats_emulated(x, args, layout, out, total, kept);
  } else if (grad.defined() && grad.numel() > 0) {
    TORCH_CHECK(grad.is_contiguous());
    backward_emulated(grad, x, out, args, static_cast<Variant>(variant), layout);
  } else {
    forward_emulated(x, out, args, static_cast<Variant>(variant), layout);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ash_ext, CPU, m) {
  BackendOps<&forward_emulated, &backward_emulated, &stats_emulated>::register_impls(m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_device_limits", &set_device_limits, "Emulated SM count and per-block shared memory limit");
  m.def("plan", &plan, "The CUDA backend's launch plan for a shape");
  m.def("planned_traffic", &planned_traffic, "The plan's launches, bytes read and written, small bytes");
  m.def("take_traffic", &take_traffic, "Global bytes read and written by the kernels since the last call");
  m.def("take_launch_log", &take_launch_log, "Launches since the last call, as 'grid x block + shared'");
  m.def("run_unchecked", &run_unchecked, "The kernels without the front end's checks (contiguous tensors)");
  m.def("seed", [](int64_t seed) { emu::Runtime::get().seed(static_cast<uint64_t>(seed)); });
}
