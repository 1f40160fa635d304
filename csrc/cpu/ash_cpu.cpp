// CPU backend of the ASH op: an O(n) radix select of each sample's k-th largest key, then one
// fused output pass.
//
// Per sample:
//   A. one pass over the values: their sum s1 and a histogram of the keys' top digit;
//   B. one pass (the sample is now in cache): the sum of the values whose digit is above the
//      threshold's digit, and the keys of the threshold's digit bucket gathered into a buffer;
//   C. the remaining digits are selected among the gathered keys only, which leaves the exact
//      threshold key T, the number of ties at T, and how many of them to keep;
//   D. when only some ties are kept, the tie cut: the largest logical index among kept ties;
//   E. one output pass.
// Samples are spread over threads; a batch smaller than the thread count splits each sample's
// passes over the threads instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include "../ash.h"

namespace ash_ext {
namespace {

constexpr int kFirstDigitBits = 11;
constexpr int kLaterDigitBits = 11;
constexpr int64_t kBlock = 16;      // values handled per unrolled step
constexpr int kHistCopies = 4;      // interleaved histograms, so runs of equal keys do not serialise
constexpr int64_t kMaxChunk = int64_t(1) << 30;  // keeps per-chunk uint32 counts exact

// What the selection found for one sample.
template <typename key_t, typename acc_t>
struct Selection {
  key_t threshold = 0;     // T, the key of the k-th largest value
  int64_t ties = 0;        // values whose key is T
  int64_t need = 0;        // of those, how many are kept
  int64_t tie_cut = 0;     // a tie is kept iff its logical index <= tie_cut (when need < ties)
  acc_t above_sum = 0;     // sum of the values whose key is above T
  acc_t sum = 0;           // s1, the sum of the whole sample
  bool partial_ties() const { return need < ties; }
};

template <typename key_t>
constexpr int first_shift() {
  return key_bits<key_t>() - kFirstDigitBits;
}

// Per-sample working memory, reused across the samples one thread handles.
template <typename key_t>
struct Scratch {
  std::vector<uint32_t> hist;       // kHistCopies * buckets
  std::vector<key_t> candidates;    // keys in the threshold's bucket
  std::vector<int64_t> tie_indices;  // logical indices of ties, permuted layouts only
  explicit Scratch(int64_t n) : hist(kHistCopies << kFirstDigitBits), candidates(static_cast<size_t>(n)) {}
};

// Values are processed in tiles: a vectorisable loop computes a tile's keys and sums, then a
// scalar loop does what cannot vectorise (histogram increments, compaction).
constexpr int64_t kTile = 256;

// Sums [begin, end) in kBlock independent lanes (vectorisable, and a repeatable order).
template <typename scalar_t>
struct LaneSum {
  acc_type<scalar_t> lanes[kBlock] = {};
  void add_tile(const scalar_t* in, int64_t len) {
    int64_t i = 0;
    for (; i + kBlock <= len; i += kBlock) {
      for (int j = 0; j < kBlock; ++j) {
        lanes[j] += static_cast<acc_type<scalar_t>>(in[i + j]);
      }
    }
    for (; i < len; ++i) {
      lanes[0] += static_cast<acc_type<scalar_t>>(in[i]);
    }
  }
  acc_type<scalar_t> total() const {
    acc_type<scalar_t> t = 0;
    for (int j = 0; j < kBlock; ++j) {
      t += lanes[j];
    }
    return t;
  }
};

template <typename scalar_t>
inline void keys_of_tile(const scalar_t* in, int64_t len, key_type<scalar_t>* keys) {
  for (int64_t j = 0; j < len; ++j) {
    keys[j] = order_key(in[j]);
  }
}

// Pass A over [begin, end): accumulates the sum and the top-digit histogram (into `counts`).
template <typename scalar_t>
acc_type<scalar_t> sum_and_histogram(const scalar_t* in, int64_t begin, int64_t end, uint32_t* hist,
                                     int64_t* counts) {
  using key_t = key_type<scalar_t>;
  constexpr int shift = first_shift<key_t>();
  constexpr int64_t buckets = int64_t(1) << kFirstDigitBits;
  LaneSum<scalar_t> sum;
  key_t keys[kTile];
  for (int64_t chunk = begin; chunk < end; chunk += kMaxChunk) {
    const int64_t chunk_end = std::min(end, chunk + kMaxChunk);
    std::fill(hist, hist + kHistCopies * buckets, 0u);
    for (int64_t tile = chunk; tile < chunk_end; tile += kTile) {
      const int64_t len = std::min(kTile, chunk_end - tile);
      sum.add_tile(in + tile, len);
      keys_of_tile(in + tile, len, keys);
      for (int64_t j = 0; j < len; ++j) {
        ++hist[(j % kHistCopies) * buckets + (keys[j] >> shift)];
      }
    }
    for (int64_t b = 0; b < buckets; ++b) {
      int64_t c = 0;
      for (int copy = 0; copy < kHistCopies; ++copy) {
        c += hist[copy * buckets + b];
      }
      counts[b] += c;
    }
  }
  return sum.total();
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

// Pass B over [begin, end): the sum of values whose top digit is above `bucket`, and the keys in
// `bucket` appended at `out`. Returns the number gathered.
template <typename scalar_t>
int64_t gather_bucket(const scalar_t* in, int64_t begin, int64_t end, key_type<scalar_t> bucket,
                      key_type<scalar_t>* out, acc_type<scalar_t>* above_sum) {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  constexpr int shift = first_shift<key_t>();
  // Keys whose top digit is above the bucket are exactly those >= the next bucket's first key.
  const key_t above_from = static_cast<key_t>((static_cast<uint64_t>(bucket) + 1) << shift);
  const bool top_bucket = (static_cast<uint64_t>(bucket) + 1) << shift > std::numeric_limits<key_t>::max();
  acc_t lanes[kBlock] = {};
  key_t keys[kTile];
  int64_t gathered = 0;
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int64_t len = std::min(kTile, end - tile);
    const scalar_t* values = in + tile;
    keys_of_tile(values, len, keys);
    if (!top_bucket) {
      int64_t j = 0;
      for (; j + kBlock <= len; j += kBlock) {
        for (int l = 0; l < kBlock; ++l) {
          lanes[l] += static_cast<acc_t>(keep_or_zero(values[j + l], keys[j + l] >= above_from));
        }
      }
      for (; j < len; ++j) {
        lanes[0] += static_cast<acc_t>(keep_or_zero(values[j], keys[j] >= above_from));
      }
    }
    // Most blocks hold no key of the bucket: test a block at once (vectorisable), and compact
    // only blocks with a match.
    for (int64_t j = 0; j < len; j += kBlock) {
      const int64_t block_len = std::min(kBlock, len - j);
      bool any = false;
      for (int64_t l = 0; l < block_len; ++l) {
        any |= (keys[j + l] >> shift) == bucket;
      }
      if (!any) {
        continue;
      }
      for (int64_t l = 0; l < block_len; ++l) {
        const key_t key = keys[j + l];
        out[gathered] = key;  // branch-free compaction: always write, advance on a match
        gathered += (key >> shift) == bucket;
      }
    }
  }
  acc_t total = 0;
  for (int j = 0; j < kBlock; ++j) {
    total += lanes[j];
  }
  *above_sum += total;
  return gathered;
}

// Pass C: selects the remaining digits (below `done_bits` already fixed ones) among the gathered
// keys, all of which share the top digit. On return sel.threshold, sel.ties and sel.need are set
// and sel.above_sum includes the gathered keys above the threshold.
template <typename scalar_t>
void select_among_candidates(key_type<scalar_t>* keys, int64_t count, int64_t want, int done_bits,
                             Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel) {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  constexpr int total_bits = key_bits<key_t>();
  std::array<int64_t, (1 << kLaterDigitBits)> counts;
  while (done_bits < total_bits && count > 0) {
    const int digit_bits = std::min(kLaterDigitBits, total_bits - done_bits);
    const int shift = total_bits - done_bits - digit_bits;
    const key_t mask = static_cast<key_t>((key_t(1) << digit_bits) - 1);
    const int64_t buckets = int64_t(1) << digit_bits;
    std::fill(counts.begin(), counts.begin() + buckets, 0);
    for (int64_t i = 0; i < count; ++i) {
      ++counts[(keys[i] >> shift) & mask];
    }
    int64_t above = 0;
    const key_t bucket = static_cast<key_t>(find_bucket(counts.data(), buckets, want, &above));
    // Sum the keys above the chosen bucket (in their gathered order, so results are repeatable)
    // and keep the chosen bucket's keys.
    acc_t above_sum = 0;
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) {
      const key_t digit = static_cast<key_t>((keys[i] >> shift) & mask);
      if (digit > bucket) {
        above_sum += static_cast<acc_t>(value_of_key<scalar_t>(keys[i]));
      }
      keys[kept] = keys[i];
      kept += digit == bucket;
    }
    sel.above_sum += above_sum;
    want -= above;
    count = kept;
    done_bits += digit_bits;
  }
  sel.threshold = keys[0];
  sel.ties = count;
  sel.need = want;
}

// The per-sample kernel state: input, output, the selection and the thread's scratch.
template <typename scalar_t>
struct SampleSelector {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;

