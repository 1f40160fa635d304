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

// Every function and lambda that takes or returns a vector is inlined: GCC 12 can get the calling
// convention of a struct of 256-bit vectors wrong in a function compiled under a target pragma
// (it returned one in ymm0 and then cleared ymm0's upper half with vzeroupper), so no vector
// may cross a real call. tests/test_cpu_isa.py checks the library for such functions.
#define ASH_EXT_VEC_INLINE __attribute__((always_inline)) inline
#define ASH_EXT_VEC_LAMBDA __attribute__((always_inline))

namespace ash_ext {
namespace ASH_EXT_ISA_NS {  // each ISA build its own copy: no code is shared across ISAs
namespace vec16 {

constexpr int kLanes = 16;

// The widest vector register of the ISA, in bytes. A 16-lane vector is built of native-width
// parts (GCC lowers wider generic vectors' compares and selects lane by lane, in scalar code).
#if ASH_EXT_ISA_LEVEL >= 2
constexpr int kNativeBytes = 64;
#elif ASH_EXT_ISA_LEVEL == 1
constexpr int kNativeBytes = 32;
#else
constexpr int kNativeBytes = 16;
#endif

template <typename T, int Bytes>
struct NativeVector {
  typedef T type __attribute__((vector_size(Bytes)));
};

// 16 lanes of T, lane l at memory offset l * sizeof(T) (so memcpy loads and stores them), held in
// kParts native vectors of kPartLanes lanes.
template <typename T>
struct V {
  static constexpr int kBytes = kLanes * static_cast<int>(sizeof(T));
  static constexpr int kPartBytes = kNativeBytes < kBytes ? kNativeBytes : kBytes;
  static constexpr int kParts = kBytes / kPartBytes;
  static constexpr int kPartLanes = kLanes / kParts;
  using Part = typename NativeVector<T, kPartBytes>::type;
  Part p[kParts];

