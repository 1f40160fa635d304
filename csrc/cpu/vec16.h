// The CPU kernel's vector layer: 16 lanes of any of the op's dtypes, as GCC/Clang vector
// extensions. cpu_kernel.h is written once over it; each ISA build (isa_*.cpp) compiles it with
// its own target, and the compiler maps a 16-lane vector to one AVX-512 register, two AVX2
// registers or four SSE2 ones.
//
// Why 16 lanes on every ISA rather than at::vec::Vectorized<T> (whose width is the ISA's): the
// kernel's sums are defined lane by lane -- lane l of a sum block adds the values at offsets l,
// l + 16, ... and the lanes are then added in order (cpu_common.h) -- so with one width for all
// ISAs the sums, and so every output, are bit-identical across ISAs by construction, and no ISA
// needs its own code to reassemble that order. Only two operations have no portable vector form
// and get an ISA-specific body here: a lane mask as bits, and the compress-store of the lanes a
// mask selects (AVX-512 has an instruction for it, AVX2 a permute by table).
//
// Conversions are exact and the same on every ISA: float16 and bfloat16 widen to float32 by
// integer operations (a multiply by a power of two for float16), and round back to nearest-even
// as c10::Half and c10::BFloat16 do, NaN included (so the kernel agrees with its scalar code).
//
// Include only inside an ISA build's region (after cpu_kernel_deps.h), where ASH_EXT_ISA_LEVEL
// says which ISA the code is compiled for: 0 baseline x86-64 (or any other CPU), 1 AVX2 + FMA +
// F16C, 2 AVX-512 F/BW/VL/DQ.
#pragma once

#ifndef ASH_EXT_ISA_LEVEL
#error "vec16.h belongs in an ISA build (see isa_baseline.cpp)"
#endif

#define ASH_EXT_VEC_INLINE __attribute__((always_inline)) inline

