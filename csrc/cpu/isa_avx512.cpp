// The CPU kernel compiled for AVX-512 F, BW, VL and DQ (Intel Skylake-SP and later server CPUs,
// AMD Zen 4 on), on top of AVX2's set. As in isa_avx2.cpp, the target pragma reaches only the
// kernel's own code, in namespace ash_ext::avx512. -DASH_EXT_NO_AVX512 leaves the build out (the
// dispatch then reports this CPU as lacking it): the sanitized test build, tools/sanitized_cpu.py,
// does so to save a third of its compile time on CPUs that could not run it anyway (the stub
// includes no header: ATen's alone take a while to compile under the sanitizers).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ASH_EXT_NO_AVX512)
#include "cpu_kernel_deps.h"

#pragma GCC diagnostic ignored "-Wpsabi"
// Some AVX-512 intrinsics (e.g. _mm512_cvtph_ps) take a deliberately undefined input, which GCC 12
// reports as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt,bmi,bmi2,lzcnt")
#define ASH_EXT_ISA_NS avx512
#define ASH_EXT_ISA_LEVEL 2
#include "cpu_kernel.h"
#pragma GCC pop_options
#else
namespace ash_ext {
struct CpuKernels;  // cpu_common.h
namespace avx512 {
const CpuKernels* kernels() { return nullptr; }
}  // namespace avx512
}  // namespace ash_ext
#endif