  ASH_EXT_VEC_INLINE T operator[](int l) const { return p[l / kPartLanes][l % kPartLanes]; }
};

template <typename T>
using SignedOf = std::make_signed_t<std::conditional_t<std::is_floating_point_v<T>,
                                                       std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>, T>>;

// Lane-wise operators, part by part.
#define ASH_EXT_VEC_BINARY(op)                                         \
  template <typename T>                                                \
  ASH_EXT_VEC_INLINE V<T> operator op(V<T> a, const V<T>& b) {         \
    for (int i = 0; i < V<T>::kParts; ++i) a.p[i] = a.p[i] op b.p[i];  \
    return a;                                                          \
  }                                                                    \
  template <typename T, typename S, typename = std::enable_if_t<std::is_arithmetic_v<S>>> \
  ASH_EXT_VEC_INLINE V<T> operator op(V<T> a, S b) {                   \
    for (int i = 0; i < V<T>::kParts; ++i) a.p[i] = a.p[i] op static_cast<T>(b); \
    return a;                                                          \
  }
ASH_EXT_VEC_BINARY(+)
ASH_EXT_VEC_BINARY(-)
ASH_EXT_VEC_BINARY(*)
ASH_EXT_VEC_BINARY(&)
ASH_EXT_VEC_BINARY(|)
ASH_EXT_VEC_BINARY(^)
#undef ASH_EXT_VEC_BINARY

template <typename T>
ASH_EXT_VEC_INLINE V<T>& operator+=(V<T>& a, const V<T>& b) {
  return a = a + b;
}
template <typename T>
ASH_EXT_VEC_INLINE V<T>& operator-=(V<T>& a, const V<T>& b) {
  return a = a - b;
}
template <typename T>
ASH_EXT_VEC_INLINE V<T> operator>>(V<T> a, int shift) {
  for (int i = 0; i < V<T>::kParts; ++i) a.p[i] = a.p[i] >> shift;
  return a;
}
template <typename T>
ASH_EXT_VEC_INLINE V<T> operator<<(V<T> a, int shift) {
  for (int i = 0; i < V<T>::kParts; ++i) a.p[i] = a.p[i] << shift;
  return a;
}

// Compares give a mask: -1 (all ones) or 0 per lane, in signed lanes of T's width.
#define ASH_EXT_VEC_COMPARE(op)                                                              \
  template <typename T>                                                                      \
  ASH_EXT_VEC_INLINE V<SignedOf<T>> operator op(const V<T>& a, const V<T>& b) {              \
    V<SignedOf<T>> m;                                                                        \
    for (int i = 0; i < V<T>::kParts; ++i) m.p[i] = a.p[i] op b.p[i];                        \
    return m;                                                                                \
  }                                                                                          \
  template <typename T, typename S, typename = std::enable_if_t<std::is_arithmetic_v<S>>>   \
  ASH_EXT_VEC_INLINE V<SignedOf<T>> operator op(const V<T>& a, S b) {                        \
    V<SignedOf<T>> m;                                                                        \
    for (int i = 0; i < V<T>::kParts; ++i) m.p[i] = a.p[i] op static_cast<T>(b);             \
    return m;                                                                                \
  }
ASH_EXT_VEC_COMPARE(==)
ASH_EXT_VEC_COMPARE(<)
ASH_EXT_VEC_COMPARE(<=)
ASH_EXT_VEC_COMPARE(>)
ASH_EXT_VEC_COMPARE(>=)
#undef ASH_EXT_VEC_COMPARE

// a where the mask is set, else b (masks of T's width).
template <typename T>
ASH_EXT_VEC_INLINE V<T> select(const V<SignedOf<T>>& mask, const V<T>& a, const V<T>& b) {
  V<T> r;
  for (int i = 0; i < V<T>::kParts; ++i) r.p[i] = mask.p[i] ? a.p[i] : b.p[i];
  return r;
}

// The same bits as another lane type of the same width (part by part: no trip through memory).
template <typename To, typename From>
ASH_EXT_VEC_INLINE To bitcast(const From& from) {
  static_assert(sizeof(To) == sizeof(From) && To::kParts == From::kParts, "a bit cast keeps the lanes' width");
  To to;
  for (int i = 0; i < To::kParts; ++i) {
    to.p[i] = reinterpret_cast<typename To::Part>(from.p[i]);
  }
  return to;
}

// Lanes [Offset, Offset + sizeof...(I)) of a native vector, as a vector of that many lanes.
template <int Offset, typename Vec, int... I>
ASH_EXT_VEC_INLINE auto lanes_of(Vec v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, (Offset + I)...);
}

// Two vectors of n lanes as one of 2n.
template <typename Vec, int... I>
ASH_EXT_VEC_INLINE auto concatenated(Vec a, Vec b, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, I...);
}

template <typename To, typename From>
struct Conversion {
  using TU = std::decay_t<decltype(std::declval<To>()[0])>;
  using FU = std::decay_t<decltype(std::declval<From>()[0])>;
  // Chunks no wider than either side's native parts, so that no step needs a vector wider than
  // the ISA's registers (which GCC would convert lane by lane).
  static constexpr int kChunk = To::kPartLanes < From::kPartLanes ? To::kPartLanes : From::kPartLanes;
  static constexpr int kChunks = kLanes / kChunk;
  using ToChunk = typename NativeVector<TU, kChunk * static_cast<int>(sizeof(TU))>::type;

  template <int C>
  ASH_EXT_VEC_INLINE static ToChunk chunk(const From& from) {
    constexpr int first = C * kChunk;
    const auto part = from.p[first / From::kPartLanes];
    if constexpr (kChunk == From::kPartLanes) {
      return __builtin_convertvector(part, ToChunk);
    } else {
      const auto lanes = lanes_of<first % From::kPartLanes>(part, std::make_integer_sequence<int, kChunk>{});
      return __builtin_convertvector(lanes, ToChunk);
    }
  }

