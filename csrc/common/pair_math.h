// Element-level math shared by the CPU and CUDA kernels (host and device).
//
// Forward: every metric is derived from six sums per (sample, neuron), so one pass over a and b
// serves them all. Backward: every metric's gradient is a per-(sample, neuron) linear mix of a, b
// and sign(a - b), so one elementwise pass writes both gradients.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

namespace neurosens {

enum class Metric : int { L1 = 0, L2 = 1, Cosine = 2 };

// Floor of |a| * |b| in the cosine; both maps exactly zero count as identical (distance 0).
constexpr double kCosineEps = 1e-8;
// Floor of the benign map's mean |a| when distances are taken relative to it.
constexpr double kRelativeEps = 1e-6;

// Layout of the last dim of the [N, C, kNumStats] statistics tensor.
enum Stat : int {
  kAbsDiff = 0,  // sum |a - b|
  kSqDiff = 1,   // sum (a - b)^2
  kDot = 2,      // sum a * b
  kSqA = 3,      // sum a^2
  kSqB = 4,      // sum b^2
  kAbsA = 5,     // sum |a|
  kNumStats = 6,
};

// Layout of the last dim of the [N, C, kNumCoefs] backward coefficients:
//   grad_a = AA * a + AB * b + SIGN * sign(a - b)
//   grad_b = BA * a + BB * b - SIGN * sign(a - b)
enum Coef : int { kAA = 0, kAB = 1, kBA = 2, kBB = 3, kSign = 4, kNumCoefs = 5 };

// Bit sets of statistics: a kernel may compute only those a metric needs (the others are zero).
constexpr int stat_bit(Stat s) { return 1 << s; }
constexpr bool has_stat(int mask, int s) { return (mask & stat_bit(static_cast<Stat>(s))) != 0; }
constexpr int kAllStats = (1 << kNumStats) - 1;

// The cosine also sums |a| and |a - b|: squares of maps below ~1e-22 (float32) underflow to zero,
// these sums do not, so they alone tell two all-zero maps from a zero and a tiny one.
constexpr int kCosineStats = stat_bit(kDot) | stat_bit(kSqA) | stat_bit(kSqB) | stat_bit(kAbsA) | stat_bit(kAbsDiff);

// Both maps of a (sample, neuron) are exactly zero (their cosine distance is 0), from kCosineStats.
template <typename acc_t>
C10_HOST_DEVICE inline bool both_maps_zero(const acc_t* st) {
  return st[kAbsA] == acc_t(0) && st[kAbsDiff] == acc_t(0);
}

// |v|. For a SIMD vector of floats (the CPU's short-map path) the sign bits are cleared: one
// instruction where compare, negate and select take three. The two differ only for -0 and the
// sign of a NaN, neither of which a sum starting at +0 can show.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t magnitude(acc_t v) {
  if constexpr (std::is_arithmetic_v<acc_t>) {
    return v < acc_t(0) ? -v : v;
  } else {
    using bits_t = decltype(v < v);  // the integer vector of the same lanes
    return reinterpret_cast<acc_t>(reinterpret_cast<bits_t>(v) & 0x7fffffff);
  }
}

// acc_t may also be a SIMD vector type (the CPU's short-map path): acc_t{} is zero in every lane.
template <int kMask, typename acc_t>
C10_HOST_DEVICE inline void accumulate_pair(acc_t x, acc_t y, acc_t& abs_diff, acc_t& sq_diff, acc_t& dot,
                                            acc_t& sq_a, acc_t& sq_b, acc_t& abs_a) {
  const acc_t d = x - y;
  if constexpr (has_stat(kMask, kAbsDiff)) abs_diff += magnitude(d);
  if constexpr (has_stat(kMask, kSqDiff)) sq_diff += d * d;
  if constexpr (has_stat(kMask, kDot)) dot += x * y;
  if constexpr (has_stat(kMask, kSqA)) sq_a += x * x;
  if constexpr (has_stat(kMask, kSqB)) sq_b += y * y;
  if constexpr (has_stat(kMask, kAbsA)) abs_a += magnitude(x);
}

// Terms added into one acc_t partial sum before it is moved into a double total. A float32 sum of
// millions of terms drifts and finally stops growing (2^24 + 1 == 2^24 in float32); blocks keep
// each float32 sum short for one double add per block.
constexpr int kSumBlock = 128;

// Adds the statistics in kMask of `part` into `total` and clears `part`.
template <int kMask, typename acc_t>
C10_HOST_DEVICE inline void flush_sums(acc_t* part, double* total) {
  for (int s = 0; s < kNumStats; ++s) {
    if (has_stat(kMask, s)) total[s] += static_cast<double>(part[s]);
    part[s] = acc_t(0);
  }
}

// The statistics in kMask of a run of pairs, summed in blocks of kSumBlock terms.
template <int kMask, typename acc_t>
struct BlockedSums {
  acc_t part[kNumStats] = {};
  double total[kNumStats] = {};
  int terms = 0;

  C10_HOST_DEVICE void add(acc_t x, acc_t y) {
    accumulate_pair<kMask, acc_t>(x, y, part[kAbsDiff], part[kSqDiff], part[kDot], part[kSqA], part[kSqB], part[kAbsA]);
    if (++terms == kSumBlock) {
      flush_sums<kMask, acc_t>(part, total);
      terms = 0;
    }
  }
  // The totals, with the statistics outside kMask zero.
  C10_HOST_DEVICE void finish() { flush_sums<kMask, acc_t>(part, total); }
};