  const SampleLayout& layout;
  int64_t k;

  // Selects the k-th largest of in[0, n) (k >= 1). `chunks` > 1 spreads passes A, B and D over
  // threads; it must be 1 when called from inside a parallel region.
  Selection<key_t, acc_t> select(const scalar_t* in, Scratch<key_t>& scratch, int64_t chunks) const {
    const int64_t n = layout.n;
    constexpr int64_t buckets = int64_t(1) << kFirstDigitBits;
    Selection<key_t, acc_t> sel;
    const int64_t chunk_len = (n + chunks - 1) / chunks;

    // A: sum and top-digit histogram.
    std::vector<int64_t> counts(static_cast<size_t>(buckets * chunks), 0);
    std::vector<acc_t> sums(static_cast<size_t>(chunks), acc_t(0));
    run_chunks(chunks, [&](int64_t c) {
      std::vector<uint32_t> local_hist;
      uint32_t* hist = scratch.hist.data();
      if (chunks > 1) {
        local_hist.resize(kHistCopies * buckets);
        hist = local_hist.data();
      }
      const int64_t begin = c * chunk_len;
      const int64_t end = std::min(n, begin + chunk_len);
      sums[c] = sum_and_histogram(in, begin, end, hist, counts.data() + c * buckets);
    });
    for (int64_t c = 1; c < chunks; ++c) {
      for (int64_t b = 0; b < buckets; ++b) {
        counts[b] += counts[c * buckets + b];
      }
    }
    for (int64_t c = 0; c < chunks; ++c) {
      sel.sum += sums[c];
    }
    int64_t above = 0;
    const key_t bucket = static_cast<key_t>(find_bucket(counts.data(), buckets, k, &above));

    // B: the sum above the bucket and the bucket's keys, each chunk gathering into its own
    // stretch of the buffer, then packed together in chunk order.
    std::vector<int64_t> gathered(static_cast<size_t>(chunks), 0);
    std::vector<acc_t> above_sums(static_cast<size_t>(chunks), acc_t(0));
    key_t* candidates = scratch.candidates.data();
    run_chunks(chunks, [&](int64_t c) {
      const int64_t begin = c * chunk_len;
      const int64_t end = std::min(n, begin + chunk_len);
      gathered[c] = gather_bucket(in, begin, end, bucket, candidates + begin, &above_sums[c]);
    });
    int64_t count = gathered[0];
    for (int64_t c = 1; c < chunks; ++c) {
      std::memmove(candidates + count, candidates + c * chunk_len, gathered[c] * sizeof(key_t));
      count += gathered[c];
    }
    for (int64_t c = 0; c < chunks; ++c) {
      sel.above_sum += above_sums[c];
    }

    // C: the remaining digits among the gathered keys.
    select_among_candidates<scalar_t>(candidates, count, k - above, kFirstDigitBits, sel);

    // D: where only some ties are kept, the logical index of the last kept one.
    if (sel.partial_ties()) {
      sel.tie_cut = find_tie_cut(in, sel, scratch);
    }
    return sel;
  }

