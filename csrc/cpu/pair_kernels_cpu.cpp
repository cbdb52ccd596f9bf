// CPU kernels: per-(sample, neuron) statistics of a pair of activations, and the elementwise
// gradient pass of the stabilizing loss. Both read each input element exactly once and walk the
// layout the same way (walk_columns / walk_runs below).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/entry.h"

// An AVX2/FMA clone of each task next to the baseline one, picked when the library loads.
#if defined(NEUROSENS_X86_CLONES)
#define NEUROSENS_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NEUROSENS_CLONES
#endif
// The walks, the bodies given to them and the small helpers are inlined into the (cloned) task:
// called, they would cost a call per map and run the baseline target's code.
#define NEUROSENS_INLINE __attribute__((always_inline))

namespace neurosens {
namespace {

// Enough elements per task that scheduling costs nothing next to the memory traffic.
constexpr int64_t kGrainElements = 1 << 15;
// Elements of a contiguous run summed per block: kSumBlock terms in each of the SIMD lanes.
constexpr int64_t kRunBlock = 8 * kSumBlock;

struct Offsets {
  int64_t t[kMaxTensors];  // of one element in each tensor
};

NEUROSENS_INLINE inline Offsets offsets(const PairLayout& L, int64_t n, int64_t c, int64_t i0, int64_t i1, int64_t i2) {
  Offsets o;
  for (int t = 0; t < L.ntensors; ++t)
    o.t[t] = n * L.sn[t] + c * L.sc[t] + i0 * L.ss[t][0] + i1 * L.ss[t][1] + i2 * L.ss[t][2];
  return o;
}

// Neurons adjacent in memory (channels_last, [N, C], [N, T, C]) are walked by columns: a sample
// at a time, position by position, all neurons at once. Other layouts are walked by runs: a map
// at a time, along its innermost spatial dim (one run per map for contiguous NCHW).
// parallel_tasks splits the work into tasks of about kGrainElements elements: task(begin, end)
// gets samples when walking by columns, else maps r = n * C + c.
template <typename Task>
void parallel_tasks(const PairLayout& L, const Task& task) {
  const bool columns = L.by_columns();
  const int64_t items = columns ? L.N : L.N * L.C;
  const int64_t item_elements = columns ? L.C * L.D : L.D;
  at::parallel_for(0, items, std::max<int64_t>(1, kGrainElements / item_elements), task);
}

// f(o) for each position of sample n, in memory order; o locates neuron 0 there.
template <typename F>
NEUROSENS_INLINE inline void walk_columns(const PairLayout& L, int64_t n, F&& f) {
  for (int64_t i0 = 0; i0 < L.size[0]; ++i0)
    for (int64_t i1 = 0; i1 < L.size[1]; ++i1)
      for (int64_t i2 = 0; i2 < L.size[2]; ++i2) f(offsets(L, n, 0, i0, i1, i2));
}

// f(r, n, c) for each map r = n * C + c of [begin, end), without a division per map.
template <typename F>
NEUROSENS_INLINE inline void for_each_map(const PairLayout& L, int64_t begin, int64_t end, F&& f) {
  int64_t n = begin / L.C, c = begin % L.C;
  for (int64_t r = begin; r < end; ++r) {
    f(r, n, c);
    if (++c == L.C) c = 0, ++n;
  }
}

// f(n, c0, c1) for each sample n with maps in [begin, end), c0 <= c < c1 its neurons there.
template <typename F>
NEUROSENS_INLINE inline void for_each_sample_run(const PairLayout& L, int64_t begin, int64_t end, F&& f) {
  for (int64_t n = begin / L.C; n * L.C < end; ++n)
    f(n, std::max<int64_t>(begin - n * L.C, 0), std::min<int64_t>(end - n * L.C, L.C));
}

// f(o, len) for each run of map (n, c); element i of the run is at o.t[t] + i * L.ss[t][2].
template <typename F>
NEUROSENS_INLINE inline void walk_runs(const PairLayout& L, int64_t n, int64_t c, F&& f) {
  for (int64_t i0 = 0; i0 < L.size[0]; ++i0)
    for (int64_t i1 = 0; i1 < L.size[1]; ++i1) f(offsets(L, n, c, i0, i1, 0), L.size[2]);
}

// Statistics of elements [start, stop) of a run, summed in acc_t. kUnit: stride 1 in a and b.
template <int kMask, bool kUnit, typename scalar_t, typename acc_t>
NEUROSENS_INLINE inline void sums_of_block(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t start, int64_t stop,
                          int64_t sa, int64_t sb, acc_t* s) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5)
  for (int64_t i = start; i < stop; ++i)
    accumulate_pair<kMask, acc_t>(static_cast<acc_t>(a[kUnit ? i : i * sa]), static_cast<acc_t>(b[kUnit ? i : i * sb]),
                                  s0, s1, s2, s3, s4, s5);
  s[kAbsDiff] = s0, s[kSqDiff] = s1, s[kDot] = s2, s[kSqA] = s3, s[kSqB] = s4, s[kAbsA] = s5;
}

// Statistics of one run into `total`, in blocks of kRunBlock elements.
template <int kMask, bool kUnit, typename scalar_t, typename acc_t>
NEUROSENS_INLINE inline void stats_of_run(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t len, int64_t sa,
                         int64_t sb, double* total) {
  for (int64_t start = 0; start < len; start += kRunBlock) {
    acc_t s[kNumStats];
    sums_of_block<kMask, kUnit, scalar_t, acc_t>(a, b, start, std::min(len, start + kRunBlock), sa, sb, s);
    flush_sums<kMask, acc_t>(s, total);
  }
}