  template <int... C>
  ASH_EXT_VEC_INLINE static To run(const From& from, std::integer_sequence<int, C...>) {
    const ToChunk chunks[kChunks] = {chunk<C>(from)...};
    constexpr int per_part = To::kPartLanes / kChunk;  // 1, 2 or 4 chunks make a part
    To to;
    for (int j = 0; j < To::kParts; ++j) {
      const ToChunk* c = chunks + j * per_part;
      if constexpr (per_part == 1) {
        to.p[j] = c[0];
      } else if constexpr (per_part == 2) {
        to.p[j] = concatenated(c[0], c[1], std::make_integer_sequence<int, 2 * kChunk>{});
      } else {
        static_assert(per_part == 4, "parts are 1, 2 or 4 chunks");
        const auto low = concatenated(c[0], c[1], std::make_integer_sequence<int, 2 * kChunk>{});
        const auto high = concatenated(c[2], c[3], std::make_integer_sequence<int, 2 * kChunk>{});
        to.p[j] = concatenated(low, high, std::make_integer_sequence<int, 4 * kChunk>{});
      }
    }
    return to;
  }
};

// Lane-wise conversion to another lane type (as static_cast; masks keep -1 / 0).
template <typename To, typename From>
ASH_EXT_VEC_INLINE To convert(const From& from) {
  if constexpr (std::is_same_v<To, From>) {
    return from;
  } else {
    using C = Conversion<To, From>;
    return C::run(from, std::make_integer_sequence<int, C::kChunks>{});
  }
}

template <typename Vec, typename T>
ASH_EXT_VEC_INLINE Vec splat(T value) {
  using E = std::decay_t<decltype(std::declval<Vec>()[0])>;
  Vec v;
  for (int i = 0; i < Vec::kParts; ++i) {
    for (int l = 0; l < Vec::kPartLanes; ++l) {
      v.p[i][l] = static_cast<E>(value);
    }
  }
  return v;
}

using u16x16 = V<uint16_t>;
using i16x16 = V<int16_t>;
using u32x16 = V<uint32_t>;
using i32x16 = V<int32_t>;
using u64x16 = V<uint64_t>;
using i64x16 = V<int64_t>;
using f32x16 = V<float>;
using f64x16 = V<double>;

// 0, 1, ..., 15.
ASH_EXT_VEC_INLINE i32x16 lane_ids() {
  i32x16 ids;
  for (int l = 0; l < kLanes; ++l) {
    ids.p[l / i32x16::kPartLanes][l % i32x16::kPartLanes] = l;
  }
  return ids;
}

// The vector types of a key type: unsigned keys (and a dtype's raw bits), signed lane masks.
template <typename key_t>
struct KeyVectors {
  using keys = V<key_t>;
  using mask = V<std::make_signed_t<key_t>>;
};

template <typename acc_t>
struct AccVectors {
  using values = V<acc_t>;
};

template <typename scalar_t>
using Keys = typename KeyVectors<key_type<scalar_t>>::keys;  // raw bits or keys of 16 values
template <typename scalar_t>
using Mask = typename KeyVectors<key_type<scalar_t>>::mask;  // -1 (all ones) or 0 per lane
template <typename scalar_t>
using Acc = typename AccVectors<acc_type<scalar_t>>::values;  // 16 values in the accumulation type

// Lanes [0, len) from p (len <= 16; the other lanes are 0), one native load per part when whole.
template <typename T>
ASH_EXT_VEC_INLINE V<T> load(const T* p, int64_t len) {
  V<T> v;
  if (len >= kLanes) {
    for (int i = 0; i < V<T>::kParts; ++i) {
      __builtin_memcpy(&v.p[i], p + i * V<T>::kPartLanes, sizeof(v.p[i]));
    }
  } else {
    v = V<T>{};
    __builtin_memcpy(&v, p, static_cast<size_t>(len) * sizeof(T));
  }
  return v;
}

// Stores lanes [0, len) at p.
template <typename T>
ASH_EXT_VEC_INLINE void store(T* p, const V<T>& v, int64_t len) {
  if (len >= kLanes) {
    for (int i = 0; i < V<T>::kParts; ++i) {
      __builtin_memcpy(p + i * V<T>::kPartLanes, &v.p[i], sizeof(v.p[i]));
    }
  } else {
    __builtin_memcpy(p, &v, static_cast<size_t>(len) * sizeof(T));
  }
}

// The raw bits of the values at p[0, len) (the other lanes 0, i.e. +0.0), and their store.
template <typename scalar_t>
ASH_EXT_VEC_INLINE Keys<scalar_t> load_bits(const scalar_t* p, int64_t len) {
  return load(reinterpret_cast<const key_type<scalar_t>*>(p), len);
}

template <typename scalar_t>
ASH_EXT_VEC_INLINE void store_bits(scalar_t* p, const Keys<scalar_t>& bits, int64_t len) {
  store(reinterpret_cast<key_type<scalar_t>*>(p), bits, len);
}

// order_key (ash_semantics.h) of 16 values given as raw bits: -0.0 as +0.0, NaN as the largest
// key, negative values with every bit flipped, non-negative ones with the sign bit set.
template <typename scalar_t>
ASH_EXT_VEC_INLINE Keys<scalar_t> keys_of(const Keys<scalar_t>& bits) {
  using T = KeyTraits<scalar_t>;
  using key_t = key_type<scalar_t>;
  using K = Keys<scalar_t>;
  using M = Mask<scalar_t>;
  const K magnitude = bits & static_cast<key_t>(~T::kSign);
  const K canonical = select(magnitude == 0, K{}, bits);
  // All ones where the sign bit is set: a signed compare, which every ISA has for every lane width
  // (AVX2 has no 64-bit arithmetic shift).
  const K flip = bitcast<K>(bitcast<M>(canonical) < 0) | T::kSign;
  return select(magnitude > T::kInfBits, splat<K>(static_cast<key_t>(~key_t(0))), canonical ^ flip);
}

// The 16 values whose raw bits are `bits`, in the accumulation type (exact).
template <typename scalar_t>
ASH_EXT_VEC_INLINE Acc<scalar_t> to_acc(const Keys<scalar_t>& bits) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return bitcast<Acc<scalar_t>>(bits);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return bitcast<f32x16>(convert<u32x16>(bits) << 16);
  } else {
#if ASH_EXT_ISA_LEVEL >= 1
    // F16C. It quiets a signalling NaN where the integer path below keeps it signalling; every
    // use of these values is arithmetic, which quiets it alike, so the results do not differ.
    f32x16 wide;
    for (int i = 0; i < f32x16::kParts; ++i) {
#if ASH_EXT_ISA_LEVEL >= 2
      wide.p[i] = reinterpret_cast<f32x16::Part>(_mm512_cvtph_ps(reinterpret_cast<__m256i>(bits.p[0])));
#else
      const __m128i lower = reinterpret_cast<__m128i>(lanes_of<0>(bits.p[0], std::make_integer_sequence<int, 8>{}));
      const __m128i upper = reinterpret_cast<__m128i>(lanes_of<8>(bits.p[0], std::make_integer_sequence<int, 8>{}));
      wide.p[i] = reinterpret_cast<f32x16::Part>(_mm256_cvtph_ps(i == 0 ? lower : upper));
#endif
    }
    return wide;
#else
    // float16: the magnitude's bits moved into float32's places read 2^-112 times the value
    // (subnormals included, exactly), so one multiply by 2^112 rebiases the exponent; infinity
    // and NaN instead get float32's all-ones exponent, keeping NaN's payload.
    const u32x16 h = convert<u32x16>(bits);
    const u32x16 shifted = (h & 0x7FFFu) << 13;
    const u32x16 finite = bitcast<u32x16>(bitcast<f32x16>(shifted) * 0x1p112f);
    const u32x16 magnitude = select(shifted >= 0x0F800000u, shifted | 0x7F800000u, finite);
    return bitcast<f32x16>(magnitude | ((h & 0x8000u) << 16));
#endif
  }
}

