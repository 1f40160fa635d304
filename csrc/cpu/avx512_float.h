// AVX-512 versions of the CPU kernel's passes for float32 samples, chosen at run time when the
// CPU has AVX-512F (see cpu_simd.cpp); every other CPU and dtype runs the portable loops of
// ash_cpu.cpp, which the build compiles for baseline x86-64 (SSE2).
//
// These functions compute exactly what their portable counterparts compute, bit for bit: the
// same keys, the same gathered keys in the same order, and every sum in the same order -- lane
// l of a sum block accumulates the values at block offsets l, l + 16, l + 32, ... (one 16-lane
// register), and the lanes are then added in order 0..15. (Adding a masked-off lane's +0.0 in
// the portable code is the identity: a lane that starts at +0.0 can never hold -0.0.) The tests
// run both versions on the same inputs and compare the results bit for bit. Pass C is the
// exception that proves it: rank_rounds finds the threshold by another method than the portable
// radix digits, but what it finds -- the k-th largest key, its ties -- is defined by the keys alone.
//
// Why: the portable loops run at about 1.1 ns per value for the selection, mostly spent on
// storing keys to a buffer and reading them back in separate loops; here one pass loads 16
// values, adds them to the sum, computes their keys, counts and gathers them, all in registers.
//
// Each function carries a `target` attribute rather than the whole file being built with
// -mavx512f: code compiled with the attribute is never shared (inline functions and templates
// instantiated elsewhere keep their baseline code), so nothing AVX-512 can run on a CPU without it.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ASH_EXT_HAVE_AVX512_CODE 1

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_common.h"

#define ASH_EXT_AVX512 __attribute__((target("avx512f,popcnt")))
#define ASH_EXT_AVX512_INLINE __attribute__((target("avx512f,popcnt"), always_inline)) inline
// Lambdas do not inherit their enclosing function's target: each one in these loops says it.
#define ASH_EXT_AVX512_LAMBDA __attribute__((target("avx512f,popcnt"), always_inline))

// GCC 12 reports the deliberately undefined inputs of some AVX-512 intrinsics (e.g.
// _mm512_srai_epi32's _mm512_undefined_epi32, _mm512_reduce_min_epu32's
// _mm256_undefined_si256) as (maybe-)uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace ash_ext {
namespace avx512 {

static_assert(kLanes == 16, "one 16-lane float register is one set of sum lanes");

// Lanes [0, len) of a 16-lane vector, for a partial last vector.
inline __mmask16 first_lanes(int64_t len) {
  return len >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << len) - 1u);
}

ASH_EXT_AVX512_INLINE int popcount(__mmask16 m) { return __builtin_popcount(static_cast<unsigned>(m)); }

// Calls step(i, valid) for the registers of 16 values at offsets [begin, end): whole ones, whose
// mask the compiler folds away, then the partial last one.
template <typename Step>
ASH_EXT_AVX512_INLINE void for_registers(int64_t begin, int64_t end, const Step& step) {
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    step(i, __mmask16(0xFFFF));
  }
  if (i < end) {
    step(i, first_lanes(end - i));
  }
}

// order_key (ash_semantics.h) of 16 floats: -0.0 as +0.0, NaN as the largest key, negative
// values with every bit flipped, non-negative ones with the sign bit set.
ASH_EXT_AVX512_INLINE __m512i keys16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  const __mmask16 zero = _mm512_cmpeq_epi32_mask(magnitude, _mm512_setzero_si512());
  const __m512i canonical = _mm512_mask_mov_epi32(bits, zero, _mm512_setzero_si512());
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(canonical, 31), _mm512_set1_epi32(INT32_MIN));
  const __m512i key = _mm512_xor_si512(canonical, flip);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_mov_epi32(key, nan, _mm512_set1_epi32(-1));
}

ASH_EXT_AVX512_INLINE __m512i broadcast_key(uint64_t key) { return _mm512_set1_epi32(static_cast<int32_t>(key)); }

