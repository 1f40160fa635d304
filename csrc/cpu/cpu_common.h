// What every ISA build of the CPU kernel (cpu_kernel.h) shares, and how ash_cpu.cpp picks one.
#pragma once

#include <cstdint>

#include "../ash.h"

namespace ash_ext {

// Sums are taken per block of kSumBlock values in kLanes lanes: lane l of a block accumulates
// the values at block offsets l, l + kLanes, ...; the lanes are then added in order, and the
// block sums in block order. The order depends only on n, so a sample's sums (and so its
// output) are the same whatever the batch, the thread count, the path the selection took or
// the ISA the kernel was compiled for.
constexpr int64_t kLanes = 16;
constexpr int64_t kSumBlock = 4096;
constexpr int64_t kTile = 256;  // keys computed per step before pass A counts them

static_assert(kSumBlock % kTile == 0 && kTile % kLanes == 0, "blocks must hold whole tiles");

// One ISA build's entry points.
struct CpuKernels {
  ForwardKernel forward;
  BackwardKernel backward;
  StatsKernel stats;
};

// The ISA builds, each the same source (cpu_kernel.h) compiled for one target: baseline x86-64
// (SSE2; or whatever the compiler targets elsewhere), AVX2 with FMA and F16C, and AVX-512
// F/BW/VL/DQ. kernels() is null where the build lacks that ISA's code (not x86-64, or a compiler
// without GCC's target pragmas).
enum class CpuIsa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kCpuIsaCount = 3;

namespace baseline {
const CpuKernels* kernels();
}
namespace avx2 {
const CpuKernels* kernels();
}
namespace avx512 {
const CpuKernels* kernels();
}

// "baseline", "avx2", "avx512".
const char* cpu_isa_name(CpuIsa isa);
// Whether this CPU (features and OS support) and this build can run the ISA's code.
bool cpu_isa_supported(CpuIsa isa);
// The ISA whose code runs: the best supported one, until set_cpu_isa chooses another.
CpuIsa cpu_isa();
// Chooses the ISA for later calls (one process-wide setting; calls in flight finish on the ISA
// they started with) and returns the previous one. Throws std::invalid_argument, naming the
// ISAs this CPU supports, for one it does not.
CpuIsa set_cpu_isa(CpuIsa isa);

}  // namespace ash_ext
