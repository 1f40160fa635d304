// The CPU kernel of the ASH op family, written once over vec16.h and compiled once per ISA
// (isa_baseline.cpp, isa_avx2.cpp, isa_avx512.cpp), each copy in its own namespace; ash_cpu.cpp
// picks one at run time. An O(n) radix select of each sample's k-th largest key, then one fused
// output pass.
//
// Per sample:
//   W. when the thread has a guess -- a key window around the previous sample's threshold,
//      as samples of one batch tend to have similar thresholds -- one pass over the values
//      (from memory) sums them (s1), counts the keys above the window and compress-stores the
//      keys inside it. If the k-th largest key lies in the window, go to C with those keys.
//   A. otherwise one pass: s1 and a histogram of the keys' top digit;
//   B. one pass (the sample is now in cache) gathering the keys of the threshold's digit;
//   C. the threshold among the gathered keys only: rounds of a narrowing key window (vector
//      compares and compress-stores), else radix digits, which leaves the exact threshold key T,
//      the number of ties at T and how many of them to keep;
//   D. when only some ties are kept: the largest logical index among the kept ties;
//   E. the output pass (ASH-S and SCALE first sum the kept values, s2, reading the sample from
//      cache; SCALE's output pass scales every value, nothing pruned). topk_stats stops before
//      it: the threshold, s1 and s2 are its results.
//
// Each sample has its own k where the call gives k_per_sample (a sample with k == 0 skips the
// selection). With clamp bounds, a sample is first clamped into a buffer -- its own output
// slice, or for topk_stats the thread's scratch -- and every pass above reads that buffer.
//
// Every sum is taken in a fixed order -- 16 lanes within blocks of kSumBlock values, blocks in
// order (cpu_common.h) -- so a sample's result depends on nothing but the sample: not on the
// batch it is in, the thread count, the path the selection took, or the ISA.
//
// Samples are spread over threads; a batch smaller than the thread count splits each sample's
// passes over the threads instead.
//
// Include only from an ISA build, after cpu_kernel_deps.h, with ASH_EXT_ISA_NS naming its
// namespace.
#pragma once

#include "vec16.h"

namespace ash_ext {
namespace ASH_EXT_ISA_NS {
namespace {

using vec16::Acc;
using vec16::Keys;
using vec16::Mask;

static_assert(kLanes == vec16::kLanes, "one 16-lane vector is one set of sum lanes");

// Digit widths: 11-bit digits for long samples; short ones (pooled features) use 8-bit digits,
// whose histograms cost little to clear and scan next to a sample of a few thousand values.
struct LongSampleRadix {
  static constexpr int kFirstBits = 11;
  static constexpr int kLaterBits = 11;
  static constexpr int kHistCopies = 4;  // interleaved histograms: runs of equal keys don't serialise
  static constexpr int64_t kFirstBuckets = int64_t(1) << kFirstBits;
};
struct ShortSampleRadix {
  static constexpr int kFirstBits = 8;
  static constexpr int kLaterBits = 8;
  static constexpr int kHistCopies = 2;
  static constexpr int64_t kFirstBuckets = int64_t(1) << kFirstBits;
};
constexpr int64_t kShortSample = 16384;  // samples up to this size use ShortSampleRadix
constexpr int64_t kMinChunk = 16384;     // below this a sample is not split over threads

template <typename Radix, typename key_t>
constexpr int first_shift() {
  return key_bits<key_t>() - Radix::kFirstBits;
}

// What the selection found for one sample.
template <typename key_t, typename acc_t>
struct Selection {
  key_t threshold = 0;  // T, the key of the k-th largest value
  int64_t ties = 0;     // values whose key is T
  int64_t need = 0;     // of those, how many are kept
  int64_t tie_cut = 0;  // a tie is kept iff its logical index <= tie_cut (when need < ties)
  acc_t sum = 0;        // s1, the sum of the whole sample
  bool partial_ties() const { return need < ties; }
};

// Where pass W looks for the next sample's threshold: a key window around the last threshold
// this thread found. It is kept per thread (and per dtype and digit width) from one op call to
// the next, as consecutive batches of one layer have similar thresholds; a stale guess costs
// one pass W that misses. It only ever affects speed: results do not depend on the path taken.
template <typename key_t>
struct ThresholdGuess {
  bool valid = false;   // whether threshold holds a previous threshold
  key_t threshold = 0;  // the previous sample's threshold key
  key_t half_width = 0; // of the key window around it, adapted as guesses hit or miss
};

// n elements left uninitialised. The candidate buffer is sized for the worst case, every key of
// the sample, but a sample writes only as many keys as its window or top digit gathers (for one
// sample of 2^31 float16 values a few hundred MiB of the 4 GiB); the pages past them are never
// touched, so they never become resident (std::vector's resize would zero-fill all of them).
template <typename T>
class UninitializedBuffer {
  static_assert(std::is_trivial_v<T>, "no constructor may need to run");

 public:
  size_t size() const { return size_; }
  T* data() { return data_.get(); }
  // Discards the contents (every call fills the buffer before reading it).
  void resize(size_t n) {
    data_.reset(new T[n]);  // default-initialised: left uninitialised for a trivial T
    size_ = n;
  }
  void release() {
    data_.reset();
    size_ = 0;
  }

 private:
  std::unique_ptr<T[]> data_;
  size_t size_ = 0;
};

// A thread's working memory, kept from one call to the next (per dtype and digit width) and
// grown to the largest sample the thread has seen, up to kRetainedScratchValues (see
// ScratchLease): allocating it per call would cost short samples more than their selection.
// Used by its own thread, and by the chunks of a split sample (disjoint parts) while that thread
// waits for them.
template <typename Radix, typename scalar_t>
struct Scratch {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  std::vector<uint32_t> hist = std::vector<uint32_t>(Radix::kHistCopies * Radix::kFirstBuckets);
  UninitializedBuffer<key_t> candidates;  // gathered keys, with kLanes slots of room for whole-vector stores
  std::vector<key_t> spare;          // pass C's second buffer of keys, grown to the candidates' count
  std::vector<int64_t> tie_indices;  // logical indices of ties, permuted layouts only
  std::vector<int64_t> counts;       // top-digit counts, one histogram per chunk
  std::vector<acc_t> block_sums;     // s1 per sum block
  std::vector<acc_t> kept_sums;      // s2 per sum block (ASH-S)
  std::vector<scalar_t> masked;      // one sum block of kept values (ASH-S, permuted layouts)
  std::vector<int64_t> gathered;     // keys gathered per chunk
  std::vector<int64_t> chunk_above;  // keys above the window per chunk
  std::vector<scalar_t> clamped;     // the clamped sample (topk_stats with clamp bounds)
  ThresholdGuess<key_t> guess;

  // Frees the buffers whose size follows the sample's (the guess and the histograms stay).
  void release_sample_buffers() {
    candidates.release();
    std::vector<key_t>().swap(spare);
    std::vector<int64_t>().swap(tie_indices);
    std::vector<acc_t>().swap(block_sums);
    std::vector<acc_t>().swap(kept_sums);
    std::vector<scalar_t>().swap(masked);
    std::vector<scalar_t>().swap(clamped);
  }
};

// This thread's scratch, with room for samples of n values.
template <typename Radix, typename scalar_t>
Scratch<Radix, scalar_t>& this_threads_scratch(int64_t n) {
  thread_local Scratch<Radix, scalar_t> scratch;
  const auto room = static_cast<size_t>(n + kLanes);
  if (scratch.candidates.size() < room) {
    scratch.candidates.resize(room);
  }
  return scratch;
}

// Samples up to this many values leave their buffers in the thread's scratch for the next call;
// a longer sample's are freed when it is done, so that one huge call does not leave every
// thread it ran on holding buffers of its size (2^31 float32 values: 8 GiB of candidates, plus
// the clamped copy). Allocating them again costs little next to reading such a sample.
constexpr int64_t kRetainedScratchValues = int64_t(1) << 22;

// This thread's scratch for the samples of n values that one task handles, released (above)
// when the task ends.
template <typename Radix, typename scalar_t>
class ScratchLease {
 public:
  explicit ScratchLease(int64_t n) : scratch_(this_threads_scratch<Radix, scalar_t>(n)), n_(n) {}
  ~ScratchLease() {
    if (n_ > kRetainedScratchValues) {
      scratch_.release_sample_buffers();
    }
  }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  Scratch<Radix, scalar_t>& get() { return scratch_; }