// The lanes of a sum register added in lane order, as the portable block_sum does.
ASH_EXT_AVX512_INLINE float lanes_total(__m512 lanes) {
  alignas(64) float lane[16];
  _mm512_store_ps(lane, lanes);
  float total = 0.0f;
  for (int l = 0; l < 16; ++l) {
    total += lane[l];
  }
  return total;
}

// Comparing values instead of keys. The hot loops compare the floats themselves where that
// gives the key order's answer, which saves computing 16 keys per register: for keys a and b
// that are neither NaN's key nor -0.0's raw key (0x7FFFFFFF, which order_key never returns),
// key(v) >= a  <=>  v >= value(a) or v is NaN  (NaN's key is the largest, and -0.0 == +0.0 as
// floats just as their keys are equal), key(v) > b  <=>  v > value(b) or v is NaN, and
// key(v) == a  <=>  v == value(a). NaN thresholds and window bounds outside the finite range
// take the key loops.
constexpr uint32_t kNanKey = 0xFFFFFFFFu;
constexpr uint32_t kPlusInfKey = 0xFF800000u;
constexpr uint32_t kMinusInfKey = 0x007FFFFFu;
constexpr uint32_t kMinusZeroRawKey = 0x7FFFFFFFu;

inline float float_of_key(uint32_t key) { return value_of_key<float>(key); }

// Which of 16 values at sample offsets [i, i + 16) are kept under `rule`: keys above the
// threshold, and ties -- all of them, or when `partial` those at offsets <= tie_cut (layouts
// whose memory order is the logical order). ByValue: `threshold` holds the threshold's value
// (rule.threshold is not NaN's key), else its key.
template <bool ByValue>
struct KeptLanes {
  const KeptRule& rule;
  __m512i threshold_key;
  __m512 threshold_value;

  ASH_EXT_AVX512_INLINE explicit KeptLanes(const KeptRule& r)
      : rule(r),
        threshold_key(broadcast_key(r.threshold)),
        threshold_value(_mm512_set1_ps(ByValue ? float_of_key(static_cast<uint32_t>(r.threshold)) : 0.0f)) {}

  ASH_EXT_AVX512_INLINE __mmask16 tie_lanes(int64_t i) const {
    const int64_t last = rule.tie_cut - i;
    return last < 0 ? __mmask16(0) : first_lanes(last + 1);
  }

  ASH_EXT_AVX512_INLINE __mmask16 operator()(__m512 v, int64_t i) const {
    if constexpr (ByValue) {
      if (!rule.partial) {
        return _mm512_cmp_ps_mask(v, threshold_value, _CMP_NLT_UQ);
      }
      const __mmask16 above = _mm512_cmp_ps_mask(v, threshold_value, _CMP_NLE_UQ);
      const __mmask16 ties = _mm512_cmp_ps_mask(v, threshold_value, _CMP_EQ_OQ);
      return static_cast<__mmask16>(above | (ties & tie_lanes(i)));
    } else {
      const __m512i key = keys16(v);
      const __mmask16 above = _mm512_cmpgt_epu32_mask(key, threshold_key);
      __mmask16 ties = _mm512_cmpeq_epi32_mask(key, threshold_key);
      if (rule.partial) {
        ties &= tie_lanes(i);
      }
      return static_cast<__mmask16>(above | ties);
    }
  }
};

// Runs body(KeptLanes<ByValue>) with ByValue chosen for `rule`.
template <typename Body>
ASH_EXT_AVX512_INLINE void with_kept_lanes(const KeptRule& rule, const Body& body) {
  if (rule.threshold != kNanKey) {
    body(KeptLanes<true>(rule));
  } else {
    body(KeptLanes<false>(rule));
  }
}