// The raw bits of 16 accumulation-type values rounded to scalar_t as static_cast does.
template <typename scalar_t>
ASH_EXT_VEC_INLINE Keys<scalar_t> from_acc(const Acc<scalar_t>& values) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return bitcast<Keys<scalar_t>>(values);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // Round to nearest even on the dropped 16 bits; NaN becomes c10's quiet NaN 0x7FC0.
    const u32x16 b = bitcast<u32x16>(values);
    const u32x16 rounded = (b + (((b >> 16) & 1u) + 0x7FFFu)) >> 16;
    return convert<u16x16>(select((b & 0x7FFFFFFFu) > 0x7F800000u, splat<u32x16>(0x7FC0u), rounded));
  } else {
#if ASH_EXT_ISA_LEVEL >= 1
    // F16C rounds to nearest even as c10 does; only NaN differs (it keeps the payload's top bits):
    // those lanes get c10's 0x7E00 with the sign.
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    u16x16 narrow;
#if ASH_EXT_ISA_LEVEL >= 2
    narrow.p[0] = reinterpret_cast<u16x16::Part>(_mm512_cvtps_ph(reinterpret_cast<__m512>(values.p[0]), kRound));
#else
    using Half8 = NativeVector<uint16_t, 16>::type;
    const auto lower = reinterpret_cast<Half8>(_mm256_cvtps_ph(reinterpret_cast<__m256>(values.p[0]), kRound));
    const auto upper = reinterpret_cast<Half8>(_mm256_cvtps_ph(reinterpret_cast<__m256>(values.p[1]), kRound));
    narrow.p[0] = concatenated(lower, upper, std::make_integer_sequence<int, 16>{});
#endif
    const u32x16 b = bitcast<u32x16>(values);
    const i16x16 nan = convert<i16x16>((b & 0x7FFFFFFFu) > 0x7F800000u);
    const u16x16 quiet = convert<u16x16>(((b >> 16) & 0x8000u) | 0x7E00u);
    return select(nan, quiet, narrow);
#else
    // float16, round to nearest even. Normal results: rebias the exponent (127 -> 15) and round
    // the 13 dropped bits; subnormal ones: adding 0.5f leaves the value rounded to a multiple of
    // 2^-24 (0.5f's ulp) in the low mantissa bits -- a carry into 0x400 is the smallest normal.
    // NaN becomes c10's 0x7E00 with its sign; magnitudes from 65520 on round to infinity.
    const u32x16 b = bitcast<u32x16>(values);
    const u32x16 sign = (b >> 16) & 0x8000u;
    const u32x16 a = b & 0x7FFFFFFFu;
    const u32x16 normal = ((a - 0x38000000u) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    const u32x16 subnormal = bitcast<u32x16>(bitcast<f32x16>(a) + 0.5f) - 0x3F000000u;
    u32x16 result = select(a < 0x38800000u, subnormal, normal);
    result = select(a >= 0x477FF000u, splat<u32x16>(0x7C00u), result);
    result = select(a > 0x7F800000u, splat<u32x16>(0x7E00u), result);
    return convert<u16x16>(result | sign);
#endif
  }
}