 private:
  Scratch<Radix, scalar_t>& scratch_;
  int64_t n_;
};

// The lanes of a step that hold values: all 16 (Full), or the first len of a sample's last step.
struct Full {
  static constexpr int64_t value = kLanes;
};

template <typename M, typename Len>
ASH_EXT_VEC_INLINE M valid_lanes(Len len) {
  if constexpr (std::is_same_v<Len, Full>) {
    return vec16::splat<M>(-1);
  } else {
    return vec16::convert<M>(vec16::lane_ids() < static_cast<int32_t>(len));
  }
}

template <typename Len>
ASH_EXT_VEC_INLINE int64_t length(Len len) {
  if constexpr (std::is_same_v<Len, Full>) {
    return kLanes;
  } else {
    return len;
  }
}

// Calls step(i, len) for the 16-value steps at offsets [begin, end): whole ones (len a Full,
// which the compiler folds away), then the partial last one (len an int64_t).
template <typename Step>
ASH_EXT_VEC_INLINE void for_steps(int64_t begin, int64_t end, const Step& step) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    step(i, Full{});
  }
  if (i < end) {
    step(i, end - i);
  }
}

// Calls per_block(block, begin, end) for the sum blocks [first_block, last_block).
template <typename F>
ASH_EXT_VEC_INLINE void for_sum_blocks(int64_t n, int64_t first_block, int64_t last_block, const F& per_block) {
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * kSumBlock;
    per_block(block, begin, std::min(n, begin + kSumBlock));
  }
}

// The sums of the sum blocks [first_block, last_block) into block_sums.
template <typename scalar_t>
void sum_blocks(const scalar_t* in, int64_t n, int64_t first_block, int64_t last_block, acc_type<scalar_t>* block_sums) {
  for_sum_blocks(n, first_block, last_block, [&](int64_t block, int64_t begin, int64_t end) {
    Acc<scalar_t> sum = {};
    for_steps(begin, end, [&](int64_t i, auto len) {
      sum += vec16::to_acc<scalar_t>(vec16::load_bits(in + i, length(len)));
    });
    block_sums[block] = vec16::lanes_total(sum);
  });
}

// Pass A over the sum blocks [first_block, last_block): each block's sum into block_sums and
// the top-digit histogram added to `counts`. The keys of a tile are stored, then counted (the
// histogram's read-modify-writes are scalar).
template <typename Radix, typename scalar_t>
void pass_a(const scalar_t* in, int64_t n, int64_t first_block, int64_t last_block, uint32_t* hist, int64_t* counts,
            acc_type<scalar_t>* block_sums) {
  using key_t = key_type<scalar_t>;
  constexpr int shift = first_shift<Radix, key_t>();
  constexpr int copies = Radix::kHistCopies;
  constexpr int64_t buckets = Radix::kFirstBuckets;
  std::fill(hist, hist + copies * buckets, 0u);
  alignas(64) key_t keys[kTile];
  for_sum_blocks(n, first_block, last_block, [&](int64_t block, int64_t begin, int64_t end) {
    Acc<scalar_t> sum = {};
    for (int64_t tile = begin; tile < end; tile += kTile) {
      const int64_t len = std::min(kTile, end - tile);
      for_steps(0, len, [&](int64_t j, auto step_len) {
        const Keys<scalar_t> bits = vec16::load_bits(in + tile + j, length(step_len));
        sum += vec16::to_acc<scalar_t>(bits);
        const Keys<scalar_t> key = vec16::keys_of<scalar_t>(bits);
        vec16::store(keys + j, key, kLanes);
      });
      for (int64_t j = 0; j < len; ++j) {
        ++hist[(j % copies) * buckets + (keys[j] >> shift)];
      }
    }
    block_sums[block] = vec16::lanes_total(sum);
  });
  // uint32 counts are exact: a call covers fewer than 2^32 values (ChunkPlan).
  for (int64_t b = 0; b < buckets; ++b) {
    int64_t c = 0;
    for (int copy = 0; copy < copies; ++copy) {
      c += hist[copy * buckets + b];
    }
    counts[b] += c;
  }
}

// Pass W over the sum blocks [first_block, last_block): each block's sum into block_sums, the
// number of keys above `hi` into *above, and the keys in [lo, hi] appended to `gathered` in
// memory order (with kLanes slots of room after). Returns the number gathered.
template <typename scalar_t>
int64_t pass_window(const scalar_t* in, int64_t n, int64_t first_block, int64_t last_block, key_type<scalar_t> lo,
                    key_type<scalar_t> hi, acc_type<scalar_t>* block_sums, key_type<scalar_t>* gathered,
                    int64_t* above) {
  using K = Keys<scalar_t>;
  using M = Mask<scalar_t>;
  const K low = vec16::splat<K>(lo);
  const K span = vec16::splat<K>(static_cast<key_type<scalar_t>>(hi - lo));
  const K high = vec16::splat<K>(hi);
  int64_t count = 0;
  int64_t above_total = 0;
  for_sum_blocks(n, first_block, last_block, [&](int64_t block, int64_t begin, int64_t end) {
    Acc<scalar_t> sum = {};
    M above_lanes = {};  // minus the per-lane counts, at most kSumBlock / 16 = 256: fit every lane width
    for_steps(begin, end, [&](int64_t i, auto len) {
      const K bits = vec16::load_bits(in + i, length(len));
      sum += vec16::to_acc<scalar_t>(bits);
      const K key = vec16::keys_of<scalar_t>(bits);
      const M valid = valid_lanes<M>(len);
      above_lanes += M(key > high) & valid;
      const M inside = M((key - low) <= span) & valid;
      count += vec16::compress_store<key_type<scalar_t>>(key, inside, gathered + count);
    });
    block_sums[block] = vec16::lanes_total(sum);
    for (int l = 0; l < kLanes; ++l) {
      above_total -= above_lanes[l];
    }
  });
  *above = above_total;
  return count;
}

// Pass B over [begin, end): appends the keys whose top digit (key >> shift) is `digit` to
// `gathered` (with kLanes slots of room after). Returns the number gathered.
template <typename Radix, typename scalar_t>
int64_t pass_b(const scalar_t* in, int64_t begin, int64_t end, key_type<scalar_t> digit, key_type<scalar_t>* gathered) {
  using key_t = key_type<scalar_t>;
  using K = Keys<scalar_t>;
  using M = Mask<scalar_t>;
  const K wanted = vec16::splat<K>(digit);
  int64_t count = 0;
  for_steps(begin, end, [&](int64_t i, auto len) {
    const K key = vec16::keys_of<scalar_t>(vec16::load_bits(in + i, length(len)));
    const M match = M((key >> first_shift<Radix, key_t>()) == wanted) & valid_lanes<M>(len);
    count += vec16::compress_store<key_t>(key, match, gathered + count);
  });
  return count;
}