// One position of every neuron of a sample; part holds kNumStats rows of C partial sums.
template <int kMask, typename scalar_t, typename acc_t>
NEUROSENS_INLINE inline void stats_of_columns(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t C,
                             acc_t* __restrict__ part) {
  acc_t* __restrict__ s0 = part;
  acc_t* __restrict__ s1 = part + C;
  acc_t* __restrict__ s2 = part + 2 * C;
  acc_t* __restrict__ s3 = part + 3 * C;
  acc_t* __restrict__ s4 = part + 4 * C;
  acc_t* __restrict__ s5 = part + 5 * C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c)
    accumulate_pair<kMask, acc_t>(static_cast<acc_t>(a[c]), static_cast<acc_t>(b[c]), s0[c], s1[c], s2[c], s3[c],
                                  s4[c], s5[c]);
}

// Moves the C partial sums of each statistic in kMask into the double totals (`first`: the
// totals start there).
template <int kMask, typename acc_t>
NEUROSENS_INLINE inline void flush_columns(int64_t C, bool first, acc_t* part, double* total) {
  for (int s = 0; s < kNumStats; ++s) {
    if (!has_stat(kMask, s)) continue;
    for (int64_t c = 0; c < C; ++c) total[s * C + c] = (first ? 0.0 : total[s * C + c]) + part[s * C + c];
    std::fill_n(part + s * C, C, acc_t(0));
  }
}

// The statistics of one map in kMask, from sums `step` apart, as acc_t; the others zero.
template <int kMask, typename sum_t, typename acc_t>
NEUROSENS_INLINE inline void gather_stats(const sum_t* sums, int64_t step, acc_t* st) {
  for (int s = 0; s < kNumStats; ++s) st[s] = has_stat(kMask, s) ? static_cast<acc_t>(sums[s * step]) : acc_t(0);
}

// Short flat maps (float): eight maps at a time. Each map's elements are summed into one 8-lane
// vector, and the eight vectors of a statistic are then summed across lanes together, in three
// rounds of pairwise shuffles, instead of eight horizontal sums each on its own. Above kShortMap
// elements a map's own horizontal sum costs little next to its reads.
constexpr int64_t kShortMap = 64;
using Float8 = float __attribute__((vector_size(32)));

