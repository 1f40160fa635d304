// CPU backend of the ASH op: an O(n) radix select of each sample's k-th largest key, then one
// fused output pass.
//
// Per sample:
//   W. when the thread has a guess -- a key window around the previous sample's threshold,
//      as samples of one batch tend to have similar thresholds -- one pass over the values
//      (from memory) sums them (s1), counts the keys above the window and gathers the keys
//      inside it: all vectorisable but the gathering of the few in the window. If the k-th
//      largest key lies in the window, go to C with the gathered keys.
//   A. otherwise one pass: s1 and a histogram of the keys' top digit;
//   B. one pass (the sample is now in cache) gathering the keys of the threshold's digit;
//   C. the remaining digits are radix-selected among the gathered keys only, which leaves the
//      exact threshold key T, the number of ties at T and how many of them to keep;
//   D. when only some ties are kept: the largest logical index among the kept ties;
//   E. the output pass (ASH-S and SCALE first sum the kept values, s2, reading the sample from
//      cache; SCALE's output pass scales every value, nothing pruned). topk_stats stops before
//      it: the threshold, s1 and s2 are its results.
//
// Each sample has its own k where the call gives k_per_sample (a sample with k == 0 skips the
// selection). With clamp bounds, a sample is first clamped into a buffer -- its own output
// slice, or for topk_stats the thread's scratch -- and every pass above reads that buffer, so
// the passes (portable and AVX-512) are the same code with or without clamping.
//
// Every sum is taken in a fixed order -- lanes within blocks of kSumBlock values, blocks in
// order -- so a sample's result depends on nothing but the sample: not on the batch it is in,
// the thread count, or which path the selection took.
//
// Samples are spread over threads; a batch smaller than the thread count splits each sample's
// passes over the threads instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "../ash.h"
#include "avx512_float.h"
#include "cpu_common.h"

namespace ash_ext {
namespace {

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
  KeptRule rule() const { return KeptRule{threshold, partial_ties(), tie_cut}; }
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

template <typename Radix, typename scalar_t>
ThresholdGuess<key_type<scalar_t>>& this_threads_guess() {
  thread_local ThresholdGuess<key_type<scalar_t>> guess;
  return guess;
}

// A thread's working memory, reused across the samples it handles (no allocation per sample:
// short samples would pay more for it than for their selection). Made and used by one thread.
template <typename Radix, typename scalar_t>
struct Scratch {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  std::vector<uint32_t> hist;        // kHistCopies * kFirstBuckets
  std::vector<key_t> candidates;     // gathered keys, with kLanes slots of room for whole-register stores
  std::vector<key_t> spare;          // pass C's second buffer of keys, grown to the candidates' count (AVX-512 only)
  std::vector<int64_t> tie_indices;  // logical indices of ties, permuted layouts only
  std::vector<int64_t> counts;       // top-digit counts, one histogram per chunk
  std::vector<acc_t> block_sums;     // s1 per sum block
  std::vector<acc_t> kept_sums;      // s2 per sum block (ASH-S)
  std::vector<scalar_t> masked;      // one sum block of kept values (ASH-S)
  std::vector<int64_t> gathered;     // keys gathered per chunk
  std::vector<int64_t> chunk_above;  // keys above the window per chunk
  std::vector<scalar_t> clamped;     // the clamped sample (topk_stats with clamp bounds)
  ThresholdGuess<key_t>& guess = this_threads_guess<Radix, scalar_t>();
  explicit Scratch(int64_t n) : hist(Radix::kHistCopies * Radix::kFirstBuckets), candidates(static_cast<size_t>(n + kLanes)) {}
};

template <typename scalar_t>
inline void keys_of_tile(const scalar_t* in, int64_t len, key_type<scalar_t>* keys) {
  for (int64_t j = 0; j < len; ++j) {
    keys[j] = order_key(in[j]);
  }
}

// Sum of a block in kLanes lanes, then the lanes in order.
template <typename acc_t, typename F>
inline acc_t block_sum(int64_t len, const F& value_at) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += value_at(i + l);
    }
  }
  for (; i < len; ++i) {
    lanes[i % kLanes] += value_at(i);
  }
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    total += lanes[l];
  }
  return total;
}

