// The CPU kernel compiled for AVX2 with FMA and F16C (Intel Haswell and AMD Zen on). The target
// pragma applies to the functions defined after it -- the kernel's own, in namespace
// ash_ext::avx2 -- and not to the headers included before it (see cpu_kernel_deps.h).
#include "cpu_kernel_deps.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt,bmi,bmi2,lzcnt")
#define ASH_EXT_ISA_NS avx2
#define ASH_EXT_ISA_LEVEL 1
#include "cpu_kernel.h"
#pragma GCC pop_options
#else
namespace ash_ext::avx2 {
const CpuKernels* kernels() { return nullptr; }
}  // namespace ash_ext::avx2
#endif