// Walks the buckets from the top; returns the bucket holding the `want`-th largest key and sets
// *above to the number of keys in the buckets above it.
int64_t find_bucket(const int64_t* counts, int64_t buckets, int64_t want, int64_t* above) {
  int64_t cumulative = 0;
  for (int64_t b = buckets - 1; b > 0; --b) {
    if (cumulative + counts[b] >= want) {
      *above = cumulative;
      return b;
    }
    cumulative += counts[b];
  }
  *above = cumulative;
  return 0;
}

// Candidate sets this small are ranked pairwise instead of by further radix digits: a digit
// costs a histogram clear and scan whatever the number of keys.
constexpr int64_t kRankPairwise = 32;
// Candidate sets up to this size take digits of at most 8 bits (a 256-bucket histogram).
constexpr int64_t kNarrowDigitCount = 4096;

// Pass C by radix digits: selects the `want`-th largest (1 <= want <= count) of the gathered
// keys -- which hold every key equal to it -- and sets sel.threshold, sel.ties and sel.need.
template <typename Radix, typename key_t, typename acc_t>
void select_by_digits(key_t* keys, int64_t count, int64_t want, Selection<key_t, acc_t>& sel) {
  constexpr int total_bits = key_bits<key_t>();
  // The top bits every candidate shares need no digit (a window's keys share most of them,
  // a top digit's keys at least that digit).
  key_t differ = 0;
  for (int64_t i = 0; i < count; ++i) {
    differ |= static_cast<key_t>(keys[i] ^ keys[0]);
  }
  int done_bits = differ == 0 ? total_bits : __builtin_clzll(static_cast<unsigned long long>(differ)) - (64 - total_bits);
  std::array<int64_t, (1 << Radix::kLaterBits)> counts;
  while (done_bits < total_bits && count > kRankPairwise) {
    const int width = count > kNarrowDigitCount ? Radix::kLaterBits : std::min(Radix::kLaterBits, 8);
    const int digit_bits = std::min(width, total_bits - done_bits);
    const int shift = total_bits - done_bits - digit_bits;
    const key_t mask = static_cast<key_t>((key_t(1) << digit_bits) - 1);
    const int64_t buckets = int64_t(1) << digit_bits;
    std::fill(counts.begin(), counts.begin() + buckets, 0);
    for (int64_t i = 0; i < count; ++i) {
      ++counts[(keys[i] >> shift) & mask];
    }
    int64_t above = 0;
    const key_t bucket = static_cast<key_t>(find_bucket(counts.data(), buckets, want, &above));
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) {
      keys[kept] = keys[i];
      kept += static_cast<key_t>((keys[i] >> shift) & mask) == bucket;
    }
    want -= above;
    count = kept;
    done_bits += digit_bits;
  }
  if (done_bits >= total_bits) {  // every candidate left is the threshold
    sel.threshold = keys[0];
    sel.ties = count;
    sel.need = want;
    return;
  }
  // The key with fewer than `want` keys above it and at least `want` at or above it.
  for (int64_t i = 0; i < count; ++i) {
    int64_t greater = 0;
    int64_t equal = 0;
    for (int64_t j = 0; j < count; ++j) {
      greater += keys[j] > keys[i];
      equal += keys[j] == keys[i];
    }
    if (greater < want && want <= greater + equal) {
      sel.threshold = keys[i];
      sel.ties = equal;
      sel.need = want - greater;
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "ash_ext: no candidate ranks ", want);
}

// Pass C for keys of up to 32 bits, by rounds of a window instead of radix digits (whose
// histogram update is one scalar read-modify-write per key). The want-th largest of some keys is
// near where its rank puts it if the keys were spread evenly over their range -- and a window
// around a threshold is narrow, so they nearly are. Each round counts the keys above a window
// around that estimate, some sqrt(count) ranks either side, and compress-stores the keys inside,
// all with vector compares: the next round has only those. A window that misses still tells how
// many keys lie beyond it, which narrows the key range the answer is in (the keys stay put).
template <typename key_t>
struct RankRounds {
  bool found;        // whether threshold, ties and need hold the answer
  key_t threshold;   // the want-th largest key
  int64_t ties;      // keys equal to it
  int64_t need;      // of those, how many rank within want
  key_t* keys;       // else: the answer is the want-th largest of keys[0, count)
  int64_t count;
  int64_t want;
};

// At most this many keys are ranked by compares against all of them (two vectors).
constexpr int64_t kRankInRegisters = 32;
// Window rounds before pass C falls back to digits; each costs one vector pass over the keys
// left. Two rounds usually bring a window's keys down to a few dozen.
constexpr int kRankRounds = 6;

template <typename key_t>
using KeyVec = typename vec16::KeyVectors<key_t>::keys;
template <typename key_t>
using MaskVec = typename vec16::KeyVectors<key_t>::mask;

// The smallest and largest of keys[0, count), count >= 1.
template <typename key_t>
void key_span(const key_t* keys, int64_t count, key_t* smallest, key_t* largest) {
  using K = KeyVec<key_t>;
  K low = vec16::splat<K>(static_cast<key_t>(~key_t(0)));
  K high = {};
  for_steps(0, count, [&](int64_t i, auto len) {
    const K key = vec16::load(keys + i, length(len));
    const MaskVec<key_t> valid = valid_lanes<MaskVec<key_t>>(len);
    low = vec16::select(valid & (key < low), key, low);
    high = vec16::select(valid & (key > high), key, high);
  });
  *smallest = low[0];
  *largest = high[0];
  for (int l = 1; l < kLanes; ++l) {
    *smallest = std::min<key_t>(*smallest, low[l]);
    *largest = std::max<key_t>(*largest, high[l]);
  }
}

// The want-th largest of keys[0, count) (1 <= want <= count <= kRankInRegisters): each key's
// rank by compares against all of them.
template <typename key_t>
RankRounds<key_t> rank_in_registers(key_t* keys, int64_t count, int64_t want) {
  using K = KeyVec<key_t>;
  using M = MaskVec<key_t>;
  K part[2] = {};
  __builtin_memcpy(&part[0], keys, sizeof(key_t) * std::min<int64_t>(count, kLanes));
  if (count > kLanes) {
    __builtin_memcpy(&part[1], keys + kLanes, sizeof(key_t) * (count - kLanes));
  }
  const M valid[2] = {valid_lanes<M>(std::min<int64_t>(count, kLanes)), valid_lanes<M>(std::max<int64_t>(count - kLanes, 0))};
  for (int64_t i = 0; i < count; ++i) {
    const K key = vec16::splat<K>(keys[i]);
    int64_t greater = 0;
    int64_t equal = 0;
    for (int h = 0; h < 2; ++h) {
      greater += vec16::count_of(M(part[h] > key) & valid[h]);
      equal += vec16::count_of(M(part[h] == key) & valid[h]);
    }
    if (greater < want && want <= greater + equal) {
      return RankRounds<key_t>{true, keys[i], equal, want - greater, keys, count, want};
    }
  }
  return RankRounds<key_t>{false, 0, 0, 0, keys, count, want};  // only for want outside [1, count]
}

