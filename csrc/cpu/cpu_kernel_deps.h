// Every header the CPU kernel (cpu_kernel.h) uses, included by each ISA build before it switches
// its code generation target. Functions defined in these headers are shared by all the builds
// (the linker keeps one copy of an inline function), so they must be compiled for the baseline
// target; only the kernel's own code, in the ISA's namespace, gets the ISA's instructions.
// tests/test_cpu_isa.py checks the library for AVX instructions outside those namespaces.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ash.h"
#include "cpu_common.h"