NEUROSENS_INLINE inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Lane g of the result: the sum of the eight lanes of v[g].
NEUROSENS_INLINE inline Float8 lane_sums(const Float8* v) {
  Float8 pairs[4], quads[2];
  for (int i = 0; i < 4; ++i)  // lanes: v[2i] 01, v[2i+1] 01, v[2i] 23, v[2i+1] 23, ...
    pairs[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)  // lanes: v[4i..4i+3] 0123, then the same four 4567
    quads[i] = __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(quads[0], quads[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(quads[0], quads[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// The statistics in kMask of eight maps of D <= kShortMap elements starting at a[g], b[g]: lane g
// of out[s] is statistic s of map g. A tail of under 8 elements is read into zeroed vectors (a
// zero pair adds nothing to any statistic).
template <int kMask>
NEUROSENS_INLINE inline void stats_of_8_maps(const float* const* a, const float* const* b, int64_t D, Float8* out) {
  Float8 lanes[kNumStats][8];
  const int64_t body = D - D % 8;
  for (int g = 0; g < 8; ++g) {
    Float8 s[kNumStats] = {};
    for (int64_t i = 0; i < body; i += 8)
      accumulate_pair<kMask, Float8>(load8(a[g] + i), load8(b[g] + i), s[0], s[1], s[2], s[3], s[4], s[5]);
    if (body < D) {
      Float8 x = {}, y = {};
      std::memcpy(&x, a[g] + body, (D - body) * sizeof(float));
      std::memcpy(&y, b[g] + body, (D - body) * sizeof(float));
      accumulate_pair<kMask, Float8>(x, y, s[0], s[1], s[2], s[3], s[4], s[5]);
    }
    for (int st = 0; st < kNumStats; ++st) lanes[st][g] = s[st];
  }
  for (int st = 0; st < kNumStats; ++st)
    if (has_stat(kMask, st)) out[st] = lane_sums(lanes[st]);
}

// A sink of distances: out(n, c, d) gets each map's distance by kMetric (kRelative: divided by
// the benign map's mean |a|), taken from the statistics kMask.
template <typename acc_t, Metric kMetric, bool kRelative, typename Out>
struct DistanceSink {
  static constexpr int kMask = stats_for(kMetric, kRelative);
  acc_t D;
  Out out;
  NEUROSENS_INLINE void operator()(int64_t n, int64_t c, const acc_t* st) const {
    out(n, c, distance_from_stats<acc_t>(kMetric, st, D, kRelative));
  }
};

// f(sink) with the DistanceSink of metric m (relative) for maps of D elements and out.
template <typename acc_t, typename Out, typename F>
void with_distance_sink(Metric m, bool relative, acc_t D, const Out& out, F&& f) {
  if (relative) {
    if (m == Metric::L1) return f(DistanceSink<acc_t, Metric::L1, true, Out>{D, out});
    if (m == Metric::L2) return f(DistanceSink<acc_t, Metric::L2, true, Out>{D, out});
    TORCH_INTERNAL_ASSERT(false, "relative cosine distances are rejected by parse_distance_metric");
  }
  switch (m) {
    case Metric::L1: return f(DistanceSink<acc_t, Metric::L1, false, Out>{D, out});
    case Metric::L2: return f(DistanceSink<acc_t, Metric::L2, false, Out>{D, out});
    case Metric::Cosine: return f(DistanceSink<acc_t, Metric::Cosine, false, Out>{D, out});
  }
}

// Eight maps' statistics to the sink, map by map: lane g of out[s] is statistic s of map c + g,
// for the first `count` lanes.
template <int kMask, typename Sink>
NEUROSENS_INLINE inline void deliver_each(const Sink& sink, int64_t n, int64_t c, int count, const Float8* out) {
  for (int g = 0; g < count; ++g) {
    float st[kNumStats];
    for (int s = 0; s < kNumStats; ++s) st[s] = has_stat(kMask, s) ? out[s][g] : 0.0f;
    sink(n, c + g, st);
  }
}

template <int kMask, typename Sink>
NEUROSENS_INLINE inline void deliver_8(const Sink& sink, int64_t n, int64_t c, int count, const Float8* out) {
  deliver_each<kMask>(sink, n, c, count, out);
}

// The one statistic an l1 or l2 distance is taken from.
template <Metric kMetric>
constexpr int kDistanceStat = kMetric == Metric::L1 ? kAbsDiff : kSqDiff;

// The l1 or l2 distances of eight maps (lane g: map g) from one vector division (and square
// root), not eight: lane for lane the same IEEE operations as distance_from_stats.
template <Metric kMetric>
NEUROSENS_INLINE inline Float8 distances_of_8(const Float8* out, float D) {
  static_assert(kMetric != Metric::Cosine, "the cosine takes its distances map by map");
  Float8 dist = out[kDistanceStat<kMetric>];
  if constexpr (kMetric == Metric::L2)
    for (int g = 0; g < 8; ++g) dist[g] = std::sqrt(dist[g]);
  return dist / D;
}

// A distance sink takes the l1 and l2 distances of eight maps at once.
template <int kMask, Metric kMetric, bool kRelative, typename Out>
NEUROSENS_INLINE inline void deliver_8(const DistanceSink<float, kMetric, kRelative, Out>& sink, int64_t n, int64_t c,
                                       int count, const Float8* out) {
  if constexpr (kMetric == Metric::Cosine || kRelative) {
    deliver_each<kMask>(sink, n, c, count, out);
  } else {
    const Float8 dist = distances_of_8<kMetric>(out, sink.D);
    for (int g = 0; g < count; ++g) sink.out(n, c + g, dist[g]);
  }
}

// stabilize's sink when one metric both selects and measures (or the neurons are given): each
// map's statistics in kMask go to stats[N, C, kNumStats] (the others zero) and its distance to
// dist[N, C].
template <typename acc_t, Metric kMetric>
struct LossSink {
  static constexpr int kMask = stats_for(kMetric);
  acc_t D;
  int64_t C;
  acc_t* stats;
  acc_t* dist;
  NEUROSENS_INLINE void operator()(int64_t n, int64_t c, const acc_t* st) const {
    acc_t* out = stats + (n * C + c) * kNumStats;
    for (int s = 0; s < kNumStats; ++s) out[s] = has_stat(kMask, s) ? st[s] : acc_t(0);
    dist[n * C + c] = distance_from_stats<acc_t>(kMetric, st, D, false);
  }
};

// Eight statistics rows back to back hold 48 floats, six vectors. Position p of vector j holds
// statistic kStat of map (8j + p) / kNumStats where (8j + p) % kNumStats == kStat: that lane of
// the statistic's vector; every other position is zero (lane 8, of the zero operand).
template <int kStat, int J, int P>
constexpr int row_lane() {
  return (8 * J + P) % kNumStats == kStat ? (8 * J + P) / kNumStats : 8;
}

template <int kStat, int J, int... P>
NEUROSENS_INLINE inline void store_row_vector(float* rows, Float8 v, std::integer_sequence<int, P...>) {
  const Float8 r = __builtin_shufflevector(v, Float8{}, row_lane<kStat, J, P>()...);
  std::memcpy(rows + 8 * J, &r, sizeof r);
}

// The statistics rows of eight maps that keep one statistic (l1, l2), lane g of v that of map g:
// six shuffles and six whole-vector stores.
template <int kStat, int... J>
NEUROSENS_INLINE inline void store_8_rows(float* rows, Float8 v, std::integer_sequence<int, J...>) {
  (store_row_vector<kStat, J>(rows, v, std::make_integer_sequence<int, 8>{}), ...);
}

// Eight maps at a time (l1 and l2, which keep one statistic): a full group's statistics rows are
// six whole vectors, and its distances come from one vector division, as in the DistanceSink.
template <int kMask, Metric kMetric>
NEUROSENS_INLINE inline void deliver_8(const LossSink<float, kMetric>& sink, int64_t n, int64_t c, int count,
                                       const Float8* out) {
  if constexpr (kMetric == Metric::Cosine) {
    deliver_each<kMask>(sink, n, c, count, out);
  } else {
    constexpr int kStat = kDistanceStat<kMetric>;
    static_assert(kMask == stat_bit(static_cast<Stat>(kStat)), "one kept statistic");
    const Float8 dist = distances_of_8<kMetric>(out, sink.D);
    float* rows = sink.stats + (n * sink.C + c) * kNumStats;
    float* d = sink.dist + n * sink.C + c;
    if (count == 8) {
      store_8_rows<kStat>(rows, out[kStat], std::make_integer_sequence<int, kNumStats>{});
      std::memcpy(d, &dist, sizeof dist);
    } else {
      for (int g = 0; g < count; ++g) {
        for (int st = 0; st < kNumStats; ++st) rows[g * kNumStats + st] = st == kStat ? out[kStat][g] : 0.0f;
        d[g] = dist[g];
      }
    }
  }
}

// sink(n, c, st) for the maps [begin, end) of a flat float layout with maps of D <= kShortMap,
// eight neurons of a sample at a time; a last group of fewer repeats its first map in the empty
// slots.
template <int kMask, typename Sink>
NEUROSENS_INLINE inline void short_maps_task(const float* pa, const float* pb, const PairLayout& L, const Sink& sink,
                                             int64_t begin, int64_t end) {
  for_each_sample_run(L, begin, end, [&](int64_t n, int64_t c0, int64_t c1) NEUROSENS_INLINE {
    const float* a = pa + n * L.sn[0];
    const float* b = pb + n * L.sn[1];
    for (int64_t c = c0; c < c1; c += 8) {
      const int count = static_cast<int>(std::min<int64_t>(8, c1 - c));
      const float* ga[8];
      const float* gb[8];
      for (int g = 0; g < 8; ++g) {
        const int64_t cg = c + (g < count ? g : 0);
        ga[g] = a + cg * L.sc[0];
        gb[g] = b + cg * L.sc[1];
      }
      Float8 out[kNumStats];
      stats_of_8_maps<kMask>(ga, gb, L.D, out);
      deliver_8<kMask>(sink, n, c, count, out);
    }
  });
}

// f(std::integral_constant<int, mask>) with the statistics the public ops ask for compiled as their
// own kernels; any other set computes all six and keeps those asked for.
template <typename F>
void dispatch_stats_mask(int stats, F&& f) {
  constexpr int kL1 = stat_bit(kAbsDiff), kL2 = stat_bit(kSqDiff), kRel = stat_bit(kAbsA);
  constexpr int kCos = kCosineStats;
  switch (stats) {
    case kL1: return f(std::integral_constant<int, kL1>());
    case kL2: return f(std::integral_constant<int, kL2>());
    case kCos: return f(std::integral_constant<int, kCos>());
    case kL1 | kRel: return f(std::integral_constant<int, kL1 | kRel>());
    case kL2 | kRel: return f(std::integral_constant<int, kL2 | kRel>());
    case kL1 | kL2: return f(std::integral_constant<int, kL1 | kL2>());
    case kL2 | kCos: return f(std::integral_constant<int, kL2 | kCos>());
    default: return f(std::integral_constant<int, kAllStats>());
  }
}

// The statistics in kMask of each map of the task, handed to sink(n, c, st) (st: kNumStats acc_t).
template <int kMask, typename scalar_t, typename acc_t, typename Sink>
NEUROSENS_CLONES void stats_task(const scalar_t* pa, const scalar_t* pb, const PairLayout& L, const Sink& sink,
                                 int64_t begin, int64_t end) {
  acc_t st[kNumStats];
  if (L.by_columns()) {
    std::vector<acc_t> part(kNumStats * L.C);
    // Sums of blocks exist only for samples of kSumBlock positions or more.
    std::vector<double> total(L.D >= kSumBlock ? kNumStats * L.C : 0);
    for (int64_t n = begin; n < end; ++n) {
      for (int s = 0; s < kNumStats; ++s)
        if (has_stat(kMask, s)) std::fill_n(part.begin() + s * L.C, L.C, acc_t(0));
      int64_t positions = 0;
      walk_columns(L, n, [&](const Offsets& o) NEUROSENS_INLINE {
        stats_of_columns<kMask, scalar_t, acc_t>(pa + o.t[0], pb + o.t[1], L.C, part.data());
        if (++positions % kSumBlock == 0) flush_columns<kMask, acc_t>(L.C, positions == kSumBlock, part.data(), total.data());
      });
      if (positions < kSumBlock) {
        // One block: the partial sums are the sums.
        for (int64_t c = 0; c < L.C; ++c) {
          gather_stats<kMask>(part.data() + c, L.C, st);
          sink(n, c, st);
        }
        continue;
      }
      if (positions % kSumBlock != 0) flush_columns<kMask, acc_t>(L.C, false, part.data(), total.data());
      for (int64_t c = 0; c < L.C; ++c) {
        gather_stats<kMask>(total.data() + c, L.C, st);
        sink(n, c, st);
      }
    }
    return;
  }
  const bool unit = L.ss[0][kMaxSpatial - 1] == 1 && L.ss[1][kMaxSpatial - 1] == 1;
  const bool flat = unit && L.size[0] == 1 && L.size[1] == 1;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (flat && L.D <= kShortMap) return short_maps_task<kMask>(pa, pb, L, sink, begin, end);
  }
  for_each_map(L, begin, end, [&](int64_t, int64_t n, int64_t c) NEUROSENS_INLINE {
    double total[kNumStats] = {};
    if (flat) {
      // One contiguous run per map (NCHW): no walk, and a map of one block needs no double pass.
      const scalar_t* a = pa + n * L.sn[0] + c * L.sc[0];
      const scalar_t* b = pb + n * L.sn[1] + c * L.sc[1];
      if (L.D <= kRunBlock) {
        acc_t s[kNumStats];
        sums_of_block<kMask, true, scalar_t, acc_t>(a, b, 0, L.D, 1, 1, s);
        gather_stats<kMask>(s, 1, st);
      } else {
        stats_of_run<kMask, true, scalar_t, acc_t>(a, b, L.D, 1, 1, total);
        gather_stats<kMask>(total, 1, st);
      }
      sink(n, c, st);
      return;
    }
    walk_runs(L, n, c, [&](const Offsets& o, int64_t len) NEUROSENS_INLINE {
      if (unit)
        stats_of_run<kMask, true, scalar_t, acc_t>(pa + o.t[0], pb + o.t[1], len, 1, 1, total);
      else
        stats_of_run<kMask, false, scalar_t, acc_t>(pa + o.t[0], pb + o.t[1], len, L.ss[0][2], L.ss[1][2], total);
    });
    gather_stats<kMask>(total, 1, st);
    sink(n, c, st);
  });
}

// For each (sample, neuron) of a and b, sink(n, c, st) with the statistics in kMask (the others
// zero), st holding kNumStats acc_t; the sink is called from several threads, once per (n, c).
template <int kMask, typename scalar_t, typename Sink>
void for_each_stats(const at::Tensor& a, const at::Tensor& b, const PairLayout& L, const Sink& sink) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* pa = a.const_data_ptr<scalar_t>();
  const scalar_t* pb = b.const_data_ptr<scalar_t>();
  parallel_tasks(L, [&](int64_t begin, int64_t end) { stats_task<kMask, scalar_t, acc_t>(pa, pb, L, sink, begin, end); });
}

// The same with the statistics in the bit set `stats`.
template <typename scalar_t, typename Sink>
void for_each_stats(const at::Tensor& a, const at::Tensor& b, const PairLayout& L, int stats, const Sink& sink) {
  dispatch_stats_mask(stats, [&](auto mask) { for_each_stats<decltype(mask)::value, scalar_t>(a, b, L, sink); });
}

at::Tensor pair_stats_cpu(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, int64_t stats) {
  const StatsCall call = begin_pair_stats(a, b, channel_dim, stats);
  at::Tensor out = at::empty({call.L.N, call.L.C, kNumStats}, call.acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._pair_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* po = out.mutable_data_ptr<acc_t>();
    const int64_t C = call.L.C;
    const int keep = call.stats;
    for_each_stats<scalar_t>(a, b, call.L, call.stats, [=](int64_t n, int64_t c, const acc_t* st) NEUROSENS_INLINE {
      acc_t* out = po + (n * C + c) * kNumStats;
      for (int s = 0; s < kNumStats; ++s) out[s] = has_stat(keep, s) ? st[s] : acc_t(0);
    });
  });
  return out;
}

// [N, C] distances straight from the statistics, with no [N, C, kNumStats] tensor in between.
at::Tensor distances_cpu(const at::Tensor& a, const at::Tensor& b, const PairLayout& L, Metric m, bool relative) {
  at::Tensor out = at::empty({L.N, L.C}, a.options().dtype(accumulation_dtype(a)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens.distances", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* po = out.mutable_data_ptr<acc_t>();
    const int64_t C = L.C;
    auto store = [=](int64_t n, int64_t c, acc_t d) NEUROSENS_INLINE { po[n * C + c] = d; };
    with_distance_sink(m, relative, static_cast<acc_t>(L.D), store, [&](const auto& sink) {
      for_each_stats<std::decay_t<decltype(sink)>::kMask, scalar_t>(a, b, L, sink);
    });
  });
  return out;
}

// Per-neuron sums over the samples of N x C distances `dist`, summed in double and divided by
// `divisor`, into out[C].
template <typename scalar_t>
void column_sums(const scalar_t* dist, int64_t N, int64_t C, double divisor, scalar_t* out) {
  std::vector<double> total(dist, dist + C);
  for (int64_t n = 1; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) total[c] += dist[n * C + c];
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(total[c] / divisor);
}

at::Tensor batch_sums(const at::Tensor& dist, double divisor) {
  const int64_t N = dist.size(0), C = dist.size(1);
  at::Tensor out = at::empty({C}, dist.options());
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "neurosens.batch_sums", [&] {
    column_sums(dist.const_data_ptr<scalar_t>(), N, C, divisor, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// [C]: each neuron's distances summed over the samples (in sample order, in double, as
// column_sums) and divided by `divisor`. Where maps are walked one at a time, the work is split by
// neurons and each task sums its own, so no [N, C] distances are written and then read back by
// one thread (on small maps that costs more than the distances). Layouts walked by columns, and
// too few neurons to share out, go through [N, C]; both ways give the same bits.
at::Tensor distance_sums(const at::Tensor& a, const at::Tensor& b, const PairLayout& L, Metric m, bool relative,
                         double divisor) {
  if (L.by_columns() || L.C < 4 * at::get_num_threads()) return batch_sums(distances_cpu(a, b, L, m, relative), divisor);
  at::Tensor out = at::empty({L.C}, a.options().dtype(accumulation_dtype(a)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens.distance_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<double> total(L.C, 0.0);
    double* pt = total.data();
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    auto add = [=](int64_t, int64_t c, acc_t d) NEUROSENS_INLINE { pt[c] += d; };
    with_distance_sink(m, relative, static_cast<acc_t>(L.D), add, [&](const auto& sink) {
      constexpr int kMask = std::decay_t<decltype(sink)>::kMask;
      at::parallel_for(0, L.C, std::max<int64_t>(1, kGrainElements / (L.N * L.D)), [&](int64_t c0, int64_t c1) {
        for (int64_t n = 0; n < L.N; ++n)
          stats_task<kMask, scalar_t, acc_t>(pa, pb, L, sink, n * L.C + c0, n * L.C + c1);
      });
    });
    acc_t* po = out.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < L.C; ++c) po[c] = static_cast<acc_t>(total[c] / divisor);
  });
  return out;
}

at::Tensor neuron_distance_per_sample_cpu(const at::Tensor& a, const at::Tensor& b, c10::string_view metric,
                                          int64_t channel_dim, bool relative) {
  const DistanceCall call = begin_distance(a, b, metric, channel_dim, relative, "neurosens.neuron_distance_per_sample");
  return distances_cpu(a, b, call.L, call.metric, relative);
}

at::Tensor neuron_distance_cpu(const at::Tensor& a, const at::Tensor& b, c10::string_view metric, int64_t channel_dim,
                               bool relative) {
  const DistanceCall call = begin_distance(a, b, metric, channel_dim, relative, "neurosens.neuron_distance");
  return distance_sums(a, b, call.L, call.metric, relative, 1.0);
}

// The indices of the k largest (largest=false: smallest) of v[C], sorted, into idx[k], as
// torch.sort orders them (NaN above every number) with the lower index first between equal values.
template <typename scalar_t>
void topk_indices(const scalar_t* v, int64_t C, int64_t k, bool largest, int64_t* idx) {
  std::vector<int64_t> order(C);
  for (int64_t c = 0; c < C; ++c) order[c] = c;
  auto before = [&](int64_t i, int64_t j) {
    const bool nan_i = std::isnan(v[i]), nan_j = std::isnan(v[j]);
    if (nan_i != nan_j) return largest ? nan_i : nan_j;
    if (!nan_i && v[i] != v[j]) return largest ? v[i] > v[j] : v[i] < v[j];
    return i < j;
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), before);
  std::copy_n(order.begin(), k, idx);
}

// The k largest (largest=false: smallest) of `values`, sorted (topk_indices), with their indices.
std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& values, int64_t k, bool largest) {
  at::Tensor top = at::empty({k}, values.options());
  at::Tensor idx = at::empty({k}, values.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "neurosens.topk", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    int64_t* pi = idx.mutable_data_ptr<int64_t>();
    topk_indices(v, values.size(0), k, largest, pi);
    scalar_t* pt = top.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < k; ++i) pt[i] = v[pi[i]];
  });
  return {top, idx};
}