// Runs up to max_rounds window rounds on the want-th largest of keys[0, count) (1 <= want <=
// count), `spare` holding as many keys (both with kLanes slots of room after them); finishes by
// compares when at most kRankInRegisters keys are left. Not found: the caller selects among the
// keys left by any exact method.
template <typename key_t>
RankRounds<key_t> rank_rounds(key_t* keys, key_t* spare, int64_t count, int64_t want, int max_rounds) {
  static_assert(sizeof(key_t) <= 4, "the estimate's double arithmetic is exact for keys of up to 32 bits");
  using K = KeyVec<key_t>;
  using M = MaskVec<key_t>;
  // The answer lies in [lo, hi]; `above` keys are above hi and `within` keys in [lo, hi], so
  // above < want <= above + within.
  key_t lo = 0;
  key_t hi = 0;
  key_span(keys, count, &lo, &hi);
  int64_t above = 0;
  int64_t within = count;
  key_t* to = spare;
  for (int round = 0; round < max_rounds && count > kRankInRegisters && lo != hi; ++round) {
    // The estimate's rank error is about sqrt(within) / 2 at most for evenly spread keys.
    const double per_rank = (double(hi) - double(lo)) / double(within);
    const double estimate = double(hi) - per_rank * (double(want - above) - 0.5);
    const double margin = per_rank * (1.5 * std::sqrt(double(within)) + 2.0);
    const auto window_lo = static_cast<key_t>(std::clamp(estimate - margin, double(lo), double(hi)));
    const auto window_hi = static_cast<key_t>(std::clamp(estimate + margin, double(lo), double(hi)));
    const K low = vec16::splat<K>(window_lo);
    const K span = vec16::splat<K>(static_cast<key_t>(window_hi - window_lo));
    const K high = vec16::splat<K>(window_hi);
    vec16::i32x16 above_lanes = {};  // minus the counts
    int64_t inside = 0;
    key_t inside_lo = static_cast<key_t>(~key_t(0));
    key_t inside_hi = 0;
    for_steps(0, count, [&](int64_t i, auto len) {
      const K key = vec16::load(keys + i, length(len));
      const M valid = valid_lanes<M>(len);
      above_lanes += vec16::as_i32(M(key > high) & valid);
      const M in = M((key - low) <= span) & valid;
      const int64_t added = vec16::compress_store<key_t>(key, in, to + inside);
      for (int64_t j = inside; j < inside + added; ++j) {
        inside_lo = std::min(inside_lo, to[j]);
        inside_hi = std::max(inside_hi, to[j]);
      }
      inside += added;
    });
    const int64_t window_above = -vec16::lanes_total(above_lanes);
    if (window_above >= want) {  // above the window: some keys lie in (window_hi, hi]
      within = window_above - above;
      lo = static_cast<key_t>(window_hi + 1);
    } else if (window_above + inside < want) {  // below it: some keys lie in [lo, window_lo)
      within = above + within - (window_above + inside);
      above = window_above + inside;
      hi = static_cast<key_t>(window_lo - 1);
    } else {  // inside: only the window's keys are left
      std::swap(keys, to);
      count = inside;
      want -= window_above;
      above = 0;
      within = inside;
      lo = inside_lo;
      hi = inside_hi;
    }
  }
  if (lo == hi) {  // every key in [lo, hi] is the answer
    return RankRounds<key_t>{true, lo, within, want - above, keys, count, want};
  }
  if (count <= kRankInRegisters) {
    return rank_in_registers(keys, count, want);
  }
  return RankRounds<key_t>{false, 0, 0, 0, keys, count, want};
}

// Pass C: selects the `want`-th largest (1 <= want <= count) of the gathered keys -- which
// hold every key equal to it -- and sets sel.threshold, sel.ties and sel.need. `keys` has room
// for count + kLanes keys; `spare` is grown to as many. Either may be overwritten. 64-bit keys
// (float64) take the digits only.
template <typename Radix, typename scalar_t>
void select_among_candidates(key_type<scalar_t>* keys, std::vector<key_type<scalar_t>>& spare, int64_t count,
                             int64_t want, Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel) {
  using key_t = key_type<scalar_t>;
  if constexpr (sizeof(key_t) <= 4) {
    // A window gathers a few hundred keys at most, so spare seldom reaches the sample's size.
    if (spare.size() < static_cast<size_t>(count + kLanes)) {
      spare.resize(static_cast<size_t>(count + kLanes));
    }
    const RankRounds<key_t> left = rank_rounds(keys, spare.data(), count, want, kRankRounds);
    if (left.found) {
      sel.threshold = left.threshold;
      sel.ties = left.ties;
      sel.need = left.need;
      return;
    }
    TORCH_INTERNAL_ASSERT(left.count > kRankInRegisters, "ash_ext: no candidate ranks ", left.want);
    // The keys left are in keys or spare; digits reorder them in place.
    return select_by_digits<Radix>(left.keys, left.count, left.want, sel);
  }
  select_by_digits<Radix>(keys, count, want, sel);
}

// Runs body(c) for c in [0, chunks): on the calling thread when chunks == 1, else in parallel.
template <typename F>
void run_chunks(int64_t chunks, const F& body) {
  if (chunks == 1) {
    body(0);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      body(c);
    }
  });
}

// How a sample's sum blocks are split into `chunks` contiguous runs.
struct ChunkPlan {
  int64_t n = 0;
  int64_t blocks = 0;
  int64_t chunks = 1;
  int64_t blocks_per_chunk = 0;
  ChunkPlan(int64_t n_, int64_t wanted_chunks) : n(n_), blocks((n_ + kSumBlock - 1) / kSumBlock) {
    // uint32 histogram counts need chunks of fewer than 2^32 values.
    const int64_t max_blocks = (int64_t(1) << 31) / kSumBlock;
    blocks_per_chunk = std::min(max_blocks, (blocks + wanted_chunks - 1) / std::max<int64_t>(1, wanted_chunks));
    blocks_per_chunk = std::max<int64_t>(1, blocks_per_chunk);
    chunks = (blocks + blocks_per_chunk - 1) / blocks_per_chunk;
  }
  int64_t first_block(int64_t c) const { return c * blocks_per_chunk; }
  int64_t last_block(int64_t c) const { return std::min(blocks, (c + 1) * blocks_per_chunk); }
  int64_t begin(int64_t c) const { return first_block(c) * kSumBlock; }
  int64_t end(int64_t c) const { return std::min(n, last_block(c) * kSumBlock); }
};

// The sum of a sample's block sums in one fixed order, whatever the threads: a running total
// of up to kRunningBlocks blocks (32768 values), and pairwise above that (halves, recursively).
// A running float32 total of 2^19 blocks (one sample of 2^31 values) was off by ~1e-3 relative,
// more than float16's rounding of the result (tools/large_sizes.py); pairwise, the error grows
// with log2(blocks), not blocks.
constexpr size_t kRunningBlocks = 8;

template <typename acc_t>
acc_t pairwise_total(const acc_t* sums, size_t count) {
  if (count <= kRunningBlocks) {
    acc_t total = 0;
    for (size_t i = 0; i < count; ++i) {
      total += sums[i];
    }
    return total;
  }
  const size_t half = count / 2;
  return pairwise_total(sums, half) + pairwise_total(sums + half, count - half);
}

template <typename acc_t>
acc_t ordered_total(const std::vector<acc_t>& block_sums) {
  return pairwise_total(block_sums.data(), block_sums.size());
}