// Appends the keys of keys[0, len) whose digit (key >> shift) - lo is <= span to out[*count...].
// Blocks of kLanes keys are tested at once, as most hold none.
template <typename key_t>
inline void gather_digits(const key_t* keys, int64_t len, int shift, key_t lo, key_t span, key_t* out,
                          int64_t* count) {
  int64_t gathered = *count;
  for (int64_t j = 0; j < len; j += kLanes) {
    const int64_t block_len = std::min(kLanes, len - j);
    uint32_t matches = 0;  // an integer sum vectorises where a boolean "any" did not
    for (int64_t l = 0; l < block_len; ++l) {
      matches += static_cast<key_t>((keys[j + l] >> shift) - lo) <= span;
    }
    if (matches == 0) {
      continue;
    }
    for (int64_t l = 0; l < block_len; ++l) {
      const key_t key = keys[j + l];
      out[gathered] = key;  // branch-free compaction: always write, advance on a match
      gathered += static_cast<key_t>((key >> shift) - lo) <= span;
    }
  }
  *count = gathered;
}

// Whether the AVX-512 loops serve scalar_t (float32 only) when `simd` is on. Call sites test it
// with `if constexpr (has_avx512_code<scalar_t>)` so that the float-only code is only compiled
// for float.
template <typename scalar_t>
#ifdef ASH_EXT_HAVE_AVX512_CODE
constexpr bool has_avx512_code = std::is_same_v<scalar_t, float>;
#else
constexpr bool has_avx512_code = false;
#endif

// The shared walk of passes A and W over the sum blocks [first_block, last_block): each
// block's sum into block_sums, and per_tile(keys, len) for the keys of each tile.
template <typename scalar_t, typename PerTile>
inline void sum_blocks_and_key_tiles(const scalar_t* in, int64_t n, int64_t first_block, int64_t last_block,
                                     acc_type<scalar_t>* block_sums, const PerTile& per_tile, bool simd) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (has_avx512_code<scalar_t>) {
    if (simd) {
      return avx512::sum_blocks_and_key_tiles(in, n, first_block, last_block, block_sums, per_tile);
    }
  }
  key_type<scalar_t> keys[kTile];
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * kSumBlock;
    const int64_t end = std::min(n, begin + kSumBlock);
    block_sums[block] = block_sum<acc_t>(end - begin, [&](int64_t i) { return static_cast<acc_t>(in[begin + i]); });
    for (int64_t tile = begin; tile < end; tile += kTile) {
      const int64_t len = std::min(kTile, end - tile);
      keys_of_tile(in + tile, len, keys);
      per_tile(keys, len);
    }
  }
}

// Pass A over the sum blocks [first_block, last_block): each block's sum into block_sums and
// the top-digit histogram added to `counts`.
template <typename Radix, typename scalar_t>
void pass_a(const scalar_t* in, int64_t n, int64_t first_block, int64_t last_block, uint32_t* hist, int64_t* counts,
            acc_type<scalar_t>* block_sums, bool simd) {
  using key_t = key_type<scalar_t>;
  constexpr int shift = first_shift<Radix, key_t>();
  constexpr int copies = Radix::kHistCopies;
  constexpr int64_t buckets = Radix::kFirstBuckets;
  std::fill(hist, hist + copies * buckets, 0u);
  sum_blocks_and_key_tiles(in, n, first_block, last_block, block_sums, [&](const key_t* keys, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
      ++hist[(j % copies) * buckets + (keys[j] >> shift)];
    }
  }, simd);
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
// number of keys above `hi` into *above, and the keys in [lo, hi] appended to `gathered`.
// Returns the number gathered.
template <typename scalar_t>
int64_t pass_window(const scalar_t* in, int64_t n, int64_t first_block, int64_t last_block, key_type<scalar_t> lo,
                    key_type<scalar_t> hi, acc_type<scalar_t>* block_sums, key_type<scalar_t>* gathered,
                    int64_t* above, bool simd) {
  using key_t = key_type<scalar_t>;
  if constexpr (has_avx512_code<scalar_t>) {
    if (simd) {
      return avx512::pass_window(in, n, first_block, last_block, lo, hi, block_sums, gathered, above);
    }
  }
  int64_t count = 0;
  int64_t above_total = 0;
  sum_blocks_and_key_tiles(in, n, first_block, last_block, block_sums, [&](const key_t* keys, int64_t len) {
    uint32_t above_lanes[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        above_lanes[l] += keys[j + l] > hi;
      }
    }
    for (; j < len; ++j) {
      above_lanes[0] += keys[j] > hi;
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      above_total += above_lanes[l];
    }
    gather_digits(keys, len, 0, lo, static_cast<key_t>(hi - lo), gathered, &count);
  }, simd);
  *above = above_total;
  return count;
}