// The lanes added in lane order 0..15 (the kernel's defined order of a sum's lanes).
template <typename T>
ASH_EXT_VEC_INLINE T lanes_total(const V<T>& lanes) {
  T total = 0;
  for (int l = 0; l < kLanes; ++l) {
    total += lanes[l];
  }
  return total;
}

// A lane mask (-1 or 0 per lane, any lane width) as 32-bit lanes.
template <typename M>
ASH_EXT_VEC_INLINE i32x16 as_i32(const M& mask) {
  return convert<i32x16>(mask);
}

// Bit l set where lane l of the mask is set.
template <typename M>
ASH_EXT_VEC_INLINE uint32_t bits_of(const M& mask) {
  const i32x16 m = as_i32(mask);
#if ASH_EXT_ISA_LEVEL >= 2
  return _mm512_movepi32_mask(reinterpret_cast<__m512i>(m.p[0]));
#elif ASH_EXT_ISA_LEVEL == 1
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(reinterpret_cast<__m256i>(m.p[0])))) |
         (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(reinterpret_cast<__m256i>(m.p[1])))) << 8);
#elif defined(__SSE2__)
  uint32_t bits = 0;
  for (int q = 0; q < 4; ++q) {
    bits |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(reinterpret_cast<__m128i>(m.p[q])))) << (4 * q);
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
ASH_EXT_VEC_INLINE int count_of(const M& mask) {
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
ASH_EXT_VEC_INLINE int64_t compress_store(const V<key_t>& keys, const V<std::make_signed_t<key_t>>& mask, key_t* out) {
  const uint32_t m = bits_of(mask);
#if ASH_EXT_ISA_LEVEL >= 2
  if constexpr (sizeof(key_t) == 4) {
    _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), reinterpret_cast<__m512i>(keys.p[0])));
    return __builtin_popcount(m);
  } else if constexpr (sizeof(key_t) == 2) {
    // No 16-bit compress before VBMI2: widen, compress, narrow.
    const u32x16 wide = convert<u32x16>(keys);
    u32x16 packed;
    packed.p[0] = reinterpret_cast<u32x16::Part>(
        _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), reinterpret_cast<__m512i>(wide.p[0])));
    const u16x16 narrow = convert<u16x16>(packed);
    __builtin_memcpy(out, &narrow, sizeof(narrow));
    return __builtin_popcount(m);
  } else {
    const auto low = static_cast<__mmask8>(m & 0xFF);
    const auto high = static_cast<__mmask8>(m >> 8);
    _mm512_storeu_si512(out, _mm512_maskz_compress_epi64(low, reinterpret_cast<__m512i>(keys.p[0])));
    const int low_count = __builtin_popcount(low);
    _mm512_storeu_si512(out + low_count, _mm512_maskz_compress_epi64(high, reinterpret_cast<__m512i>(keys.p[1])));
    return low_count + __builtin_popcount(high);
  }
#elif ASH_EXT_ISA_LEVEL == 1
  if constexpr (sizeof(key_t) == 4) {
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    int64_t count = 0;
    for (int h = 0; h < 2; ++h) {
      const uint32_t part = (m >> (8 * h)) & 0xFFu;
      const __m256i order = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(kCompressTable.indices[part])), shifts);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + count),
                          _mm256_permutevar8x32_epi32(reinterpret_cast<__m256i>(keys.p[h]), order));
      count += __builtin_popcount(part);
    }
    return count;
  }
#endif
  // Every other case: each lane written, the position advanced where it is selected.
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