// Pass W over the sum blocks [first_block, last_block): block sums, the number of keys above
// hi, and the keys in [lo, hi] appended to `gathered` in memory order (which needs 16 slots
// of room after the last one gathered). Returns the number gathered.
ASH_EXT_AVX512 inline int64_t pass_window(const float* in, int64_t n, int64_t first_block, int64_t last_block,
                                          uint32_t lo, uint32_t hi, float* block_sums, uint32_t* gathered,
                                          int64_t* above) {
  // By value when the window's bounds are values: neither is NaN's key and the window holds
  // some of [-inf, +inf] (its bounds clamped to that range, and -0.0's raw key moved to a
  // neighbour no value has either, so that the window holds exactly the keys in [lo, hi]).
  // Correctness needs less: the caller's count check accepts any split of the values into
  // "above", "gathered" and "below" that respects their order.
  const bool by_value = hi != kNanKey && lo <= kPlusInfKey && hi >= kMinusInfKey;
  const uint32_t lo_key = lo == kMinusZeroRawKey ? lo + 1 : std::max(lo, kMinusInfKey);
  const uint32_t hi_key = hi == kMinusZeroRawKey ? hi - 1 : std::min(hi, kPlusInfKey);
  const __m512 low_value = _mm512_set1_ps(float_of_key(lo_key));
  const __m512 high_value = _mm512_set1_ps(float_of_key(hi_key));
  const __m512i low = broadcast_key(lo);
  const __m512i span = broadcast_key(hi - lo);
  const __m512i high = broadcast_key(hi);
  int64_t count = 0;
  int64_t above_total = 0;
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * kSumBlock;
    const int64_t end = std::min(n, begin + kSumBlock);
    __m512 sum = _mm512_setzero_ps();
    __m512i above_lanes = _mm512_setzero_si512();  // per-lane counts: < kSumBlock each
    const auto step = [&](int64_t i, __mmask16 valid) ASH_EXT_AVX512_LAMBDA {
      const __m512 v = _mm512_maskz_loadu_ps(valid, in + i);
      sum = _mm512_mask_add_ps(sum, valid, sum, v);
      __mmask16 inside;
      __m512i gather;  // the gathered values' keys, or the values (made keys after the loop)
      if (by_value) {
        above_lanes = _mm512_mask_sub_epi32(above_lanes, _mm512_mask_cmp_ps_mask(valid, v, high_value, _CMP_NLE_UQ),
                                            above_lanes, _mm512_set1_epi32(-1));
        inside = _mm512_mask_cmp_ps_mask(_mm512_mask_cmp_ps_mask(valid, v, low_value, _CMP_GE_OQ), v, high_value,
                                         _CMP_LE_OQ);
        gather = _mm512_castps_si512(v);
      } else {
        const __m512i key = keys16(v);
        above_lanes = _mm512_mask_sub_epi32(above_lanes, _mm512_mask_cmpgt_epu32_mask(valid, key, high), above_lanes,
                                            _mm512_set1_epi32(-1));
        inside = _mm512_mask_cmple_epu32_mask(valid, _mm512_sub_epi32(key, low), span);
        gather = key;
      }
      // Always a register compress and a whole store, no branch: a window holding a few per
      // cent of the values touches a third of the registers, too many for a predictable branch
      // (and the memory form of vpcompressd is slow on some CPUs).
      _mm512_storeu_si512(gathered + count, _mm512_maskz_compress_epi32(inside, gather));
      count += popcount(inside);
    };
    for_registers(begin, end, step);
    block_sums[block] = lanes_total(sum);
    above_total += _mm512_reduce_add_epi32(above_lanes);
  }
  if (by_value) {
    for (int64_t j = 0; j < count; ++j) {
      gathered[j] = order_key(__builtin_bit_cast(float, gathered[j]));
    }
  }
  *above = above_total;
  return count;
}

// Pass A's walk: each block's sum into block_sums, and the keys of each tile of kTile values
// handed to per_tile(keys, len) -- the histogram, which stays scalar.
template <typename PerTile>
ASH_EXT_AVX512 inline void sum_blocks_and_key_tiles(const float* in, int64_t n, int64_t first_block,
                                                    int64_t last_block, float* block_sums, const PerTile& per_tile) {
  alignas(64) uint32_t keys[kTile];
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * kSumBlock;
    const int64_t end = std::min(n, begin + kSumBlock);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t tile = begin; tile < end; tile += kTile) {
      const int64_t len = std::min(kTile, end - tile);
      for_registers(0, len, [&](int64_t j, __mmask16 valid) ASH_EXT_AVX512_LAMBDA {
        const __m512 v = _mm512_maskz_loadu_ps(valid, in + tile + j);
        sum = _mm512_mask_add_ps(sum, valid, sum, v);
        _mm512_store_si512(keys + j, keys16(v));
      });
      per_tile(keys, len);
    }
    block_sums[block] = lanes_total(sum);
  }
}