// Pass B over [begin, end): appends the keys whose top digit is `digit` to `gathered`.
template <typename Radix, typename scalar_t>
int64_t pass_b(const scalar_t* in, int64_t begin, int64_t end, key_type<scalar_t> digit, key_type<scalar_t>* gathered,
               bool simd) {
  using key_t = key_type<scalar_t>;
  if constexpr (has_avx512_code<scalar_t>) {
    if (simd) {
      return avx512::pass_b(in, begin, end, first_shift<Radix, key_t>(), digit, gathered);
    }
  }
  key_t keys[kTile];
  int64_t count = 0;
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int64_t len = std::min(kTile, end - tile);
    keys_of_tile(in + tile, len, keys);
    gather_digits(keys, len, first_shift<Radix, key_t>(), digit, key_t(0), gathered, &count);
  }
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

// Window rounds (avx512::rank_rounds) before pass C falls back to digits; each costs one vector
// pass over the keys left. Two rounds usually bring a window's keys down to a few dozen.
constexpr int kRankRounds = 6;

// Pass C: selects the `want`-th largest (1 <= want <= count) of the gathered keys -- which
// hold every key equal to it -- and sets sel.threshold, sel.ties and sel.need. `keys` has room
// for count + kLanes keys; `spare` is grown to as many. Either may be overwritten.
template <typename Radix, typename scalar_t>
void select_among_candidates(key_type<scalar_t>* keys, std::vector<key_type<scalar_t>>& spare, int64_t count,
                             int64_t want, Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel, bool simd) {
  if constexpr (has_avx512_code<scalar_t>) {
    if (simd) {
      // A window gathers a few hundred keys at most, so spare seldom reaches the sample's size.
      if (spare.size() < static_cast<size_t>(count + kLanes)) {
        spare.resize(static_cast<size_t>(count + kLanes));
      }
      const avx512::RankRounds left = avx512::rank_rounds(keys, spare.data(), count, want, kRankRounds);
      if (left.found) {
        sel.threshold = left.threshold;
        sel.ties = left.ties;
        sel.need = left.need;
        return;
      }
      TORCH_INTERNAL_ASSERT(left.count > avx512::kRankInRegisters, "ash_ext: no candidate ranks ", left.want);
      // The keys left are in keys or spare; digits reorder them in place.
      return select_by_digits<Radix>(left.keys, left.count, left.want, sel);
    }
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

template <typename acc_t>
acc_t ordered_total(const std::vector<acc_t>& block_sums) {
  acc_t total = 0;
  for (const acc_t s : block_sums) {
    total += s;
  }
  return total;
}

// Selects a sample's k-th largest key (k >= 1).
template <typename Radix, typename scalar_t>
struct SampleSelector {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;

  const SampleLayout& layout;
  bool simd;  // whether the AVX-512 loops run (where has_avx512_code)

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
      select_among_candidates<Radix, scalar_t>(scratch.candidates.data(), scratch.spare, count, k - above, sel, simd);
    } else {
      // A, B, C.
      const auto [digit_count, digit_above] = select_by_histogram(in, k, scratch, plan, block_sums);
      select_among_candidates<Radix, scalar_t>(scratch.candidates.data(), scratch.spare, digit_count, k - digit_above,
                                               sel, simd);
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
                                candidates + plan.begin(c), &chunk_above[c], simd);
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
                    block_sums.data(), simd);
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
      gathered[c] = pass_b<Radix>(in, plan.begin(c), plan.end(c), digit, candidates + plan.begin(c), simd);
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
      if constexpr (has_avx512_code<scalar_t>) {
        if (simd) {
          const int64_t offset = avx512::nth_tie_offset(in, n, sel.threshold, sel.need);
          TORCH_INTERNAL_ASSERT(offset >= 0, "ash_ext: fewer ties than counted");
          return offset;
        }
      }
      int64_t seen = 0;
      for (int64_t i = 0; i < n; ++i) {
        seen += order_key(in[i]) == sel.threshold;
        if (seen == sel.need) {
          return i;
        }
      }
      TORCH_INTERNAL_ASSERT(false, "ash_ext: fewer ties than counted");
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

// Calls range(begin, end, from) over [begin, end) so that within each call "kept" is exactly
// key >= from -- vectorisable maps -- or, for a permuted layout with partial ties (and for NaN
// ties, whose key has no successor), element(i, kept) one element at a time.
template <typename scalar_t, typename Range, typename Element>
void for_kept_ranges(const scalar_t* in, int64_t begin, int64_t end,
                     const Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel, const SampleLayout& layout,
                     const Range& range, const Element& element) {
  using key_t = key_type<scalar_t>;
  const key_t threshold = sel.threshold;
  if (!sel.partial_ties()) {
    range(begin, end, threshold);
  } else if (!layout.permuted && threshold != std::numeric_limits<key_t>::max()) {
    // Memory order is logical order: ties up to offset tie_cut are kept, later ones dropped.
    const int64_t split = std::clamp(sel.tie_cut + 1, begin, end);
    range(begin, split, threshold);
    range(split, end, static_cast<key_t>(threshold + 1));
  } else {
    for (int64_t i = begin; i < end; ++i) {
      element(i, is_kept(sel, layout, order_key(in[i]), i));
    }
  }
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

// One Scratch per thread, made on a thread's first use within one op call.
template <typename Radix, typename scalar_t>
class ScratchPool {
 public:
  explicit ScratchPool(int64_t n) : n_(n), slots_(static_cast<size_t>(max_threads() + 1)) {}
  Scratch<Radix, scalar_t>& get() {
    const size_t slot = std::min<size_t>(static_cast<size_t>(at::get_thread_num()), slots_.size() - 1);
    if (!slots_[slot]) {
      slots_[slot] = std::make_unique<Scratch<Radix, scalar_t>>(n_);
    }
    return *slots_[slot];
  }

 private:
  int64_t n_;
  std::vector<std::unique_ptr<Scratch<Radix, scalar_t>>> slots_;
};

// The sums of a chunk's sum blocks over the kept values only (ASH-S's s2), each block masked
// into a buffer and then summed, both vectorisable.
template <typename scalar_t>
void kept_block_sums(const scalar_t* in, const ChunkPlan& plan, int64_t c,
                     const Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel, const SampleLayout& layout,
                     acc_type<scalar_t>* block_sums, scalar_t* masked, bool simd) {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  if constexpr (has_avx512_code<scalar_t>) {
    if (simd && !(layout.permuted && sel.partial_ties())) {
      return avx512::kept_block_sums(in, plan.n, plan.first_block(c), plan.last_block(c), sel.rule(), block_sums);
    }
  }
  for (int64_t block = plan.first_block(c); block < plan.last_block(c); ++block) {
    const int64_t begin = block * kSumBlock;
    const int64_t end = std::min(plan.n, begin + kSumBlock);
    scalar_t* buffer = masked - begin;  // indexed by the sample offset
    for_kept_ranges(
        in, begin, end, sel, layout,
        [&](int64_t b, int64_t e, key_t from) {
          for (int64_t i = b; i < e; ++i) {
            buffer[i] = keep_or_zero(in[i], order_key(in[i]) >= from);
          }
        },
        [&](int64_t i, bool kept) { buffer[i] = keep_or_zero(in[i], kept); });
    block_sums[block] = block_sum<acc_t>(end - begin, [&](int64_t i) { return static_cast<acc_t>(masked[i]); });
  }
}

// Pass E over [begin, end) of a sample: out = value(in[i]) where kept, else +0.0. `constant` is
// ASH-B's fill or ASH-S's factor.
template <typename scalar_t>
void write_forward(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, Variant variant,
                   acc_type<scalar_t> constant, const Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel,
                   const SampleLayout& layout, bool simd) {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  if constexpr (has_avx512_code<scalar_t>) {
    if (simd && !(layout.permuted && sel.partial_ties()) && std::isfinite(constant)) {
      return avx512::write_forward(in, out, begin, end, variant, constant, sel.rule());
    }
  }
  // Each variant as a range map (kept == key >= from) and a one-element form.
  auto emit = [&](auto kept_value) {
    for_kept_ranges(
        in, begin, end, sel, layout,
        [&](int64_t b, int64_t e, key_t from) {
          for (int64_t i = b; i < e; ++i) {
            out[i] = kept_value(i, order_key(in[i]) >= from);
          }
        },
        [&](int64_t i, bool kept) { out[i] = kept_value(i, kept); });
  };
  const scalar_t fill = static_cast<scalar_t>(constant);
  switch (variant) {
    case Variant::Prune:
      emit([&](int64_t i, bool kept) { return keep_or_zero(in[i], kept); });
      break;
    case Variant::Binarize:
      emit([&](int64_t, bool kept) { return keep_or_zero(fill, kept); });
      break;
    case Variant::Scale:
      if (std::isfinite(constant)) {
        // Mask, then scale the cached result: a dropped +0.0 stays +0.0 (the factor exp(...) is
        // >= 0). Two plain loops vectorise; masking and scaling in one loop did not.
        emit([&](int64_t i, bool kept) { return keep_or_zero(in[i], kept); });
        for (int64_t i = begin; i < end; ++i) {
          out[i] = static_cast<scalar_t>(static_cast<acc_t>(out[i]) * constant);
        }
      } else {
        // An infinite or NaN factor: kept values follow IEEE (0 * inf = NaN), dropped stay +0.0.
        emit([&](int64_t i, bool kept) {
          return keep_or_zero(static_cast<scalar_t>(static_cast<acc_t>(in[i]) * constant), kept);
        });
      }
      break;
    case Variant::ScaleUnpruned:
      TORCH_INTERNAL_ASSERT(false, "ash_ext: SCALE's output pass is write_scaled");
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
// lets every later pass -- the portable loops and the AVX-512 ones alike -- run unchanged on the
// clamped values, which they then read from cache. The loop is a compare-and-select the compiler
// vectorises (for float, a max and a min: both keep v when v is NaN or a zero equal to the bound).
template <typename scalar_t>
void clamp_sample(const scalar_t* src, scalar_t* dst, const ChunkPlan& plan, const ClampBounds<scalar_t>& bounds) {
  const scalar_t low = bounds.low;
  const scalar_t high = bounds.high;
  run_chunks(plan.chunks, [&](int64_t c) {
    for (int64_t i = plan.begin(c); i < plan.end(c); ++i) {
      dst[i] = clamp_value(src[i], low, high);
    }
  });
}

// s1 of a sample that keeps nothing (so has no selection to take it from): block by block with
// block_sum, which is what passes A and W compute per block on either path, then the blocks in
// order -- the same bits the selection would have produced.
template <typename scalar_t>
acc_type<scalar_t> sample_total(const scalar_t* in, const ChunkPlan& plan,
                                std::vector<acc_type<scalar_t>>& block_sums) {
  using acc_t = acc_type<scalar_t>;
  block_sums.assign(static_cast<size_t>(plan.blocks), acc_t(0));
  run_chunks(plan.chunks, [&](int64_t c) {
    for (int64_t block = plan.first_block(c); block < plan.last_block(c); ++block) {
      const int64_t begin = block * kSumBlock;
      const int64_t end = std::min(plan.n, begin + kSumBlock);
      block_sums[block] = block_sum<acc_t>(end - begin, [&](int64_t i) { return static_cast<acc_t>(in[begin + i]); });
    }
  });
  return ordered_total(block_sums);
}

// s2, the sum of the kept values, in ASH-S's order: the kept values' block sums, then the blocks
// in order. ASH-S, SCALE and topk_stats all take it from here, so their s2 agree bit for bit.
template <typename Radix, typename scalar_t>
acc_type<scalar_t> kept_total(const scalar_t* in, const ChunkPlan& plan,
                              const Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel, const SampleLayout& layout,
                              Scratch<Radix, scalar_t>& scratch, bool simd) {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t>& kept_sums = scratch.kept_sums;
  kept_sums.assign(static_cast<size_t>(plan.blocks), acc_t(0));
  // One block-sized buffer per chunk (chunks run on different threads).
  const int64_t block_len = std::min(kSumBlock, plan.n);
  scratch.masked.resize(static_cast<size_t>(block_len * plan.chunks));
  run_chunks(plan.chunks, [&](int64_t c) {
    kept_block_sums(in, plan, c, sel, layout, kept_sums.data(), scratch.masked.data() + c * block_len, simd);
  });
  return ordered_total(kept_sums);
}

// SCALE's output over [begin, end): every value times the factor in the accumulation type,
// rounded once (a NaN or infinite factor follows IEEE). One path for every CPU: a plain loop the
// compiler vectorises, so the AVX-512 build needs no version of its own.
template <typename scalar_t>
void write_scaled(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, acc_type<scalar_t> factor) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * factor);
  }
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
  const bool simd = cpu_simd_enabled();
  const SampleSelector<Radix, scalar_t> selector{layout, simd};
  const ClampBounds<scalar_t> bounds(args);
  ScratchPool<Radix, scalar_t> pool(n);
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
    auto& scratch = pool.get();
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
      constant = scale_factor(sel.sum, kept_total(in, plan, sel, layout, scratch, simd));
    } else if (variant == Variant::Binarize) {
      constant = sel.sum / static_cast<acc_t>(k);
    }
    if (variant == Variant::ScaleUnpruned) {
      run_chunks(plan.chunks, [&](int64_t c) { write_scaled(in, dst, plan.begin(c), plan.end(c), constant); });
    } else {
      run_chunks(plan.chunks, [&](int64_t c) {
        write_forward(in, dst, plan.begin(c), plan.end(c), variant, constant, sel, layout, simd);
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
    s2 = kept_total(xs, plan, sel, layout, scratch, selector.simd);
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
  const SampleSelector<Radix, scalar_t> selector{layout, cpu_simd_enabled()};
  // The backward is not on the inference path: one sample per task, a plain loop per sample.
  at::parallel_for(0, layout.batch, 1, [&](int64_t begin, int64_t end) {
    Scratch<Radix, scalar_t> scratch(n);
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
  const bool simd = cpu_simd_enabled();
  const SampleSelector<Radix, scalar_t> selector{layout, simd};
  const ClampBounds<scalar_t> bounds(args);
  ScratchPool<Radix, scalar_t> pool(n);
  for_each_sample(layout, [&](int64_t b, int64_t parallel_chunks) {
    const int64_t k = args.k_of(b);
    const scalar_t* in = in_base + b * n;
    const ChunkPlan plan(n, parallel_chunks);
    auto& scratch = pool.get();
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
    kept_out[b] = kept_total(in, plan, sel, layout, scratch, simd);
  });
}

}  // namespace

void ash_forward_cpu(const at::Tensor& x, const at::Tensor& out, const ShapeArgs& args, Variant variant,
                     const SampleLayout& layout) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "ash_ext: the CPU kernel got a tensor on ", x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_forward_cpu", [&] {
    if (layout.n <= kShortSample) {
      forward_impl<ShortSampleRadix, scalar_t>(x, out, args, variant, layout);
    } else {
      forward_impl<LongSampleRadix, scalar_t>(x, out, args, variant, layout);
    }
  });
}

void ash_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, const ShapeArgs& args,
                      Variant variant, const SampleLayout& layout) {
  TORCH_CHECK(x.device().is_cpu(), "ash_ext: the CPU kernel got a tensor on ", x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_backward_cpu", [&] {
    if (layout.n <= kShortSample) {
      backward_impl<ShortSampleRadix, scalar_t>(grad, x, grad_x, args, variant, layout);
    } else {
      backward_impl<LongSampleRadix, scalar_t>(grad, x, grad_x, args, variant, layout);
    }
  });
}