// The sample offset of the need-th value (1-based) whose key is `threshold`, or -1.
template <typename scalar_t>
int64_t nth_tie_offset(const scalar_t* in, int64_t n, key_type<scalar_t> threshold, int64_t need) {
  using K = Keys<scalar_t>;
  using M = Mask<scalar_t>;
  const K wanted = vec16::splat<K>(threshold);
  int64_t seen = 0;
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t len = std::min<int64_t>(kLanes, n - i);
    const K key = vec16::keys_of<scalar_t>(vec16::load_bits(in + i, len));
    uint32_t ties = vec16::bits_of(M(key == wanted) & valid_lanes<M>(len));
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

// Selects a sample's k-th largest key (k >= 1).
template <typename Radix, typename scalar_t>
struct SampleSelector {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;

  const SampleLayout& layout;

  // Window widths in key units, relative to the type's mantissa: a key step of
  // 2^(mantissa bits) is one octave of magnitude.
  static constexpr int kMantissaBits = std::numeric_limits<scalar_t>::digits - 1;
  static constexpr key_t kInitialHalfWidth = key_t(1) << (kMantissaBits - 3);  // 1/8 octave
  static constexpr key_t kMinHalfWidth = key_t(1) << (kMantissaBits - 6);
  static constexpr key_t kMaxHalfWidth = key_t(1) << (kMantissaBits + 1);

  // Selects the k-th largest key of the sample at `in` (1 <= k <= n; each sample may have its
  // own k). `parallel_chunks` > 1 spreads the passes over threads; it must be 1 inside a parallel
  // region. The result does not depend on which path found it.
  Selection<key_t, acc_t> select(const scalar_t* in, int64_t k, Scratch<Radix, scalar_t>& scratch,
                                 int64_t parallel_chunks) const {
    const ChunkPlan plan(layout.n, parallel_chunks);
    Selection<key_t, acc_t> sel;
    std::vector<acc_t>& block_sums = scratch.block_sums;
    block_sums.assign(static_cast<size_t>(plan.blocks), acc_t(0));
    int64_t above = 0;
    const int64_t count = scratch.guess.valid ? select_in_window(in, k, scratch, plan, block_sums, &above) : -1;
    if (count >= 0) {
      // C, from the window's keys (which share no top bits).
      select_among_candidates<Radix, scalar_t>(scratch.candidates.data(), scratch.spare, count, k - above, sel);
    } else {
      // A, B, C.
      const auto [digit_count, digit_above] = select_by_histogram(in, k, scratch, plan, block_sums);
      select_among_candidates<Radix, scalar_t>(scratch.candidates.data(), scratch.spare, digit_count,
                                               k - digit_above, sel);
      scratch.guess.half_width = scratch.guess.valid
                                      ? std::min<key_t>(kMaxHalfWidth, static_cast<key_t>(scratch.guess.half_width * 4))
                                      : kInitialHalfWidth;
    }
    sel.sum = ordered_total(block_sums);
    scratch.guess.valid = true;
    scratch.guess.threshold = sel.threshold;

    // D: where only some ties are kept, the logical index of the last kept one.
    if (sel.partial_ties()) {
      sel.tie_cut = find_tie_cut(in, sel, scratch);
    }
    return sel;
  }

  // Pass W. Returns the number of keys gathered in the window, with *above the number above
  // it, or -1 when the k-th largest key is not in the window (the sums are then still set).
  int64_t select_in_window(const scalar_t* in, int64_t k, Scratch<Radix, scalar_t>& scratch, const ChunkPlan& plan,
                           std::vector<acc_t>& block_sums, int64_t* above) const {
    constexpr key_t kMaxKey = std::numeric_limits<key_t>::max();
    const key_t guess = scratch.guess.threshold;
    const key_t half = scratch.guess.half_width;
    const key_t lo = guess > half ? static_cast<key_t>(guess - half) : key_t(0);
    const key_t hi = guess < kMaxKey - half ? static_cast<key_t>(guess + half) : kMaxKey;
    std::vector<int64_t>& gathered = scratch.gathered;
    std::vector<int64_t>& chunk_above = scratch.chunk_above;
    gathered.assign(static_cast<size_t>(plan.chunks), 0);
    chunk_above.assign(static_cast<size_t>(plan.chunks), 0);
    key_t* candidates = scratch.candidates.data();
    run_chunks(plan.chunks, [&](int64_t c) {
      gathered[c] = pass_window(in, plan.n, plan.first_block(c), plan.last_block(c), lo, hi, block_sums.data(),
                                candidates + plan.begin(c), &chunk_above[c]);
    });
    int64_t count = 0;
    *above = 0;
    for (int64_t c = 0; c < plan.chunks; ++c) {
      std::memmove(candidates + count, candidates + plan.begin(c), gathered[c] * sizeof(key_t));
      count += gathered[c];
      *above += chunk_above[c];
    }
    if (*above >= k || *above + count < k) {
      return -1;
    }
    // A wide window costs gathering; narrow it while it holds many keys.
    if (count > plan.n / 8) {
      scratch.guess.half_width = std::max<key_t>(kMinHalfWidth, static_cast<key_t>(half / 2));
    }
    return count;
  }

  // Passes A and B: the top digit by histogram, then the keys of that digit gathered into the
  // scratch. Returns {keys gathered, keys in the digits above}.
  std::pair<int64_t, int64_t> select_by_histogram(const scalar_t* in, int64_t k, Scratch<Radix, scalar_t>& scratch,
                                                  const ChunkPlan& plan, std::vector<acc_t>& block_sums) const {
    constexpr int64_t kFirstBuckets = Radix::kFirstBuckets;
    std::vector<int64_t>& counts = scratch.counts;
    counts.assign(static_cast<size_t>(kFirstBuckets * plan.chunks), 0);
    run_chunks(plan.chunks, [&](int64_t c) {
      std::vector<uint32_t> own_hist;
      uint32_t* hist = scratch.hist.data();
      if (plan.chunks > 1) {
        own_hist.resize(scratch.hist.size());
        hist = own_hist.data();
      }
      pass_a<Radix>(in, plan.n, plan.first_block(c), plan.last_block(c), hist, counts.data() + c * kFirstBuckets,
                    block_sums.data());
    });
    for (int64_t c = 1; c < plan.chunks; ++c) {
      for (int64_t b = 0; b < kFirstBuckets; ++b) {
        counts[b] += counts[c * kFirstBuckets + b];
      }
    }
    int64_t above = 0;
    const auto digit = static_cast<key_t>(find_bucket(counts.data(), kFirstBuckets, k, &above));
    std::vector<int64_t>& gathered = scratch.gathered;
    gathered.assign(static_cast<size_t>(plan.chunks), 0);
    key_t* candidates = scratch.candidates.data();
    run_chunks(plan.chunks, [&](int64_t c) {
      gathered[c] = pass_b<Radix>(in, plan.begin(c), plan.end(c), digit, candidates + plan.begin(c));
    });
    int64_t count = 0;
    for (int64_t c = 0; c < plan.chunks; ++c) {
      std::memmove(candidates + count, candidates + plan.begin(c), gathered[c] * sizeof(key_t));
      count += gathered[c];
    }
    return {count, above};
  }

  int64_t find_tie_cut(const scalar_t* in, const Selection<key_t, acc_t>& sel, Scratch<Radix, scalar_t>& scratch) const {
    const int64_t n = layout.n;
    if (!layout.permuted) {
      // Memory order is logical order: the need-th tie met is the last one kept.
      const int64_t offset = nth_tie_offset(in, n, sel.threshold, sel.need);
      TORCH_INTERNAL_ASSERT(offset >= 0, "ash_ext: fewer ties than counted");
      return offset;
    }
    auto& indices = scratch.tie_indices;
    indices.clear();
    indices.reserve(static_cast<size_t>(sel.ties));
    for (int64_t i = 0; i < n; ++i) {
      if (order_key(in[i]) == sel.threshold) {
        indices.push_back(logical_index(layout, i));
      }
    }
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(indices.size()) == sel.ties);
    std::nth_element(indices.begin(), indices.begin() + (sel.need - 1), indices.end());
    return indices[sel.need - 1];
  }
};

