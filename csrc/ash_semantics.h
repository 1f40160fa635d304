// The semantics every backend of the ASH op shares, as host/device inline code.
//
// Selection works on order-preserving integer keys: key(a) < key(b) exactly when a ranks below b
// in torch.topk's order. Two canonicalisations make equal-comparing floats share one key, so that
// they are ties (broken by index) rather than ranked by their bit patterns:
//   * -0.0 and +0.0 both map to the key of +0.0;
//   * every NaN maps to the largest key (torch.topk ranks NaN above +inf).
// The tie rule: among the values equal to the k-th largest, the ones with the smallest index in
// the sample's logical (row-major) order are kept -- what a stable descending sort would keep.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace ash_ext {

// The shaping variants, numbered as the Python layer passes them: ASH-P, ASH-B, ASH-S, and SCALE
// (ASH-S's factor applied to every value, nothing pruned).
enum class Variant : int64_t { Prune = 0, Binarize = 1, Scale = 2, ScaleUnpruned = 3 };
constexpr int64_t kVariantCount = 4;

// Number of sample dimensions a permuted (e.g. channels_last) layout may have; inputs with more
// sample dimensions in a permuted layout are made contiguous first.
constexpr int kMaxSampleDims = 8;

// Where the elements of one sample sit in memory. Every backend sees inputs whose samples are
// dense blocks of n elements at offsets b * n ("batch-outer dense"); within a block the memory
// order may be a permutation of the logical order (channels_last), which matters only for the
// tie rule.
struct SampleLayout {
  int64_t batch = 0;
  int64_t n = 0;
  bool permuted = false;  // memory order within a sample differs from the logical order
  int ndim = 0;           // sample dimensions, used only when permuted
  int64_t sizes[kMaxSampleDims] = {};
  int64_t mem_strides[kMaxSampleDims] = {};      // element strides of the block in memory
  int64_t logical_strides[kMaxSampleDims] = {};  // row-major strides of the same dimensions
};

// Logical (row-major) index of the element at memory offset `offset` within its sample.
C10_HOST_DEVICE inline int64_t logical_index(const SampleLayout& layout, int64_t offset) {
  if (!layout.permuted) {
    return offset;
  }
  int64_t index = 0;
  for (int d = 0; d < layout.ndim; ++d) {
    const int64_t coordinate = (offset / layout.mem_strides[d]) % layout.sizes[d];
    index += coordinate * layout.logical_strides[d];
  }
  return index;
}

// Per-dtype facts: the unsigned key type, its width, the accumulation type.
template <typename scalar_t>
struct KeyTraits;

template <>
struct KeyTraits<c10::Half> {
  using key_t = uint16_t;
  using acc_t = float;
  static constexpr key_t kSign = 0x8000u;
  static constexpr key_t kInfBits = 0x7C00u;  // |x| bits above this are NaN
  C10_HOST_DEVICE static key_t bits(c10::Half v) { return v.x; }
  C10_HOST_DEVICE static c10::Half from_bits(key_t b) { return c10::Half(b, c10::Half::from_bits()); }
};

template <>
struct KeyTraits<c10::BFloat16> {
  using key_t = uint16_t;
  using acc_t = float;
  static constexpr key_t kSign = 0x8000u;
  static constexpr key_t kInfBits = 0x7F80u;
  C10_HOST_DEVICE static key_t bits(c10::BFloat16 v) { return v.x; }
  C10_HOST_DEVICE static c10::BFloat16 from_bits(key_t b) {
    return c10::BFloat16(b, c10::BFloat16::from_bits());
  }
};

template <>
struct KeyTraits<float> {
  using key_t = uint32_t;
  using acc_t = float;
  static constexpr key_t kSign = 0x80000000u;
  static constexpr key_t kInfBits = 0x7F800000u;
  C10_HOST_DEVICE static key_t bits(float v) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(v);
#else
    return __builtin_bit_cast(uint32_t, v);
#endif
  }
  C10_HOST_DEVICE static float from_bits(key_t b) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(b);
#else
    return __builtin_bit_cast(float, b);
#endif
  }
};

template <>
struct KeyTraits<double> {
  using key_t = uint64_t;
  using acc_t = double;
  static constexpr key_t kSign = 0x8000000000000000ull;
  static constexpr key_t kInfBits = 0x7FF0000000000000ull;
  C10_HOST_DEVICE static key_t bits(double v) {
#ifdef __CUDA_ARCH__
    return static_cast<uint64_t>(__double_as_longlong(v));
#else
    return __builtin_bit_cast(uint64_t, v);
#endif
  }
  C10_HOST_DEVICE static double from_bits(key_t b) {
#ifdef __CUDA_ARCH__
    return __longlong_as_double(static_cast<long long>(b));
#else
    return __builtin_bit_cast(double, b);
#endif
  }
};