  int64_t find_tie_cut(const scalar_t* in, const Selection<key_t, acc_t>& sel, Scratch<key_t>& scratch) const {
    const int64_t n = layout.n;
    if (!layout.permuted) {
      // Memory order is logical order: the need-th tie met is the last one kept.
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

  template <typename F>
  static void run_chunks(int64_t chunks, const F& body) {
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
};

// Whether the element at memory offset i with key `key` is kept.
template <typename key_t, typename acc_t>
inline bool is_kept(const Selection<key_t, acc_t>& sel, const SampleLayout& layout, key_t key, int64_t i) {
  if (key != sel.threshold) {
    return key > sel.threshold;
  }
  return !sel.partial_ties() || logical_index(layout, i) <= sel.tie_cut;
}

// Pass E over [begin, end) of one sample, for kept := key >= from (a vectorisable map).
template <typename scalar_t>
void write_range(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, key_type<scalar_t> from,
                 Variant variant, acc_type<scalar_t> constant) {
  using acc_t = acc_type<scalar_t>;
  switch (variant) {
    case Variant::Prune:
      for (int64_t i = begin; i < end; ++i) {
        out[i] = keep_or_zero(in[i], order_key(in[i]) >= from);
      }
      break;
    case Variant::Binarize: {
      const scalar_t fill = static_cast<scalar_t>(constant);
      for (int64_t i = begin; i < end; ++i) {
        out[i] = keep_or_zero(fill, order_key(in[i]) >= from);
      }
      break;
    }
    case Variant::Scale:
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t scaled = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * constant);
        out[i] = keep_or_zero(scaled, order_key(in[i]) >= from);
      }
      break;
  }
}

// Pass E for the forward op over [begin, end) of one sample. `constant` is ASH-B's fill or
// ASH-S's factor.
template <typename scalar_t>
void write_forward(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, Variant variant,
                   const Selection<key_type<scalar_t>, acc_type<scalar_t>>& sel, acc_type<scalar_t> constant,
                   const SampleLayout& layout) {
  using key_t = key_type<scalar_t>;
  const key_t threshold = sel.threshold;
  if (!sel.partial_ties()) {
    write_range(in, out, begin, end, threshold, variant, constant);
    return;
  }
  // Only some ties are kept. In memory order == logical order, ties up to offset tie_cut are
  // kept and later ones dropped: two vectorisable ranges. (threshold + 1 exists unless the
  // ties are NaNs, whose key is the largest; they take the general path below.)
  if (!layout.permuted && threshold != std::numeric_limits<key_t>::max()) {
    const int64_t split = std::clamp(sel.tie_cut + 1, begin, end);
    write_range(in, out, begin, split, threshold, variant, constant);
    write_range(in, out, split, end, static_cast<key_t>(threshold + 1), variant, constant);
    return;
  }
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    scalar_t value(0);
    if (is_kept(sel, layout, order_key(in[i]), i)) {
      value = variant == Variant::Prune      ? in[i]
              : variant == Variant::Binarize ? static_cast<scalar_t>(constant)
                                             : static_cast<scalar_t>(static_cast<acc_t>(in[i]) * constant);
    }
    out[i] = value;
  }
}

// The per-sample constant of the forward pass: the fill of ASH-B, the factor of ASH-S.
template <typename key_t, typename acc_t>
acc_t forward_constant(const Selection<key_t, acc_t>& sel, Variant variant, int64_t k, acc_t threshold_value) {
  switch (variant) {
    case Variant::Binarize:
      return sel.sum / static_cast<acc_t>(k);
    case Variant::Scale: {
      const acc_t kept_sum = sel.above_sum + static_cast<acc_t>(sel.need) * threshold_value;
      return scale_factor(sel.sum, kept_sum);
    }
    case Variant::Prune:
      break;
  }
  return acc_t(1);
}

int64_t max_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Runs `per_sample(b, chunks)` for every sample: samples in parallel when there are enough of
// them, else one at a time with `chunks` > 1 telling the sample's passes to split.
template <typename F>
void for_each_sample(const SampleLayout& layout, int64_t min_chunk, const F& per_sample) {
  const int64_t threads = max_threads();
  const int64_t split = std::min<int64_t>(threads, std::max<int64_t>(1, layout.n / min_chunk));
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

constexpr int64_t kMinChunk = 16384;  // below this a sample is not split over threads

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& out, int64_t k, Variant variant, const SampleLayout& layout) {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  const scalar_t* in_base = x.const_data_ptr<scalar_t>();
  scalar_t* out_base = out.mutable_data_ptr<scalar_t>();
  const int64_t n = layout.n;
  if (k == 0) {
    at::parallel_for(0, layout.batch * n, 32768, [&](int64_t begin, int64_t end) {
      std::fill(out_base + begin, out_base + end, scalar_t(0));
    });
    return;
  }
  const SampleSelector<scalar_t> selector{layout, k};
  // Scratch per thread, allocated on first use by that thread for this call.
  const int64_t threads = max_threads();
  std::vector<std::unique_ptr<Scratch<key_t>>> scratch(static_cast<size_t>(threads + 1));
  auto scratch_for_thread = [&]() -> Scratch<key_t>& {
    const int64_t t = std::min<int64_t>(at::get_thread_num(), threads);
    if (!scratch[t]) {
      scratch[t] = std::make_unique<Scratch<key_t>>(n);
    }
    return *scratch[t];
  };
  for_each_sample(layout, kMinChunk, [&](int64_t b, int64_t chunks) {
    const scalar_t* in = in_base + b * n;
    scalar_t* out_sample = out_base + b * n;
    const auto sel = selector.select(in, scratch_for_thread(), chunks);
    const acc_t constant =
        forward_constant(sel, variant, k, static_cast<acc_t>(value_of_key<scalar_t>(sel.threshold)));
    SampleSelector<scalar_t>::run_chunks(chunks, [&](int64_t c) {
      const int64_t chunk_len = (n + chunks - 1) / chunks;
      const int64_t begin = c * chunk_len;
      write_forward(in, out_sample, begin, std::min(n, begin + chunk_len), variant, sel, constant, layout);
    });
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, int64_t k, Variant variant,
                   const SampleLayout& layout) {
  using key_t = key_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x_base = x.const_data_ptr<scalar_t>();
  const scalar_t* g_base = grad.const_data_ptr<scalar_t>();
  scalar_t* gx_base = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t n = layout.n;
  if (k == 0) {
    grad_x.zero_();
    return;
  }
  const SampleSelector<scalar_t> selector{layout, k};
  // The backward is not on the inference path: one sample per task, no intra-sample split.
  at::parallel_for(0, layout.batch, 1, [&](int64_t begin, int64_t end) {
    Scratch<key_t> scratch(n);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* xs = x_base + b * n;
      const scalar_t* gs = g_base + b * n;
      scalar_t* gxs = gx_base + b * n;
      const auto sel = selector.select(xs, scratch, 1);
      // Sums over the kept elements: of g (ASH-B) and of g * x (ASH-S).
      acc_t kept_grad = 0;
      acc_t kept_grad_x = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (is_kept(sel, layout, order_key(xs[i]), i)) {
          kept_grad += static_cast<acc_t>(gs[i]);
          kept_grad_x += static_cast<acc_t>(gs[i]) * static_cast<acc_t>(xs[i]);
        }
      }
      const acc_t threshold_value = static_cast<acc_t>(value_of_key<scalar_t>(sel.threshold));
      const acc_t s1 = sel.sum;
      const acc_t s2 = sel.above_sum + static_cast<acc_t>(sel.need) * threshold_value;
      switch (variant) {
        case Variant::Prune:
          for (int64_t i = 0; i < n; ++i) {
            gxs[i] = is_kept(sel, layout, order_key(xs[i]), i) ? gs[i] : scalar_t(0);
          }
          break;
        case Variant::Binarize:
          std::fill(gxs, gxs + n, static_cast<scalar_t>(kept_grad / static_cast<acc_t>(k)));
          break;
        case Variant::Scale: {
          if (s2 == acc_t(0)) {  // the factor is the constant 1 there (see scale_factor)
            for (int64_t i = 0; i < n; ++i) {
              gxs[i] = is_kept(sel, layout, order_key(xs[i]), i) ? gs[i] : scalar_t(0);
            }
            break;
          }
          const acc_t factor = scale_factor(s1, s2);
          const acc_t shared = factor * kept_grad_x / s2;                  // E * G / s2, to every element
          const acc_t kept_shift = kept_grad_x * s1 / (s2 * s2);           // G * s1 / s2^2, kept only
          for (int64_t i = 0; i < n; ++i) {
            acc_t value = shared;
            if (is_kept(sel, layout, order_key(xs[i]), i)) {
              value += factor * (static_cast<acc_t>(gs[i]) - kept_shift);
            }
            gxs[i] = static_cast<scalar_t>(value);
          }
          break;
        }
      }
    }
  });
}

}  // namespace