std::tuple<at::Tensor, at::Tensor> neuron_topk_cpu(const at::Tensor& a, const at::Tensor& b, int64_t k,
                                                   c10::string_view metric, int64_t channel_dim, bool relative,
                                                   bool largest) {
  const char* op = "neurosens.neuron_topk";
  const DistanceCall call = begin_distance(a, b, metric, channel_dim, relative, op);
  check_k(k, call.L.C, a, op);
  return topk_cpu(distance_sums(a, b, call.L, call.metric, relative, static_cast<double>(call.L.N)), k, largest);
}

// stabilize in one pass: the statistics the backward needs are written, and each (sample,
// neuron)'s distance by the loss metric (and, when selecting, by the selection metric) taken from
// them as they are summed; the top-k of the selection means and the loss over the selected
// neurons are then sums over those [N, C] distances, in double (as neuron_topk's means).
std::tuple<at::Tensor, at::Tensor, at::Tensor> stabilize_cpu(const at::Tensor& a, const at::Tensor& b,
                                                             const std::optional<at::Tensor>& indices, int64_t k,
                                                             c10::string_view metric, c10::string_view select_metric,
                                                             int64_t channel_dim) {
  const char* op = "neurosens.stabilize";
  const StabilizeArgs args = begin_stabilize(a, b, indices, k, metric, select_metric, channel_dim, op);
  const Metric m = args.metric, sm = args.select_metric;
  const int64_t cdim = args.cdim, C = args.C;
  const bool given = indices.has_value();
  if (given) check_index_range_host(*indices, C, a, op);
  const PairLayout L = make_layout({a, b}, cdim, op);
  const int64_t N = L.N;
  at::Tensor selected = at::empty({k}, a.options().dtype(at::kLong));
  if (given) {
    const auto idx = indices->accessor<int64_t, 1>();
    int64_t* ps = selected.mutable_data_ptr<int64_t>();
    for (int64_t j = 0; j < k; ++j) ps[j] = idx[j];
  }
  const int keep = stats_for(m) | (given ? 0 : stats_for(sm));
  const auto acc = a.options().dtype(accumulation_dtype(a));
  at::Tensor stats = at::empty({N, C, kNumStats}, acc);
  at::Tensor loss = at::empty({}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens.stabilize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t D = static_cast<acc_t>(L.D);
    const bool separate = !given && sm != m;  // the selection needs distances of its own
    std::unique_ptr<acc_t[]> loss_dist(new acc_t[N * C]);
    std::unique_ptr<acc_t[]> select_dist(separate ? new acc_t[N * C] : nullptr);
    acc_t* pl = loss_dist.get();
    acc_t* psel = separate ? select_dist.get() : pl;
    acc_t* pst = stats.mutable_data_ptr<acc_t>();
    if (separate) {
      for_each_stats<scalar_t>(a, b, L, keep, [=](int64_t n, int64_t c, const acc_t* st) NEUROSENS_INLINE {
        acc_t* out = pst + (n * C + c) * kNumStats;
        for (int s = 0; s < kNumStats; ++s) out[s] = has_stat(keep, s) ? st[s] : acc_t(0);
        pl[n * C + c] = distance_from_stats<acc_t>(m, st, D, false);
        psel[n * C + c] = distance_from_stats<acc_t>(sm, st, D, false);
      });
    } else {
      // The common case, with the metric known to the compiler.
      auto run = [&](auto sink) { for_each_stats<decltype(sink)::kMask, scalar_t>(a, b, L, sink); };
      switch (m) {
        case Metric::L1: run(LossSink<acc_t, Metric::L1>{D, C, pst, pl}); break;
        case Metric::L2: run(LossSink<acc_t, Metric::L2>{D, C, pst, pl}); break;
        case Metric::Cosine: run(LossSink<acc_t, Metric::Cosine>{D, C, pst, pl}); break;
      }
    }
    int64_t* ps = selected.mutable_data_ptr<int64_t>();
    if (!given) {
      std::vector<acc_t> means(C);
      column_sums(psel, N, C, static_cast<double>(N), means.data());
      topk_indices(means.data(), C, k, /*largest=*/true, ps);
    }
    double total = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < k; ++j) total += pl[n * C + ps[j]];
    *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total / static_cast<double>(N * k));
  });
  return {loss, selected, stats};
}