// Pass B over [begin, end): appends the keys whose top bits (key >> shift) equal `digit`.
ASH_EXT_AVX512 inline int64_t pass_b(const float* in, int64_t begin, int64_t end, int shift, uint32_t digit,
                                     uint32_t* gathered) {
  const __m512i wanted = broadcast_key(digit);
  const __m128i count_bits = _mm_cvtsi32_si128(shift);
  int64_t count = 0;
  for_registers(begin, end, [&](int64_t i, __mmask16 valid) ASH_EXT_AVX512_LAMBDA {
    const __m512i key = keys16(_mm512_maskz_loadu_ps(valid, in + i));
    const __mmask16 match = _mm512_mask_cmpeq_epi32_mask(valid, _mm512_srl_epi32(key, count_bits), wanted);
    _mm512_storeu_si512(gathered + count, _mm512_maskz_compress_epi32(match, key));  // no branch, as in pass_window
    count += popcount(match);
  });
  return count;
}

// Pass C for 32-bit keys, by rounds of a window instead of radix digits (whose histogram
// update is one scalar read-modify-write per key). The want-th largest of some keys is near
// where its rank puts it if the keys were spread evenly over their range -- and a window
// around a threshold is narrow, so they nearly are. Each round counts the keys above a window
// around that estimate, some sqrt(count) ranks either side, and gathers the keys inside, all
// with vector compares: the next round has only those. A window that misses still tells how
// many keys lie beyond it, which narrows the key range the answer is in (the keys stay put).
struct RankRounds {
  bool found;           // whether threshold, ties and need hold the answer
  uint32_t threshold;   // the want-th largest key
  int64_t ties;         // keys equal to it
  int64_t need;         // of those, how many rank within want
  uint32_t* keys;       // else: the answer is the want-th largest of keys[0, count)
  int64_t count;
  int64_t want;
};

// At most this many keys are ranked by compares against all of them (two registers).
constexpr int64_t kRankInRegisters = 32;

// The smallest and largest of keys[0, count), count >= 1.
ASH_EXT_AVX512 inline void key_span(const uint32_t* keys, int64_t count, uint32_t* smallest, uint32_t* largest) {
  __m512i low = _mm512_set1_epi32(-1);
  __m512i high = _mm512_setzero_si512();
  for_registers(0, count, [&](int64_t i, __mmask16 valid) ASH_EXT_AVX512_LAMBDA {
    const __m512i key = _mm512_maskz_loadu_epi32(valid, keys + i);
    low = _mm512_mask_min_epu32(low, valid, low, key);
    high = _mm512_mask_max_epu32(high, valid, high, key);
  });
  *smallest = _mm512_reduce_min_epu32(low);
  *largest = _mm512_reduce_max_epu32(high);
}

// The want-th largest of keys[0, count) (1 <= want <= count <= kRankInRegisters): each key's
// rank by compares against all of them.
ASH_EXT_AVX512 inline RankRounds rank_in_registers(uint32_t* keys, int64_t count, int64_t want) {
  const __mmask16 valid_low = first_lanes(count);
  const __mmask16 valid_high = count > 16 ? first_lanes(count - 16) : __mmask16(0);
  const __m512i low = _mm512_maskz_loadu_epi32(valid_low, keys);
  const __m512i high = _mm512_maskz_loadu_epi32(valid_high, keys + 16);
  for (int64_t i = 0; i < count; ++i) {
    const __m512i key = broadcast_key(keys[i]);
    const int greater = popcount(_mm512_mask_cmpgt_epu32_mask(valid_low, low, key)) +
                        popcount(_mm512_mask_cmpgt_epu32_mask(valid_high, high, key));
    const int equal = popcount(_mm512_mask_cmpeq_epi32_mask(valid_low, low, key)) +
                      popcount(_mm512_mask_cmpeq_epi32_mask(valid_high, high, key));
    if (greater < want && want <= greater + equal) {
      return RankRounds{true, keys[i], equal, want - greater, keys, count, want};
    }
  }
  return RankRounds{false, 0, 0, 0, keys, count, want};  // only for want outside [1, count]
}