// Whether the element at memory offset i, with key `key`, is kept.
template <typename key_t, typename acc_t>
inline bool is_kept(const Selection<key_t, acc_t>& sel, const SampleLayout& layout, key_t key, int64_t i) {
  if (key != sel.threshold) {
    return key > sel.threshold;
  }
  return !sel.partial_ties() || logical_index(layout, i) <= sel.tie_cut;
}

int64_t max_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Runs per_sample(b, parallel_chunks) for every sample: samples in parallel when there are
// enough of them, else one at a time with each sample's passes split over the threads.
template <typename F>
void for_each_sample(const SampleLayout& layout, const F& per_sample) {
  const int64_t threads = max_threads();
  const int64_t split = std::min<int64_t>(threads, std::max<int64_t>(1, layout.n / kMinChunk));
  if (layout.batch >= threads || split <= 1) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, layout.n));
    at::parallel_for(0, layout.batch, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        per_sample(b, int64_t(1));
      }
    });
  } else {
    for (int64_t b = 0; b < layout.batch; ++b) {
      per_sample(b, split);
    }
  }
}

// Which of the 16 values at sample offsets [i, i + 16) are kept: keys above the threshold, and
// ties -- all of them, or when only some are kept those at offsets <= tie_cut. For layouts
// whose memory order is the logical order (permuted layouts with partial ties go element by
// element, with is_kept).
template <typename scalar_t>
struct KeptLanes {
  Keys<scalar_t> threshold;
  bool partial;
  int64_t tie_cut;

  explicit KeptLanes(const Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel)
      : threshold(vec16::splat<Keys<scalar_t>>(sel.threshold)), partial(sel.partial_ties()), tie_cut(sel.tie_cut) {}

  ASH_EXT_VEC_INLINE Mask<scalar_t> operator()(Keys<scalar_t> key, int64_t i) const {
    using M = Mask<scalar_t>;
    const M above = M(key > threshold);
    const M ties = M(key == threshold);
    if (!partial) {
      return above | ties;
    }
    // Ties at lanes <= tie_cut - i, as a lane count in [0, 16].
    const int64_t kept_ties = std::clamp<int64_t>(tie_cut - i + 1, 0, kLanes);
    return above | (ties & valid_lanes<M>(kept_ties));
  }
};

// Whether a sample goes element by element: only some ties kept, in a permuted layout.
template <typename key_t, typename acc_t>
bool by_element(const Selection<key_t, acc_t>& sel, const SampleLayout& layout) {
  return layout.permuted && sel.partial_ties();
}

// The sums of a chunk's sum blocks over the kept values only (ASH-S's s2).
template <typename scalar_t>
void kept_block_sums(const scalar_t* in, const ChunkPlan& plan, int64_t c,
                     const Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel, const SampleLayout& layout,
                     acc_type<scalar_t>* block_sums, scalar_t* masked) {
  using K = Keys<scalar_t>;
  if (by_element(sel, layout)) {
    // Each block masked into a buffer, then summed in the defined order.
    for_sum_blocks(plan.n, plan.first_block(c), plan.last_block(c), [&](int64_t block, int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        masked[i - begin] = keep_or_zero(in[i], is_kept(sel, layout, order_key(in[i]), i));
      }
      sum_blocks(masked - begin, end, block, block + 1, block_sums);
    });
    return;
  }
  const KeptLanes<scalar_t> kept(sel);
  for_sum_blocks(plan.n, plan.first_block(c), plan.last_block(c), [&](int64_t block, int64_t begin, int64_t end) {
    Acc<scalar_t> sum = {};
    for_steps(begin, end, [&](int64_t i, auto len) {
      const K bits = vec16::load_bits(in + i, length(len));
      // Dropped lanes add +0.0 (the bits masked to 0), which leaves a lane's sum as it is.
      sum += vec16::to_acc<scalar_t>(vec16::select(kept(vec16::keys_of<scalar_t>(bits), i), bits, K{}));
    });
    block_sums[block] = vec16::lanes_total(sum);
  });
}

// Pass E over [begin, end) of a sample: out = the variant's value where kept, else +0.0.
// `constant` is ASH-B's fill or ASH-S's factor; ASH-S's kept values are value * factor in the
// accumulation type, rounded once (so dropped ones stay +0.0 even for an infinite factor).
template <typename scalar_t>
void write_forward(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, Variant variant,
                   acc_type<scalar_t> constant, const Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel,
                   const SampleLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  using K = Keys<scalar_t>;
  TORCH_INTERNAL_ASSERT(variant != Variant::ScaleUnpruned, "ash_ext: SCALE's output pass is write_scaled");
  const scalar_t fill = static_cast<scalar_t>(constant);
  if (by_element(sel, layout)) {
    for (int64_t i = begin; i < end; ++i) {
      const bool kept = is_kept(sel, layout, order_key(in[i]), i);
      const scalar_t value = variant == Variant::Prune      ? in[i]
                             : variant == Variant::Binarize ? fill
                                                            : static_cast<scalar_t>(static_cast<acc_t>(in[i]) * constant);
      out[i] = keep_or_zero(value, kept);
    }
    return;
  }
  const KeptLanes<scalar_t> kept(sel);
  auto emit = [&](auto value_of) {
    for_steps(begin, end, [&](int64_t i, auto len) {
      const K bits = vec16::load_bits(in + i, length(len));
      const K result = vec16::select(kept(vec16::keys_of<scalar_t>(bits), i), value_of(bits), K{});
      vec16::store_bits(out + i, result, length(len));
    });
  };
  switch (variant) {
    case Variant::Prune:
      emit([](K bits) ASH_EXT_VEC_LAMBDA { return bits; });
      break;
    case Variant::Binarize: {
      const K fill_bits = vec16::splat<K>(KeyTraits<scalar_t>::bits(fill));
      emit([&](K) ASH_EXT_VEC_LAMBDA { return fill_bits; });
      break;
    }
    case Variant::Scale: {
      const Acc<scalar_t> factor = vec16::splat<Acc<scalar_t>>(constant);
      emit([&](K bits) ASH_EXT_VEC_LAMBDA { return vec16::from_acc<scalar_t>(vec16::to_acc<scalar_t>(bits) * factor); });
      break;
    }
    case Variant::ScaleUnpruned:
      break;
  }
}

// The clamp bounds of a call in the input's dtype, rounded as torch.clamp rounds them.
template <typename scalar_t>
struct ClampBounds {
  scalar_t low;
  scalar_t high;
  bool active;  // whether clamping changes any value: bounds of -inf and +inf leave all as they are
  explicit ClampBounds(const ShapeArgs& args)
      : low(clamp_bound<scalar_t>(args.clamp_min)),
        high(clamp_bound<scalar_t>(args.clamp_max)),
        active(args.clamped && !(std::isinf(static_cast<double>(low)) && low < scalar_t(0) &&
                                 std::isinf(static_cast<double>(high)) && high > scalar_t(0))) {}
};

// Clamps a sample from src into dst (which may be src), chunk by chunk. Clamping once up front
// lets every later pass run unchanged on the clamped values, which they then read from cache.
// clamp_value's rule by vector compares in the accumulation type (exact for every dtype): NaN
// fails both compares and stays, as does a zero equal to a zero bound.
template <typename scalar_t>
void clamp_sample(const scalar_t* src, scalar_t* dst, const ChunkPlan& plan, const ClampBounds<scalar_t>& bounds) {
  using K = Keys<scalar_t>;
  using M = Mask<scalar_t>;
  using A = Acc<scalar_t>;
  const A low = vec16::splat<A>(static_cast<acc_type<scalar_t>>(bounds.low));
  const A high = vec16::splat<A>(static_cast<acc_type<scalar_t>>(bounds.high));
  const K low_bits = vec16::splat<K>(KeyTraits<scalar_t>::bits(bounds.low));
  const K high_bits = vec16::splat<K>(KeyTraits<scalar_t>::bits(bounds.high));
  run_chunks(plan.chunks, [&](int64_t c) {
    for_steps(plan.begin(c), plan.end(c), [&](int64_t i, auto len) {
      const K bits = vec16::load_bits(src + i, length(len));
      const A value = vec16::to_acc<scalar_t>(bits);
      const M below = vec16::convert<M>(value < low);
      const M over = vec16::convert<M>(high < value);
      vec16::store_bits(dst + i, vec16::select(below, low_bits, vec16::select(over, high_bits, bits)), length(len));
    });
  });
}