// All coefficients of a map are zero (a neuron outside the selection): its gradient is zero.
template <typename acc_t>
NEUROSENS_INLINE inline bool no_gradient(const acc_t* k) {
  bool zero = true;
  for (int i = 0; i < kNumCoefs; ++i) zero = zero && k[i] == acc_t(0);
  return zero;
}

// Gradients of one run with the coefficients k of its map. kUnit: stride 1 in all four tensors;
// kOpposite: opposite_coefficients of the metric, a constant so that the loop vectorizes. The
// gradient loops are functions of their own: inlined into the task they do not vectorize.
template <bool kOpposite, bool kUnit, typename scalar_t, typename acc_t>
NEUROSENS_CLONES void grad_of_run(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t len,
                        const int64_t* stride, const acc_t* k, scalar_t* __restrict__ ga, scalar_t* __restrict__ gb) {
  const acc_t aa = k[kAA], ab = k[kAB], ba = k[kBA], bb = k[kBB], sign = k[kSign];
  const int64_t sa = stride[0], sb = stride[1], sga = stride[2], sgb = stride[3];
  if (no_gradient(k)) {
    // A neuron outside the selection (most of them): its gradient is zero, a and b need no read.
    for (int64_t i = 0; i < len; ++i) {
      ga[kUnit ? i : i * sga] = scalar_t(0);
      gb[kUnit ? i : i * sgb] = scalar_t(0);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    acc_t gx, gy;
    pair_grad<acc_t>(kOpposite, aa, ab, ba, bb, sign, static_cast<acc_t>(a[kUnit ? i : i * sa]),
                     static_cast<acc_t>(b[kUnit ? i : i * sb]), gx, gy);
    ga[kUnit ? i : i * sga] = static_cast<scalar_t>(gx);
    gb[kUnit ? i : i * sgb] = static_cast<scalar_t>(gy);
  }
}

// One position of every neuron of a sample; k holds kNumCoefs rows of C coefficients.
template <bool kOpposite, typename scalar_t, typename acc_t>
NEUROSENS_CLONES void grad_of_columns(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t C,
                            const acc_t* __restrict__ k, scalar_t* __restrict__ ga, scalar_t* __restrict__ gb) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    acc_t gx, gy;
    pair_grad<acc_t>(kOpposite, k[kAA * C + c], k[kAB * C + c], k[kBA * C + c], k[kBB * C + c], k[kSign * C + c],
                     static_cast<acc_t>(a[c]), static_cast<acc_t>(b[c]), gx, gy);
    ga[c] = static_cast<scalar_t>(gx);
    gb[c] = static_cast<scalar_t>(gy);
  }
}