// Runs up to max_rounds window rounds on the want-th largest of keys[0, count) (1 <= want <=
// count), `spare` holding as many keys (both with 16 slots of room after them); finishes in
// registers when at most kRankInRegisters keys are left. Not found: the caller selects among
// the keys left by any exact method.
ASH_EXT_AVX512 inline RankRounds rank_rounds(uint32_t* keys, uint32_t* spare, int64_t count, int64_t want,
                                             int max_rounds) {
  // The answer lies in [lo, hi]; `above` keys are above hi and `within` keys in [lo, hi], so
  // above < want <= above + within.
  uint32_t lo = 0;
  uint32_t hi = 0;
  key_span(keys, count, &lo, &hi);
  int64_t above = 0;
  int64_t within = count;
  uint32_t* to = spare;
  for (int round = 0; round < max_rounds && count > kRankInRegisters && lo != hi; ++round) {
    // The estimate's rank error is about sqrt(within) / 2 at most for evenly spread keys.
    const double per_rank = (double(hi) - double(lo)) / double(within);
    const double estimate = double(hi) - per_rank * (double(want - above) - 0.5);
    const double margin = per_rank * (1.5 * std::sqrt(double(within)) + 2.0);
    const auto window_lo = static_cast<uint32_t>(std::clamp(estimate - margin, double(lo), double(hi)));
    const auto window_hi = static_cast<uint32_t>(std::clamp(estimate + margin, double(lo), double(hi)));
    const __m512i low = broadcast_key(window_lo);
    const __m512i span = broadcast_key(window_hi - window_lo);
    const __m512i high = broadcast_key(window_hi);
    __m512i above_lanes = _mm512_setzero_si512();
    __m512i inside_low = _mm512_set1_epi32(-1);
    __m512i inside_high = _mm512_setzero_si512();
    int64_t inside = 0;
    for_registers(0, count, [&](int64_t i, __mmask16 valid) ASH_EXT_AVX512_LAMBDA {
      const __m512i key = _mm512_maskz_loadu_epi32(valid, keys + i);
      above_lanes = _mm512_mask_sub_epi32(above_lanes, _mm512_mask_cmpgt_epu32_mask(valid, key, high), above_lanes,
                                          _mm512_set1_epi32(-1));
      const __mmask16 in = _mm512_mask_cmple_epu32_mask(valid, _mm512_sub_epi32(key, low), span);
      inside_low = _mm512_mask_min_epu32(inside_low, in, inside_low, key);
      inside_high = _mm512_mask_max_epu32(inside_high, in, inside_high, key);
      _mm512_storeu_si512(to + inside, _mm512_maskz_compress_epi32(in, key));
      inside += popcount(in);
    });
    const int64_t window_above = _mm512_reduce_add_epi32(above_lanes);
    if (window_above >= want) {  // above the window: some keys lie in (window_hi, hi]
      within = window_above - above;
      lo = window_hi + 1;
    } else if (window_above + inside < want) {  // below it: some keys lie in [lo, window_lo)
      within = above + within - (window_above + inside);
      above = window_above + inside;
      hi = window_lo - 1;
    } else {  // inside: only the window's keys are left
      std::swap(keys, to);
      count = inside;
      want -= window_above;
      above = 0;
      within = inside;
      lo = _mm512_reduce_min_epu32(inside_low);
      hi = _mm512_reduce_max_epu32(inside_high);
    }
  }
  if (lo == hi) {  // every key in [lo, hi] is the answer
    return RankRounds{true, lo, within, want - above, keys, count, want};
  }
  if (count <= kRankInRegisters) {
    return rank_in_registers(keys, count, want);
  }
  return RankRounds{false, 0, 0, 0, keys, count, want};
}