template <typename scalar_t>
using key_type = typename KeyTraits<scalar_t>::key_t;
template <typename scalar_t>
using acc_type = typename KeyTraits<scalar_t>::acc_t;

template <typename key_t>
constexpr int key_bits() {
  return static_cast<int>(sizeof(key_t) * 8);
}

// The order-preserving key of v (canonicalising -0.0 and NaN as described above). Written
// without branches so that CPU loops over it vectorise.
template <typename scalar_t>
C10_HOST_DEVICE inline key_type<scalar_t> order_key(scalar_t v) {
  using T = KeyTraits<scalar_t>;
  using key_t = key_type<scalar_t>;
  constexpr key_t kAllOnes = static_cast<key_t>(~key_t(0));
  constexpr int kTopBit = key_bits<key_t>() - 1;
  key_t b = T::bits(v);
  const key_t magnitude = static_cast<key_t>(b & static_cast<key_t>(~T::kSign));
  b = magnitude == 0 ? key_t(0) : b;  // -0.0 ties with +0.0
  // Negative values: flip every bit; non-negative ones: set the sign bit.
  const key_t flip = static_cast<key_t>(static_cast<key_t>(key_t(0) - static_cast<key_t>(b >> kTopBit)) | T::kSign);
  const key_t key = static_cast<key_t>(b ^ flip);
  return magnitude > T::kInfBits ? kAllOnes : key;  // NaN: above +inf
}

// v where `keep`, else +0.0, by masking bits: no branch (CPU loops stay vectorisable and free of
// mispredictions) and no multiply (which would turn -x into -0.0 and inf or NaN into NaN).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t keep_or_zero(scalar_t v, bool keep) {
  using T = KeyTraits<scalar_t>;
  using key_t = key_type<scalar_t>;
  const key_t mask = static_cast<key_t>(key_t(0) - static_cast<key_t>(keep));
  return T::from_bits(static_cast<key_t>(T::bits(v) & mask));
}

// The value whose key is `key` (a canonical NaN for the NaN key).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t value_of_key(key_type<scalar_t> key) {
  using T = KeyTraits<scalar_t>;
  using key_t = key_type<scalar_t>;
  if (key == static_cast<key_t>(~key_t(0))) {
    // Quiet NaN: exponent all ones plus the top mantissa bit (the bit just below the exponent).
    const key_t quiet_bit = static_cast<key_t>((T::kInfBits >> 1) & static_cast<key_t>(~T::kInfBits));
    return T::from_bits(static_cast<key_t>(T::kInfBits | quiet_bit));
  }
  const key_t b = (key & T::kSign) ? static_cast<key_t>(key & static_cast<key_t>(~T::kSign))
                                   : static_cast<key_t>(~key);
  return T::from_bits(b);
}

// A clamp bound (given as a double) in the input's dtype, rounded as torch.clamp rounds a Python
// number for that dtype: to float first, then to the 16-bit type. Clamping to the rounded bound
// gives exactly torch's result (rounding is monotone and every input is representable).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t clamp_bound(double bound) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return bound;
  } else {
    return static_cast<scalar_t>(static_cast<float>(bound));
  }
}

// v clamped to [low, high] as torch.clamp does it: NaN stays NaN (both comparisons are false).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t clamp_value(scalar_t v, scalar_t low, scalar_t high) {
  return v < low ? low : (high < v ? high : v);
}

// ASH-S's and SCALE's factor exp(s1 / s2) in the accumulation type. A kept sum of zero (every
// kept value zero, none kept, or kept values cancelling) makes the reference's factor exp(s1 / 0):
// 0 where s1 < 0, which is kept (the reference's output is then all zeros, and finite); inf or
// NaN where s1 >= 0, replaced by 1, so that sample is shaped as by ASH-P (SCALE: left as it is)
// instead of being turned into NaN or inf.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t scale_factor(acc_t s1, acc_t s2) {
  if (s2 == acc_t(0)) {
    return s1 < acc_t(0) ? acc_t(0) : acc_t(1);
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    return ::expf(s1 / s2);
  } else {
    return ::exp(s1 / s2);
  }
}

}  // namespace ash_ext