namespace ash_ext {
namespace ASH_EXT_ISA_NS {  // each ISA build its own copy: no code is shared across ISAs
namespace vec16 {

constexpr int kLanes = 16;

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint64_t u64x16 __attribute__((vector_size(128)));
typedef int64_t i64x16 __attribute__((vector_size(128)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x16 __attribute__((vector_size(128)));

// The vector types of a key type: unsigned keys (and a dtype's raw bits), signed lane masks.
template <typename key_t>
struct KeyVectors;
template <>
struct KeyVectors<uint16_t> {
  using keys = u16x16;
  using mask = i16x16;
};
template <>
struct KeyVectors<uint32_t> {
  using keys = u32x16;
  using mask = i32x16;
};
template <>
struct KeyVectors<uint64_t> {
  using keys = u64x16;
  using mask = i64x16;
};

template <typename acc_t>
struct AccVectors;
template <>
struct AccVectors<float> {
  using values = f32x16;
};
template <>
struct AccVectors<double> {
  using values = f64x16;
};

template <typename scalar_t>
using Keys = typename KeyVectors<key_type<scalar_t>>::keys;  // raw bits or keys of 16 values
template <typename scalar_t>
using Mask = typename KeyVectors<key_type<scalar_t>>::mask;  // -1 (all ones) or 0 per lane
template <typename scalar_t>
using Acc = typename AccVectors<acc_type<scalar_t>>::values;  // 16 values in the accumulation type

template <typename V, typename T>
ASH_EXT_VEC_INLINE V splat(T value) {
  V v;
  for (int l = 0; l < kLanes; ++l) {
    v[l] = value;
  }
  return v;
}

// The raw bits of the values at p[0, len) (len <= 16; the other lanes are 0, i.e. +0.0).
template <typename scalar_t>
ASH_EXT_VEC_INLINE Keys<scalar_t> load_bits(const scalar_t* p, int64_t len) {
  Keys<scalar_t> v;
  if (len >= kLanes) {
    __builtin_memcpy(&v, p, sizeof(v));
  } else {
    v = Keys<scalar_t>{};
    __builtin_memcpy(&v, p, static_cast<size_t>(len) * sizeof(scalar_t));
  }
  return v;
}

// Stores lanes [0, len) of bits as values at p.
template <typename scalar_t>
ASH_EXT_VEC_INLINE void store_bits(scalar_t* p, Keys<scalar_t> bits, int64_t len) {
  if (len >= kLanes) {
    __builtin_memcpy(p, &bits, sizeof(bits));
  } else {
    __builtin_memcpy(p, &bits, static_cast<size_t>(len) * sizeof(scalar_t));
  }
}

// order_key (ash_semantics.h) of 16 values given as raw bits: -0.0 as +0.0, NaN as the largest
// key, negative values with every bit flipped, non-negative ones with the sign bit set.
template <typename scalar_t>
ASH_EXT_VEC_INLINE Keys<scalar_t> keys_of(Keys<scalar_t> bits) {
  using T = KeyTraits<scalar_t>;
  using key_t = key_type<scalar_t>;
  using K = Keys<scalar_t>;
  using M = Mask<scalar_t>;
  constexpr int kTopBit = key_bits<key_t>() - 1;
  const K magnitude = bits & static_cast<key_t>(~T::kSign);
  const K canonical = magnitude == 0 ? K{} : bits;
  const K flip = reinterpret_cast<K>(reinterpret_cast<M>(canonical) >> kTopBit) | T::kSign;
  const K key = canonical ^ flip;
  return magnitude > T::kInfBits ? splat<K>(static_cast<key_t>(~key_t(0))) : key;
}

// The 16 values whose raw bits are `bits`, in the accumulation type (exact).
template <typename scalar_t>
ASH_EXT_VEC_INLINE Acc<scalar_t> to_acc(Keys<scalar_t> bits) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return reinterpret_cast<Acc<scalar_t>>(bits);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return reinterpret_cast<f32x16>(__builtin_convertvector(bits, u32x16) << 16);
  } else {
    // float16: the magnitude's bits moved into float32's places read 2^-112 times the value
    // (subnormals included, exactly), so one multiply by 2^112 rebiases the exponent; infinity
    // and NaN instead get float32's all-ones exponent, keeping NaN's payload.
    const u32x16 h = __builtin_convertvector(bits, u32x16);
    const u32x16 shifted = (h & 0x7FFFu) << 13;
    const f32x16 scaled = reinterpret_cast<f32x16>(shifted) * 0x1p112f;
    const u32x16 finite = reinterpret_cast<u32x16>(scaled);
    const u32x16 magnitude = shifted >= 0x0F800000u ? (shifted | 0x7F800000u) : finite;
    return reinterpret_cast<f32x16>(magnitude | ((h & 0x8000u) << 16));
  }
}

// The raw bits of 16 accumulation-type values rounded to scalar_t as static_cast does.
template <typename scalar_t>
ASH_EXT_VEC_INLINE Keys<scalar_t> from_acc(Acc<scalar_t> values) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return reinterpret_cast<Keys<scalar_t>>(values);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // Round to nearest even on the dropped 16 bits; NaN becomes c10's quiet NaN 0x7FC0.
    const u32x16 b = reinterpret_cast<u32x16>(values);
    const u32x16 rounded = (b + (((b >> 16) & 1u) + 0x7FFFu)) >> 16;
    const u32x16 result = (b & 0x7FFFFFFFu) > 0x7F800000u ? splat<u32x16>(0x7FC0u) : rounded;
    return __builtin_convertvector(result, u16x16);
  } else {
    // float16, round to nearest even. Normal results: rebias the exponent (127 -> 15) and round
    // the 13 dropped bits; subnormal ones: adding 0.5f leaves the value rounded to a multiple of
    // 2^-24 (0.5f's ulp) in the low mantissa bits -- a carry into 0x400 is the smallest normal.
    // NaN becomes c10's 0x7E00 with its sign; magnitudes from 65520 on round to infinity.
    const u32x16 b = reinterpret_cast<u32x16>(values);
    const u32x16 sign = (b >> 16) & 0x8000u;
    const u32x16 a = b & 0x7FFFFFFFu;
    const u32x16 normal = ((a - 0x38000000u) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    const u32x16 subnormal = reinterpret_cast<u32x16>(reinterpret_cast<f32x16>(a) + 0.5f) - 0x3F000000u;
    u32x16 result = a < 0x38800000u ? subnormal : normal;
    result = a >= 0x477FF000u ? splat<u32x16>(0x7C00u) : result;
    result = a > 0x7F800000u ? splat<u32x16>(0x7E00u) : result;
    return __builtin_convertvector(result | sign, u16x16);
  }
}

// The lanes of a sum register added in lane order 0..15 (the kernel's defined order).
template <typename V>
ASH_EXT_VEC_INLINE auto lanes_total(V lanes) {
  std::decay_t<decltype(lanes[0])> total = 0;
  for (int l = 0; l < kLanes; ++l) {
    total += lanes[l];
  }
  return total;
}

// A lane mask (-1 or 0 per lane, any lane width) as 32-bit lanes.
template <typename M>
ASH_EXT_VEC_INLINE i32x16 as_i32(M mask) {
  if constexpr (std::is_same_v<M, i32x16>) {
    return mask;
  } else {
    return __builtin_convertvector(mask, i32x16);
  }
}

// Bit l set where lane l of the mask is set.
template <typename M>
ASH_EXT_VEC_INLINE uint32_t bits_of(M mask) {
  const i32x16 m = as_i32(mask);
#if ASH_EXT_ISA_LEVEL >= 2
  return _mm512_cmplt_epi32_mask(reinterpret_cast<__m512i>(m), _mm512_setzero_si512());
#elif ASH_EXT_ISA_LEVEL == 1
  __m256i halves[2];
  __builtin_memcpy(halves, &m, sizeof(m));
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(halves[0]))) |
         (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(halves[1]))) << 8);