// The sample offset of the need-th value (1-based) whose key is `threshold`, or -1.
ASH_EXT_AVX512 inline int64_t nth_tie_offset(const float* in, int64_t n, uint32_t threshold, int64_t need) {
  const __m512i wanted = broadcast_key(threshold);
  int64_t seen = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = first_lanes(n - i);
    unsigned ties = _mm512_mask_cmpeq_epi32_mask(valid, keys16(_mm512_maskz_loadu_ps(valid, in + i)), wanted);
    const int here = __builtin_popcount(ties);
    if (seen + here >= need) {
      for (int64_t skip = need - seen - 1; skip > 0; --skip) {
        ties &= ties - 1;  // drop the lowest tie
      }
      return i + __builtin_ctz(ties);
    }
    seen += here;
  }
  return -1;
}

// The sums of the kept values of the sum blocks [first_block, last_block) (ASH-S's s2).
ASH_EXT_AVX512 inline void kept_block_sums(const float* in, int64_t n, int64_t first_block, int64_t last_block,
                                           const KeptRule& rule, float* block_sums) {
  with_kept_lanes(rule, [&](const auto& kept) ASH_EXT_AVX512_LAMBDA {
    for (int64_t block = first_block; block < last_block; ++block) {
      const int64_t begin = block * kSumBlock;
      const int64_t end = std::min(n, begin + kSumBlock);
      __m512 sum = _mm512_setzero_ps();
      for_registers(begin, end, [&](int64_t i, __mmask16 valid) ASH_EXT_AVX512_LAMBDA {
        const __m512 v = _mm512_maskz_loadu_ps(valid, in + i);
        sum = _mm512_mask_add_ps(sum, valid & kept(v, i), sum, v);
      });
      block_sums[block] = lanes_total(sum);
    }
  });
}

// The output pass over sample offsets [begin, end): kept values as variant V makes them, +0.0
// elsewhere. `constant` is ASH-B's fill or ASH-S's factor, which must be finite (a product with
// +0.0 is then +0.0, as the portable code's mask-then-scale gives).
template <Variant V>
ASH_EXT_AVX512 inline void write_variant(const float* in, float* out, int64_t begin, int64_t end, float constant,
                                         const KeptRule& rule) {
  const __m512 c = _mm512_set1_ps(constant);
  with_kept_lanes(rule, [&](const auto& kept) ASH_EXT_AVX512_LAMBDA {
    for_registers(begin, end, [&](int64_t i, __mmask16 valid) ASH_EXT_AVX512_LAMBDA {
      const __m512 v = _mm512_maskz_loadu_ps(valid, in + i);
      const __mmask16 keep = kept(v, i);
      __m512 result;
      if constexpr (V == Variant::Prune) {
        result = _mm512_maskz_mov_ps(keep, v);
      } else if constexpr (V == Variant::Binarize) {
        result = _mm512_maskz_mov_ps(keep, c);
      } else {
        result = _mm512_maskz_mul_ps(keep, v, c);
      }
      _mm512_mask_storeu_ps(out + i, valid, result);
    });
  });
}

inline void write_forward(const float* in, float* out, int64_t begin, int64_t end, Variant variant, float constant,
                          const KeptRule& rule) {
  switch (variant) {
    case Variant::Prune:
      return write_variant<Variant::Prune>(in, out, begin, end, constant, rule);
    case Variant::Binarize:
      return write_variant<Variant::Binarize>(in, out, begin, end, constant, rule);
    case Variant::Scale:
      return write_variant<Variant::Scale>(in, out, begin, end, constant, rule);
    case Variant::ScaleUnpruned:
      break;  // never called for SCALE: its output pass (write_scaled in ash_cpu.cpp) is portable
  }
}

}  // namespace avx512
}  // namespace ash_ext

#pragma GCC diagnostic pop

#endif