// x, or `floor` when x is below it; NaN stays NaN (as at::clamp_min).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t at_least(acc_t x, acc_t floor) {
  return x < floor ? floor : x;
}

// The distance of one (sample, neuron) from its statistics, for a map of D elements (relative:
// divided by the map's mean |a|). ops.cpp computes the same over whole tensors.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t distance_from_stats(Metric metric, const acc_t* st, acc_t D, bool relative) {
  acc_t dist = acc_t(0);
  switch (metric) {
    case Metric::L1:
      dist = st[kAbsDiff] / D;
      break;
    case Metric::L2:
      dist = std::sqrt(st[kSqDiff]) / D;
      break;
    case Metric::Cosine: {
      const acc_t cos = st[kDot] / at_least(std::sqrt(st[kSqA]) * std::sqrt(st[kSqB]), static_cast<acc_t>(kCosineEps));
      dist = both_maps_zero(st) ? acc_t(0) : acc_t(1) - cos;
      break;
    }
  }
  return relative ? dist / at_least(st[kAbsA] / D, static_cast<acc_t>(kRelativeEps)) : dist;
}

// k * v, and exactly zero when k is: a neuron outside the selection (all coefficients zero) gets a
// zero gradient even where its maps hold inf or NaN, and the l1 gradient of an infinite map is
// its sign rather than 0 * inf.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t times(acc_t k, acc_t v) {
  return k * (k == acc_t(0) ? acc_t(0) : v);
}

// The gradient mix of one pair of elements x = a, y = b, where the coefficients are opposite
// (l1 and l2: ab = -aa, ba = -bb): aa x + ab y is aa (x - y). Taken as aa x + ab y, each term
// would be about |x| / |x - y| times the result and cancel in float32 (a 0.1% error on maps whose
// two sides differ by 1e-5 of their size).
template <typename acc_t>
C10_HOST_DEVICE inline void pair_grad_opposite(acc_t aa, acc_t bb, acc_t sign, acc_t x, acc_t y, acc_t& gx, acc_t& gy) {
  const acc_t d = x - y;
  const acc_t s = d > acc_t(0) ? sign : (d < acc_t(0) ? -sign : acc_t(0));
  gx = times(aa, d) + s;
  gy = times(bb, -d) - s;
}

// The general mix (cosine), whose terms cancel in exact arithmetic only for one-element maps.
template <typename acc_t>
C10_HOST_DEVICE inline void pair_grad_mixed(acc_t aa, acc_t ab, acc_t ba, acc_t bb, acc_t sign, acc_t x, acc_t y,
                                            acc_t& gx, acc_t& gy) {
  const acc_t d = x - y;
  const acc_t s = d > acc_t(0) ? sign : (d < acc_t(0) ? -sign : acc_t(0));
  gx = times(aa, x) + times(ab, y) + s;
  gy = times(ba, x) + times(bb, y) - s;
}

// Whether every map's backward coefficients under `metric` are opposite (pair_grad_opposite).
C10_HOST_DEVICE constexpr bool opposite_coefficients(Metric metric) { return metric != Metric::Cosine; }

// Either mix, `opposite` being opposite_coefficients of the call's metric: a uniform branch in a
// GPU kernel, a compile-time constant in the CPU loops (which vectorize only without the branch).
template <typename acc_t>
C10_HOST_DEVICE inline void pair_grad(bool opposite, acc_t aa, acc_t ab, acc_t ba, acc_t bb, acc_t sign, acc_t x, acc_t y,
                                      acc_t& gx, acc_t& gy) {
  if (opposite) {
    pair_grad_opposite<acc_t>(aa, bb, sign, x, y, gx, gy);
  } else {
    pair_grad_mixed<acc_t>(aa, ab, ba, bb, sign, x, y, gx, gy);
  }
}

// Backward coefficients of one (sample, neuron) from its statistics, where `w` is d loss / d dist
// (zero for neurons that were not selected) and D the size of the map.
template <typename acc_t>
C10_HOST_DEVICE inline void grad_coefficients(Metric metric, const acc_t* st, acc_t w, acc_t D, acc_t* k) {
  for (int i = 0; i < kNumCoefs; ++i) k[i] = acc_t(0);
  if (w == acc_t(0)) return;
  switch (metric) {
    case Metric::L1:
      k[kSign] = w / D;
      break;
    case Metric::L2: {
      const acc_t norm = std::sqrt(st[kSqDiff]);
      if (norm > acc_t(0)) {
        const acc_t v = w / (D * norm);
        k[kAA] = v;
        k[kAB] = -v;
        k[kBA] = -v;
        k[kBB] = v;
      }
      break;
    }
    case Metric::Cosine: {
      if (both_maps_zero(st)) break;
      const acc_t sq_a = st[kSqA], sq_b = st[kSqB];
      const acc_t prod = std::sqrt(sq_a) * std::sqrt(sq_b);
      const acc_t eps = static_cast<acc_t>(kCosineEps);
      const acc_t denom = prod > eps ? prod : eps;
      const acc_t cos = st[kDot] / denom;
      // Above the floor d(1 - cos)/da = cos a / |a|^2 - b / (|a||b|); below it the floor is a constant.
      if (prod > eps) {
        k[kAA] = w * cos / sq_a;
        k[kBB] = w * cos / sq_b;
      }
      k[kAB] = -w / denom;
      k[kBA] = -w / denom;
      break;
    }
  }
}

}  // namespace neurosens