void ash_forward_cpu(const at::Tensor& x, const at::Tensor& out, int64_t k, Variant variant,
                     const SampleLayout& layout) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "ash_ext: the CPU kernel got a tensor on ", x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_forward_cpu",
                                  [&] { forward_impl<scalar_t>(x, out, k, variant, layout); });
}

void ash_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_x, int64_t k,
                      Variant variant, const SampleLayout& layout) {
  TORCH_CHECK(x.device().is_cpu(), "ash_ext: the CPU kernel got a tensor on ", x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ash_backward_cpu",
                                  [&] { backward_impl<scalar_t>(grad, x, grad_x, k, variant, layout); });
}

namespace {

at::Tensor ash_cpu(const at::Tensor& x, int64_t k, int64_t variant) {
  return ash_forward(x, k, variant, &ash_forward_cpu);
}

void ash_inplace_cpu(const at::Tensor& x, int64_t k, int64_t variant) {
  ash_forward_inplace(x, k, variant, &ash_forward_cpu);
}

at::Tensor ash_backward_cpu_op(const at::Tensor& grad, const at::Tensor& x, int64_t k, int64_t variant) {
  return ash_backward(grad, x, k, variant, &ash_backward_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(ash_ext, CPU, m) {
  m.impl("ash", &ash_cpu);
  m.impl("ash_", &ash_inplace_cpu);
  m.impl("ash_backward", &ash_backward_cpu_op);
}

}  // namespace ash_ext