// s1 of a sample that keeps nothing (so has no selection to take it from): block by block with
// block_sum, which is what passes A and W compute per block on either path, then the blocks in
// ordered_total -- the same bits the selection would have produced.
template <typename scalar_t>
acc_type<scalar_t> sample_total(const scalar_t* in, const ChunkPlan& plan,
                                std::vector<acc_type<scalar_t>>& block_sums) {
  using acc_t = acc_type<scalar_t>;
  block_sums.assign(static_cast<size_t>(plan.blocks), acc_t(0));
  run_chunks(plan.chunks, [&](int64_t c) {
    sum_blocks(in, plan.n, plan.first_block(c), plan.last_block(c), block_sums.data());
  });
  return ordered_total(block_sums);
}

// s2, the sum of the kept values, in ASH-S's order: the kept values' block sums, then the blocks
// in order. ASH-S, SCALE and topk_stats all take it from here, so their s2 agree bit for bit.
template <typename Radix, typename scalar_t>
acc_type<scalar_t> kept_total(const scalar_t* in, const ChunkPlan& plan,
                              const Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel, const SampleLayout& layout,
                              Scratch<Radix, scalar_t>& scratch) {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t>& kept_sums = scratch.kept_sums;
  kept_sums.assign(static_cast<size_t>(plan.blocks), acc_t(0));
  // One block-sized buffer per chunk (chunks run on different threads).
  const int64_t block_len = std::min(kSumBlock, plan.n);
  scratch.masked.resize(static_cast<size_t>(block_len * plan.chunks));
  run_chunks(plan.chunks, [&](int64_t c) {
    kept_block_sums(in, plan, c, sel, layout, kept_sums.data(), scratch.masked.data() + c * block_len);
  });
  return ordered_total(kept_sums);
}

// SCALE's output over [begin, end): every value times the factor in the accumulation type,
// rounded once (a NaN or infinite factor follows IEEE).
template <typename scalar_t>
void write_scaled(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, acc_type<scalar_t> factor) {
  const Acc<scalar_t> f = vec16::splat<Acc<scalar_t>>(factor);
  for_steps(begin, end, [&](int64_t i, auto len) {
    const Keys<scalar_t> bits = vec16::load_bits(in + i, length(len));
    vec16::store_bits(out + i, vec16::from_acc<scalar_t>(vec16::to_acc<scalar_t>(bits) * f), length(len));
  });
}

template <typename Radix, typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& out, const ShapeArgs& args, Variant variant,
                  const SampleLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* in_base = x.const_data_ptr<scalar_t>();
  scalar_t* out_base = out.mutable_data_ptr<scalar_t>();
  const int64_t n = layout.n;
  if (args.k_per_sample == nullptr && args.k == 0 && variant != Variant::ScaleUnpruned) {
    // No sample keeps anything: ASH-P, -B and -S output +0.0 whatever the values (clamped or not).
    at::parallel_for(0, layout.batch * n, 32768, [&](int64_t begin, int64_t end) {
      std::fill(out_base + begin, out_base + end, scalar_t(0));
    });
    return;
  }
  const SampleSelector<Radix, scalar_t> selector{layout};
  const ClampBounds<scalar_t> bounds(args);
  for_each_sample(layout, [&](int64_t b, int64_t parallel_chunks) {
    const int64_t k = args.k_of(b);
    const scalar_t* in = in_base + b * n;
    scalar_t* dst = out_base + b * n;
    const ChunkPlan plan(n, parallel_chunks);
    if (bounds.active) {
      // The sample's own output slice is the buffer (in place it is the input itself): each
      // pass below reads only this sample, and the output pass writes each element after
      // reading it.
      clamp_sample(in, dst, plan, bounds);
      in = dst;
    }
    ScratchLease<Radix, scalar_t> lease(n);
    auto& scratch = lease.get();
    if (k == 0) {
      if (variant == Variant::ScaleUnpruned) {
        const acc_t factor = scale_factor(sample_total(in, plan, scratch.block_sums), acc_t(0));
        run_chunks(plan.chunks, [&](int64_t c) { write_scaled(in, dst, plan.begin(c), plan.end(c), factor); });
      } else {
        run_chunks(plan.chunks, [&](int64_t c) { std::fill(dst + plan.begin(c), dst + plan.end(c), scalar_t(0)); });
      }
      return;
    }
    const auto sel = selector.select(in, k, scratch, parallel_chunks);
    acc_t constant = 0;
    if (variant == Variant::Scale || variant == Variant::ScaleUnpruned) {
      constant = scale_factor(sel.sum, kept_total(in, plan, sel, layout, scratch));
    } else if (variant == Variant::Binarize) {
      constant = sel.sum / static_cast<acc_t>(k);
    }
    if (variant == Variant::ScaleUnpruned) {
      run_chunks(plan.chunks, [&](int64_t c) { write_scaled(in, dst, plan.begin(c), plan.end(c), constant); });
    } else {
      run_chunks(plan.chunks, [&](int64_t c) {
        write_forward(in, dst, plan.begin(c), plan.end(c), variant, constant, sel, layout);
      });
    }
  });
}

// SCALE's gradient for one sample (y = x E, E = exp(s1 / s2), m the kept mask, G = sum_i g_i x_i
// over all i): dL/dx_j = E g_j + E (G / s2) (1 - m_j s1 / s2), or factor * g where s2 == 0 and
// the factor is a constant. s1 and s2 are the forward's, bit for bit (same sums, same order).
template <typename Radix, typename scalar_t>
void scale_unpruned_backward(const scalar_t* xs, const scalar_t* gs, scalar_t* gxs, int64_t k,
                             const SampleSelector<Radix, scalar_t>& selector, const SampleLayout& layout,
                             Scratch<Radix, scalar_t>& scratch) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = layout.n;
  const ChunkPlan plan(n, 1);
  Selection<key_type<scalar_t>, acc_t> sel;
  acc_t s1 = 0;
  acc_t s2 = 0;
  if (k > 0) {
    sel = selector.select(xs, k, scratch, 1);
    s1 = sel.sum;
    s2 = kept_total(xs, plan, sel, layout, scratch);
  } else {
    s1 = sample_total(xs, plan, scratch.block_sums);
  }
  const acc_t factor = scale_factor(s1, s2);
  if (s2 == acc_t(0)) {
    for (int64_t i = 0; i < n; ++i) {
      gxs[i] = static_cast<scalar_t>(factor * static_cast<acc_t>(gs[i]));
    }
    return;
  }
  acc_t grad_dot_x = 0;  // G
  for (int64_t i = 0; i < n; ++i) {
    grad_dot_x += static_cast<acc_t>(gs[i]) * static_cast<acc_t>(xs[i]);
  }
  // Divided step by step as ASH-S's backward: s2 * s2 and G * s1 overflow long before the result.
  const acc_t grad_per_kept = grad_dot_x / s2;         // G / s2
  const acc_t shared = factor * grad_per_kept;         // E G / s2, for every element
  const acc_t kept_shift = grad_per_kept * (s1 / s2);  // G s1 / s2^2, for the kept ones
  for (int64_t i = 0; i < n; ++i) {
    const acc_t shift = is_kept(sel, layout, order_key(xs[i]), i) ? kept_shift : acc_t(0);
    gxs[i] = static_cast<scalar_t>(shared + factor * (static_cast<acc_t>(gs[i]) - shift));
  }
}

