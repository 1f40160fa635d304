// The CPU kernel compiled for the build's baseline target (x86-64: SSE2), which every CPU runs.
#include "cpu_kernel_deps.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 16-lane vectors wider than the target's registers

#define ASH_EXT_ISA_NS baseline
#define ASH_EXT_ISA_LEVEL 0
#include "cpu_kernel.h"