#elif defined(__SSE2__)
  __m128i quarters[4];
  __builtin_memcpy(quarters, &m, sizeof(m));
  uint32_t bits = 0;
  for (int q = 0; q < 4; ++q) {
    bits |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(quarters[q]))) << (4 * q);
  }
  return bits;
#else
  uint32_t bits = 0;
  for (int l = 0; l < kLanes; ++l) {
    bits |= static_cast<uint32_t>(m[l] != 0) << l;
  }
  return bits;
#endif
}

// Number of set lanes.
template <typename M>
ASH_EXT_VEC_INLINE int count_of(M mask) {
  return __builtin_popcount(bits_of(mask));
}

#if ASH_EXT_ISA_LEVEL == 1
// For each 8-bit lane mask, the indices of its set lanes in order, 3 bits each (a permute's
// indices for an AVX2 compress).
struct CompressTable {
  uint32_t indices[256];
  constexpr CompressTable() : indices() {
    for (uint32_t m = 0; m < 256; ++m) {
      uint32_t packed = 0;
      int slot = 0;
      for (uint32_t l = 0; l < 8; ++l) {
        if (m & (1u << l)) {
          packed |= l << (3 * slot++);
        }
      }
      indices[m] = packed;
    }
  }
};
inline constexpr CompressTable kCompressTable{};
#endif

// Writes the lanes of `keys` that `mask` selects to out[0, count), in lane order, and returns
// count. It may write all 16 lanes' worth after out (callers keep that much room), and has no
// branch on the mask: the lanes a pass gathers are too scattered for a predictable one.
template <typename key_t>
ASH_EXT_VEC_INLINE int64_t compress_store(typename KeyVectors<key_t>::keys keys,
                                          typename KeyVectors<key_t>::mask mask, key_t* out) {
#if ASH_EXT_ISA_LEVEL >= 2
  if constexpr (sizeof(key_t) == 4) {
    const __mmask16 m = static_cast<__mmask16>(bits_of(mask));
    _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(m, reinterpret_cast<__m512i>(keys)));
    return __builtin_popcount(m);
  } else if constexpr (sizeof(key_t) == 2) {
    // No 16-bit compress before VBMI2: widen, compress, narrow.
    const __mmask16 m = static_cast<__mmask16>(bits_of(mask));
    const __m512i wide = reinterpret_cast<__m512i>(__builtin_convertvector(keys, u32x16));
    const u16x16 narrow = __builtin_convertvector(reinterpret_cast<u32x16>(_mm512_maskz_compress_epi32(m, wide)), u16x16);
    __builtin_memcpy(out, &narrow, sizeof(narrow));
    return __builtin_popcount(m);
  } else {
    const uint32_t m = bits_of(mask);
    __m512i parts[2];
    __builtin_memcpy(parts, &keys, sizeof(keys));
    const __mmask8 low = static_cast<__mmask8>(m & 0xFF);
    const __mmask8 high = static_cast<__mmask8>(m >> 8);
    _mm512_storeu_si512(out, _mm512_maskz_compress_epi64(low, parts[0]));
    const int low_count = __builtin_popcount(low);
    _mm512_storeu_si512(out + low_count, _mm512_maskz_compress_epi64(high, parts[1]));
    return low_count + __builtin_popcount(high);
  }
#elif ASH_EXT_ISA_LEVEL == 1
  if constexpr (sizeof(key_t) == 4) {
    const uint32_t m = bits_of(mask);
    __m256i halves[2];
    __builtin_memcpy(halves, &keys, sizeof(keys));
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    int64_t count = 0;
    for (int h = 0; h < 2; ++h) {
      const uint32_t part = (m >> (8 * h)) & 0xFFu;
      const __m256i order = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(kCompressTable.indices[part])), shifts);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + count), _mm256_permutevar8x32_epi32(halves[h], order));
      count += __builtin_popcount(part);
    }
    return count;
  }
#endif
  // Every other case: each lane written, the position advanced where it is selected.
  const uint32_t m = bits_of(mask);
  int64_t count = 0;
  for (int l = 0; l < kLanes; ++l) {
    out[count] = keys[l];
    count += (m >> l) & 1u;
  }
  return count;
}

}  // namespace vec16
}  // namespace ASH_EXT_ISA_NS
}  // namespace ash_ext
