// The CPU backend of the ASH op family: registers the op's CPU kernels, which call the ISA build
// of the kernel (cpu_kernel.h, compiled by isa_*.cpp) chosen for this process -- by default the
// best this CPU supports, else what set_cpu_isa asked for (ASH_EXT_CPU_ISA, read by the Python
// package at import).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "cpu_common.h"

namespace ash_ext {
namespace {

const CpuKernels* kernels_of(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Baseline:
      return baseline::kernels();
    case CpuIsa::Avx2:
      return avx2::kernels();
    case CpuIsa::Avx512:
      return avx512::kernels();
  }
  return nullptr;
}

// Whether the CPU has the features an ISA build was compiled for (the checks include the OS
// saving the wider registers). Runs from a static initialiser, possibly before libgcc's own CPU
// detection: it starts that first.
bool cpu_has(CpuIsa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("lzcnt");
  switch (isa) {
    case CpuIsa::Baseline:
      return true;
    case CpuIsa::Avx2:
      return avx2;
    case CpuIsa::Avx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == CpuIsa::Baseline;
#endif
}

CpuIsa best_supported() {
  for (int level = kCpuIsaCount - 1; level > 0; --level) {
    if (cpu_isa_supported(static_cast<CpuIsa>(level))) {
      return static_cast<CpuIsa>(level);
    }
  }
  return CpuIsa::Baseline;
}

std::atomic<int> selected_isa{static_cast<int>(best_supported())};

const CpuKernels& current() { return *kernels_of(static_cast<CpuIsa>(selected_isa.load(std::memory_order_relaxed))); }

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  static const char* const kNames[kCpuIsaCount] = {"baseline", "avx2", "avx512"};
  return kNames[static_cast<int>(isa)];
}

bool cpu_isa_supported(CpuIsa isa) { return kernels_of(isa) != nullptr && cpu_has(isa); }

CpuIsa cpu_isa() { return static_cast<CpuIsa>(selected_isa.load(std::memory_order_relaxed)); }

CpuIsa set_cpu_isa(CpuIsa isa) {
  if (!cpu_isa_supported(isa)) {
    std::string supported;
    for (int level = 0; level < kCpuIsaCount; ++level) {
      if (cpu_isa_supported(static_cast<CpuIsa>(level))) {
        supported += std::string(supported.empty() ? "" : ", ") + cpu_isa_name(static_cast<CpuIsa>(level));
      }
    }
    throw std::invalid_argument(std::string("this CPU (or this build) cannot run the '") + cpu_isa_name(isa) +
                                "' kernel; it supports: " + supported);
  }
  return static_cast<CpuIsa>(selected_isa.exchange(static_cast<int>(isa)));
}

void ash_forward_cpu(const at::Tensor& x, const at::Tensor& out, const ShapeArgs& args, Variant variant,
                     const SampleLayout& layout) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "ash_ext: the CPU kernel got a tensor on ", x.device());
  current().forward(x, out, args, variant, layout);
}

void ash_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, const ShapeArgs& args,
                      Variant variant, const SampleLayout& layout) {
  TORCH_CHECK(x.device().is_cpu(), "ash_ext: the CPU kernel got a tensor on ", x.device());
  current().backward(grad, x, grad_x, args, variant, layout);
}

void ash_stats_cpu(const at::Tensor& x, const ShapeArgs& args, const SampleLayout& layout,
                   const at::Tensor& threshold, const at::Tensor& total, const at::Tensor& kept) {
  TORCH_CHECK(x.device().is_cpu(), "ash_ext: the CPU kernel got a tensor on ", x.device());
  current().stats(x, args, layout, threshold, total, kept);
}

TORCH_LIBRARY_IMPL(ash_ext, CPU, m) {
  BackendOps<&ash_forward_cpu, &ash_backward_cpu, &ash_stats_cpu>::register_impls(m);
}

}  // namespace ash_ext
