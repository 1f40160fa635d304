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
#include "cuda/ash_kernels.cuh"

namespace {

using namespace ash_ext;

cuda_detail::DeviceLimits g_limits{132, 227 * 1024};
std::vector<std::string> g_launch_log;

class EmulatedLauncher {
 public:
  explicit EmulatedLauncher(const at::Tensor& like) : byte_options_(like.options().dtype(at::kByte)) {}

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_bytes, Args... args) {
    TORCH_CHECK(shared_bytes + cuda_detail::kStaticSharedAllowance <=
                    static_cast<size_t>(g_limits.shared_bytes_per_block),
                "emulated launch asks for ", shared_bytes, " bytes of dynamic shared memory");
    TORCH_CHECK(grid >= 1 && block >= 32 && block <= 1024, "emulated launch of ", grid, " x ", block);
    g_launch_log.push_back(std::to_string(grid) + "x" + std::to_string(block) + "+" + std::to_string(shared_bytes));
    emu::Runtime::get().run_grid(grid, block, shared_bytes, [&] { kernel(args...); });
  }

  // "Uninitialised" scratch is filled with a pattern, so that reliance on zeros shows up.
  void* scratch(int64_t bytes, bool zeroed) {
    buffers_.push_back(zeroed ? at::zeros({bytes}, byte_options_) : at::full({bytes}, 0xA5, byte_options_));
    return buffers_.back().data_ptr();
  }

 private:
  at::TensorOptions byte_options_;
  std::vector<at::Tensor> buffers_;
};

void forward_emulated(const at::Tensor& x, const at::Tensor& out, int64_t k, Variant variant,
                      const SampleLayout& layout) {
  if (k == 0) {
    out.zero_();
    return;
  }
  EmulatedLauncher launcher(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "forward_emulated", [&] {
    cuda_detail::run_variant<scalar_t, false>(launcher, g_limits, variant, x.data_ptr<scalar_t>(), nullptr,
                                              out.data_ptr<scalar_t>(), k, layout);
  });
}

void backward_emulated(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, int64_t k,
                       Variant variant, const SampleLayout& layout) {
  if (k == 0) {
    grad_x.zero_();
    return;
  }
  EmulatedLauncher launcher(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "backward_emulated", [&] {
    cuda_detail::run_variant<scalar_t, true>(launcher, g_limits, variant, x.data_ptr<scalar_t>(),
                                             grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), k, layout);
  });
}

void set_device_limits(int64_t sm_count, int64_t shared_bytes_per_block) {
  g_limits = cuda_detail::DeviceLimits{sm_count, shared_bytes_per_block};
}

// The regime the CUDA backend picks for `batch` samples of n elements: (regime, threads,
// dynamic shared bytes, chunk length, chunks), regime 0 on chip, 1 block per sample, 2 chunked.
std::vector<int64_t> plan(int64_t batch, int64_t n, int64_t element_bytes) {
  const cuda_detail::LaunchPlan p = cuda_detail::plan_launch(batch, n, element_bytes, g_limits);
  return {static_cast<int64_t>(p.regime), p.threads, static_cast<int64_t>(p.shared_bytes), p.chunk_len, p.chunks};
}

std::vector<std::string> take_launch_log() {
  std::vector<std::string> log;
  log.swap(g_launch_log);
  return log;
}

}  // namespace

TORCH_LIBRARY_IMPL(ash_ext, CPU, m) { BackendOps<&forward_emulated, &backward_emulated>::register_impls(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_device_limits", &set_device_limits, "Emulated SM count and per-block shared memory limit");
  m.def("plan", &plan, "The CUDA backend's launch plan for a shape");
  m.def("take_launch_log", &take_launch_log, "Launches since the last call, as 'grid x block + shared'");
  m.def("seed", [](int64_t seed) { emu::Runtime::get().seed(static_cast<uint64_t>(seed)); });
}