void ash_stats_cpu(const at::Tensor& x, const ShapeArgs& args, const SampleLayout& layout,
                   const at::Tensor& threshold, const at::Tensor& total, const at::Tensor& kept) {
  TORCH_CHECK(x.device().is_cpu(), "ash_ext: the CPU kernel got a tensor on ", x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_stats_cpu", [&] {
    if (layout.n <= kShortSample) {
      stats_impl<ShortSampleRadix, scalar_t>(x, args, layout, threshold, total, kept);
    } else {
      stats_impl<LongSampleRadix, scalar_t>(x, args, layout, threshold, total, kept);
    }
  });
}

namespace {

bool cpu_has_avx512() {
#ifdef ASH_EXT_HAVE_AVX512_CODE
  // This runs from a static initialiser, possibly before libgcc's own CPU detection: start it.
  // The check includes the OS saving the AVX-512 registers (XGETBV).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

bool simd_allowed_by_environment() {
  const char* setting = std::getenv("ASH_EXT_CPU_SIMD");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

std::atomic<bool> cpu_simd_on{cpu_has_avx512() && simd_allowed_by_environment()};

}  // namespace

bool cpu_simd_available() { return cpu_has_avx512(); }

bool cpu_simd_enabled() { return cpu_simd_on.load(std::memory_order_relaxed); }

bool set_cpu_simd(bool enabled) { return cpu_simd_on.exchange(enabled && cpu_has_avx512()); }

TORCH_LIBRARY_IMPL(ash_ext, CPU, m) {
  BackendOps<&ash_forward_cpu, &ash_backward_cpu, &ash_stats_cpu>::register_impls(m);
}

}  // namespace ash_ext
