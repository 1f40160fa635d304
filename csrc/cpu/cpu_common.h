// What the CPU kernel's portable loops (ash_cpu.cpp) and its AVX-512 versions (avx512_float.h)
// must agree on for their results to be bit-identical: the order of every sum, and the rule
// that says which elements are kept.
#pragma once

#include <cstdint>

#include "../ash_semantics.h"

namespace ash_ext {

// Sums are taken per block of kSumBlock values in kLanes lanes: lane l of a block accumulates
// the values at block offsets l, l + kLanes, ...; the lanes are then added in order, and the
// block sums in block order. The order depends only on n, so a sample's sums (and so its
// output) are the same whatever the batch, the thread count or the path the selection took.
constexpr int64_t kLanes = 16;
constexpr int64_t kSumBlock = 4096;
constexpr int64_t kTile = 256;  // keys computed per step before a pass uses them

static_assert(kSumBlock % kTile == 0 && kTile % kLanes == 0, "blocks must hold whole tiles");

// Which elements of a sample are kept, in memory order: those whose key is above `threshold`,
// and those whose key equals it -- all of them unless `partial`, else those at memory offsets
// <= tie_cut (for layouts whose memory order is the logical order).
struct KeptRule {
  uint64_t threshold = 0;
  bool partial = false;
  int64_t tie_cut = 0;
};

// Whether the CPU kernel runs its AVX-512 loops (float32 only): true when the CPU has AVX-512F
// unless ASH_EXT_CPU_SIMD=0 is set in the environment at import; set_cpu_simd switches it
// (for tests comparing both versions) and returns the previous setting. Enabling it on a CPU
// without AVX-512F, or in a build without that code, leaves it off.
bool cpu_simd_enabled();
bool set_cpu_simd(bool enabled);
bool cpu_simd_available();

}  // namespace ash_ext