template <bool kOpposite, typename scalar_t, typename acc_t>
NEUROSENS_CLONES void grad_task(const scalar_t* pa, const scalar_t* pb, const acc_t* pst, const acc_t* pw, Metric metric,
                                const PairLayout& L, scalar_t* pga, scalar_t* pgb, int64_t begin, int64_t end) {
  const acc_t D = static_cast<acc_t>(L.D);
  if (L.by_columns()) {
    std::vector<acc_t> coef(kNumCoefs * L.C);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < L.C; ++c) {
        acc_t k[kNumCoefs];
        grad_coefficients<acc_t>(metric, pst + (n * L.C + c) * kNumStats, pw[c], D, k);
        for (int i = 0; i < kNumCoefs; ++i) coef[i * L.C + c] = k[i];
      }
      walk_columns(L, n, [&](const Offsets& o) NEUROSENS_INLINE {
        grad_of_columns<kOpposite, scalar_t, acc_t>(pa + o.t[0], pb + o.t[1], L.C, coef.data(), pga + o.t[2], pgb + o.t[3]);
      });
    }
    return;
  }
  bool unit = true;
  int64_t stride[kMaxTensors];
  for (int t = 0; t < kMaxTensors; ++t) {
    stride[t] = L.ss[t][kMaxSpatial - 1];
    unit = unit && stride[t] == 1;
  }
  if (unit && L.size[0] == 1 && L.size[1] == 1) {
    // One contiguous run per map (NCHW), and most maps are outside the selection: a call per map
    // would cost more than small maps take. Per sample, the gradient maps of the task's neurons
    // are zeroed, in one fill where they lie back to back, and only the neurons with a weight
    // (zero weight, zero coefficients) are visited.
    std::vector<int64_t> weighted;  // ascending
    for (int64_t c = 0; c < L.C; ++c)
      if (pw[c] != acc_t(0)) weighted.push_back(c);
    const bool back_to_back = L.sc[2] == L.D && L.sc[3] == L.D;
    // The weighted maps are scattered, out of reach of the hardware prefetcher: each is fetched
    // (its first kFetchBytes) kAhead maps before its turn, or its reads wait on memory.
    constexpr int64_t kAhead = 4, kLine = 64, kFetchBytes = 256;
    const int64_t fetch = std::min<int64_t>(kFetchBytes, L.D * static_cast<int64_t>(sizeof(scalar_t)));
    for_each_sample_run(L, begin, end, [&](int64_t n, int64_t c0, int64_t c1) NEUROSENS_INLINE {
      const scalar_t* a = pa + n * L.sn[0];
      const scalar_t* b = pb + n * L.sn[1];
      scalar_t* ga = pga + n * L.sn[2];
      scalar_t* gb = pgb + n * L.sn[3];
      if (back_to_back) {
        std::fill_n(ga + c0 * L.D, (c1 - c0) * L.D, scalar_t(0));
        std::fill_n(gb + c0 * L.D, (c1 - c0) * L.D, scalar_t(0));
      } else {
        for (int64_t c = c0; c < c1; ++c) {
          std::fill_n(ga + c * L.sc[2], L.D, scalar_t(0));
          std::fill_n(gb + c * L.sc[3], L.D, scalar_t(0));
        }
      }
      const auto first = std::lower_bound(weighted.begin(), weighted.end(), c0);
      const auto last = std::lower_bound(first, weighted.end(), c1);
      for (auto it = first; it != last; ++it) {
        if (last - it > kAhead) {
          const char* fa = reinterpret_cast<const char*>(a + it[kAhead] * L.sc[0]);
          const char* fb = reinterpret_cast<const char*>(b + it[kAhead] * L.sc[1]);
          for (int64_t byte = 0; byte < fetch; byte += kLine) {
            __builtin_prefetch(fa + byte);
            __builtin_prefetch(fb + byte);
          }
        }
        const int64_t c = *it;
        acc_t k[kNumCoefs];
        grad_coefficients<acc_t>(metric, pst + (n * L.C + c) * kNumStats, pw[c], D, k);
        grad_of_run<kOpposite, true>(a + c * L.sc[0], b + c * L.sc[1], L.D, stride, k, ga + c * L.sc[2], gb + c * L.sc[3]);
      }
    });
    return;
  }
  for_each_map(L, begin, end, [&](int64_t r, int64_t n, int64_t c) NEUROSENS_INLINE {
    acc_t k[kNumCoefs];
    grad_coefficients<acc_t>(metric, pst + r * kNumStats, pw[c], D, k);
    walk_runs(L, n, c, [&](const Offsets& o, int64_t len) NEUROSENS_INLINE {
      if (unit)
        grad_of_run<kOpposite, true>(pa + o.t[0], pb + o.t[1], len, stride, k, pga + o.t[2], pgb + o.t[3]);
      else
        grad_of_run<kOpposite, false>(pa + o.t[0], pb + o.t[1], len, stride, k, pga + o.t[2], pgb + o.t[3]);
    });
  });
}