template <typename Radix, typename scalar_t>
void backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, const ShapeArgs& args,
                   Variant variant, const SampleLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x_base = x.const_data_ptr<scalar_t>();
  const scalar_t* g_base = grad.const_data_ptr<scalar_t>();
  scalar_t* gx_base = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t n = layout.n;
  if (args.k_per_sample == nullptr && args.k == 0 && variant != Variant::ScaleUnpruned) {
    grad_x.zero_();
    return;
  }
  const SampleSelector<Radix, scalar_t> selector{layout};
  // The backward is not on the inference path: one sample per task, a plain loop per sample.
  at::parallel_for(0, layout.batch, 1, [&](int64_t begin, int64_t end) {
    ScratchLease<Radix, scalar_t> lease(n);
    auto& scratch = lease.get();
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* xs = x_base + b * n;
      const scalar_t* gs = g_base + b * n;
      scalar_t* gxs = gx_base + b * n;
      const int64_t k = args.k_of(b);
      if (variant == Variant::ScaleUnpruned) {
        scale_unpruned_backward(xs, gs, gxs, k, selector, layout, scratch);
        continue;
      }
      if (k == 0) {
        // ASH-P, -B and -S output the constant +0.0.
        std::fill(gxs, gxs + n, scalar_t(0));
        continue;
      }
      const auto sel = selector.select(xs, k, scratch, 1);
      // Sums over the kept elements: of x (s2), of g (ASH-B) and of g * x (ASH-S).
      acc_t kept_x = 0;
      acc_t kept_grad = 0;
      acc_t kept_grad_x = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (is_kept(sel, layout, order_key(xs[i]), i)) {
          kept_x += static_cast<acc_t>(xs[i]);
          kept_grad += static_cast<acc_t>(gs[i]);
          kept_grad_x += static_cast<acc_t>(gs[i]) * static_cast<acc_t>(xs[i]);
        }
      }
      const acc_t s1 = sel.sum;
      const acc_t s2 = kept_x;
      if (variant == Variant::Binarize) {
        std::fill(gxs, gxs + n, static_cast<scalar_t>(kept_grad / static_cast<acc_t>(k)));
      } else if (variant == Variant::Prune || s2 == acc_t(0)) {
        // ASH-S with a kept sum of 0 has a constant factor (see scale_factor): 1, as ASH-P, or 0.
        const acc_t factor = variant == Variant::Prune ? acc_t(1) : scale_factor(s1, s2);
        if (factor == acc_t(1)) {
          for (int64_t i = 0; i < n; ++i) {
            gxs[i] = keep_or_zero(gs[i], is_kept(sel, layout, order_key(xs[i]), i));
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            gxs[i] = keep_or_zero(static_cast<scalar_t>(factor * static_cast<acc_t>(gs[i])),
                                  is_kept(sel, layout, order_key(xs[i]), i));
          }
        }
      } else {
        // y_i = m_i x_i E, E = exp(s1 / s2): dL/dx_j = E (m_j (g_j - G s1 / s2^2) + G / s2),
        // with G = sum_i m_i g_i x_i.
        // Divided step by step: s2 * s2 and G * s1 overflow long before the result does.
        const acc_t factor = scale_factor(s1, s2);
        const acc_t grad_per_kept = kept_grad_x / s2;  // G / s2
        const acc_t shared = factor * grad_per_kept;
        const acc_t kept_shift = grad_per_kept * (s1 / s2);
        for (int64_t i = 0; i < n; ++i) {
          acc_t value = shared;
          if (is_kept(sel, layout, order_key(xs[i]), i)) {
            value += factor * (static_cast<acc_t>(gs[i]) - kept_shift);
          }
          gxs[i] = static_cast<scalar_t>(value);
        }
      }
    }
  });
}

// topk_stats: the selection, and ASH-S's kept sum read from cache -- no output pass.
template <typename Radix, typename scalar_t>
void stats_impl(const at::Tensor& x, const ShapeArgs& args, const SampleLayout& layout, const at::Tensor& threshold,
                const at::Tensor& total, const at::Tensor& kept) {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  const scalar_t* in_base = x.const_data_ptr<scalar_t>();
  scalar_t* threshold_out = threshold.mutable_data_ptr<scalar_t>();
  acc_t* total_out = total.mutable_data_ptr<acc_t>();
  acc_t* kept_out = kept.mutable_data_ptr<acc_t>();
  const int64_t n = layout.n;
  const SampleSelector<Radix, scalar_t> selector{layout};
  const ClampBounds<scalar_t> bounds(args);
  for_each_sample(layout, [&](int64_t b, int64_t parallel_chunks) {
    const int64_t k = args.k_of(b);
    const scalar_t* in = in_base + b * n;
    const ChunkPlan plan(n, parallel_chunks);
    ScratchLease<Radix, scalar_t> lease(n);
    auto& scratch = lease.get();
    if (bounds.active) {
      // x is read-only here: the thread's scratch holds the clamped sample for the later passes.
      scratch.clamped.resize(static_cast<size_t>(n));
      clamp_sample(in, scratch.clamped.data(), plan, bounds);
      in = scratch.clamped.data();
    }
    if (k == 0) {
      threshold_out[b] = value_of_key<scalar_t>(std::numeric_limits<key_t>::max());  // NaN
      total_out[b] = sample_total(in, plan, scratch.block_sums);
      kept_out[b] = acc_t(0);
      return;
    }
    const auto sel = selector.select(in, k, scratch, parallel_chunks);
    threshold_out[b] = value_of_key<scalar_t>(sel.threshold);
    total_out[b] = sel.sum;
    kept_out[b] = kept_total(in, plan, sel, layout, scratch);
  });
}

template <typename Radix>
struct UseRadix {
  using type = Radix;
};

// Runs body(UseRadix<R>{}) with the digit widths for samples of n values.
template <typename Body>
void with_radix(int64_t n, const Body& body) {
  if (n <= kShortSample) {
    body(UseRadix<ShortSampleRadix>{});
  } else {
    body(UseRadix<LongSampleRadix>{});
  }
}

void forward(const at::Tensor& x, const at::Tensor& out, const ShapeArgs& args, Variant variant,
             const SampleLayout& layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_forward_cpu", [&] {
    with_radix(layout.n, [&](auto radix) {
      forward_impl<typename decltype(radix)::type, scalar_t>(x, out, args, variant, layout);
    });
  });
}

void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, const ShapeArgs& args,
              Variant variant, const SampleLayout& layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_backward_cpu", [&] {
    with_radix(layout.n, [&](auto radix) {
      backward_impl<typename decltype(radix)::type, scalar_t>(grad, x, grad_x, args, variant, layout);
    });
  });
}

void stats(const at::Tensor& x, const ShapeArgs& args, const SampleLayout& layout, const at::Tensor& threshold,
           const at::Tensor& total, const at::Tensor& kept) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_stats_cpu", [&] {
    with_radix(layout.n, [&](auto radix) {
      stats_impl<typename decltype(radix)::type, scalar_t>(x, args, layout, threshold, total, kept);
    });
  });
}

}  // namespace

const CpuKernels* kernels() {
  static const CpuKernels table{&forward, &backward, &stats};
  return &table;
}

}  // namespace ASH_EXT_ISA_NS
}  // namespace ash_ext