// The gradient pass of a checked call.
std::tuple<at::Tensor, at::Tensor> grad_pass_cpu(const at::Tensor& a, const at::Tensor& b, const GradCall& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._stabilize_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const acc_t* pst = call.stats.const_data_ptr<acc_t>();
    const acc_t* pw = call.weight.const_data_ptr<acc_t>();
    scalar_t* pga = call.grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* pgb = call.grad_b.mutable_data_ptr<scalar_t>();
    parallel_tasks(call.L, [&](int64_t begin, int64_t end) {
      if (opposite_coefficients(call.metric))
        grad_task<true, scalar_t, acc_t>(pa, pb, pst, pw, call.metric, call.L, pga, pgb, begin, end);
      else
        grad_task<false, scalar_t, acc_t>(pa, pb, pst, pw, call.metric, call.L, pga, pgb, begin, end);
    });
  });
  return {call.grad_a, call.grad_b};
}

std::tuple<at::Tensor, at::Tensor> stabilize_grad_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& stats,
                                                      const at::Tensor& weight, c10::string_view metric,
                                                      int64_t channel_dim) {
  return grad_pass_cpu(a, b, begin_stabilize_grad(a, b, stats, weight, metric, channel_dim));
}

// The backward of stabilize: d loss / d dist(n, c) is grad / (N * k) for each time neuron c is
// listed in `indices` (a neuron listed twice counts twice, as in the forward), zero elsewhere.
std::tuple<at::Tensor, at::Tensor> stabilize_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                          const at::Tensor& b, const at::Tensor& indices,
                                                          const at::Tensor& stats, c10::string_view metric,
                                                          int64_t channel_dim) {
  const char* op = "neurosens._stabilize_backward";
  const int64_t cdim = check_pair(a, b, channel_dim, op);
  const int64_t C = a.size(cdim), k = indices.numel();
  check_indices(indices, k, C, a, op);
  check_index_range_host(indices, C, a, op);
  TORCH_CHECK(grad.numel() == 1, op, ": grad must hold one value (the loss is a scalar), got shape ", shape_str(grad));
  at::Tensor weight = at::empty({C}, a.options().dtype(accumulation_dtype(a)));
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "neurosens._stabilize_backward", [&] {
    using acc_t = scalar_t;
    double g = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "neurosens._stabilize_backward", [&] {
      g = static_cast<double>(*grad.const_data_ptr<scalar_t>());
    });
    // As (grad in acc_t) / (N * k) in acc_t.
    const acc_t unit = static_cast<acc_t>(g) / static_cast<acc_t>(a.size(0) * k);
    acc_t* w = weight.mutable_data_ptr<acc_t>();
    std::fill_n(w, C, acc_t(0));
    const auto idx = indices.accessor<int64_t, 1>();
    for (int64_t j = 0; j < k; ++j) w[idx[j]] += acc_t(1);
    for (int64_t c = 0; c < C; ++c) w[c] *= unit;
  });
  return grad_pass_cpu(a, b, begin_stabilize_grad(a, b, stats, weight, metric, cdim));
}

}  // namespace

TORCH_LIBRARY_IMPL(neurosens, CPU, m) {
  m.impl("_pair_stats", &pair_stats_cpu);
  m.impl("_stabilize_grad", &stabilize_grad_cpu);
  m.impl("neuron_distance", &neuron_distance_cpu);
  m.impl("neuron_distance_per_sample", &neuron_distance_per_sample_cpu);
  m.impl("neuron_topk", &neuron_topk_cpu);
  m.impl("stabilize", &stabilize_cpu);
  m.impl("_stabilize_backward", &stabilize_backward_cpu);
}

}  // namespace neurosens
