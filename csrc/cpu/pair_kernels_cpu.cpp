// CPU kernels: per-(sample, neuron) statistics of a pair of activations, and the elementwise
// gradient pass of the stabilizing loss. Both read each input element exactly once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/metric.h"
#include "common/pair_layout.h"
#include "common/pair_math.h"

// An AVX2/FMA clone of each hot loop next to the baseline one, picked when the library loads.
#if defined(NEUROSENS_X86_CLONES)
#define NEUROSENS_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NEUROSENS_CLONES
#endif

namespace neurosens {
namespace {

// Enough elements per task that scheduling costs nothing next to the memory traffic.
constexpr int64_t kGrainElements = 1 << 15;

// `rows` consecutive neuron maps of `len` contiguous elements, `a_step`/`b_step` apart.
template <int kMask, typename scalar_t, typename acc_t>
NEUROSENS_CLONES void stats_of_rows(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t rows,
                                    int64_t len, int64_t a_step, int64_t b_step, acc_t* __restrict__ out) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict__ ra = a + r * a_step;
    const scalar_t* __restrict__ rb = b + r * b_step;
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5)
    for (int64_t i = 0; i < len; ++i)
      accumulate_pair<kMask, acc_t>(static_cast<acc_t>(ra[i]), static_cast<acc_t>(rb[i]), s0, s1, s2, s3, s4, s5);
    acc_t* o = out + r * kNumStats;
    o[kAbsDiff] += s0;
    o[kSqDiff] += s1;
    o[kDot] += s2;
    o[kSqA] += s3;
    o[kSqB] += s4;
    o[kAbsA] += s5;
  }
}

// One spatial position of every neuron of one sample; acc holds kNumStats rows of C sums.
template <int kMask, typename scalar_t, typename acc_t>
NEUROSENS_CLONES void stats_of_columns(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t C,
                                       acc_t* __restrict__ acc) {
  acc_t* __restrict__ s0 = acc;
  acc_t* __restrict__ s1 = acc + C;
  acc_t* __restrict__ s2 = acc + 2 * C;
  acc_t* __restrict__ s3 = acc + 3 * C;
  acc_t* __restrict__ s4 = acc + 4 * C;
  acc_t* __restrict__ s5 = acc + 5 * C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c)
    accumulate_pair<kMask, acc_t>(static_cast<acc_t>(a[c]), static_cast<acc_t>(b[c]), s0[c], s1[c], s2[c], s3[c],
                                  s4[c], s5[c]);
}

template <typename scalar_t, typename acc_t>
NEUROSENS_CLONES void grad_of_run(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t len,
                                  const acc_t* __restrict__ coef, scalar_t* __restrict__ ga,
                                  scalar_t* __restrict__ gb) {
  const acc_t aa = coef[kAA], ab = coef[kAB], ba = coef[kBA], bb = coef[kBB], sign = coef[kSign];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    acc_t gx, gy;
    pair_grad<acc_t>(aa, ab, ba, bb, sign, static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), gx, gy);
    ga[i] = static_cast<scalar_t>(gx);
    gb[i] = static_cast<scalar_t>(gy);
  }
}

// One spatial position of every neuron of one sample; coef holds kNumCoefs rows of C values.
template <typename scalar_t, typename acc_t>
NEUROSENS_CLONES void grad_of_columns(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t C,
                                      const acc_t* __restrict__ coef, scalar_t* __restrict__ ga,
                                      scalar_t* __restrict__ gb) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    acc_t gx, gy;
    pair_grad<acc_t>(coef[kAA * C + c], coef[kAB * C + c], coef[kBA * C + c], coef[kBB * C + c],
                     coef[kSign * C + c], static_cast<acc_t>(a[c]), static_cast<acc_t>(b[c]), gx, gy);
    ga[c] = static_cast<scalar_t>(gx);
    gb[c] = static_cast<scalar_t>(gy);
  }
}

inline int64_t offset(const PairLayout& L, int t, int64_t n, int64_t c, int64_t i0, int64_t i1, int64_t i2) {
  return n * L.sn[t] + c * L.sc[t] + i0 * L.ss[t][0] + i1 * L.ss[t][1] + i2 * L.ss[t][2];
}

template <int kMask, typename scalar_t, typename acc_t>
void pair_stats_impl(const scalar_t* pa, const scalar_t* pb, const PairLayout& L, acc_t* po) {
  if (L.channels_contiguous() && !L.rows_contiguous()) {
    // Neurons adjacent in memory: walk the map position by position, all neurons at once.
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (L.C * L.D));
    at::parallel_for(0, L.N, grain, [&](int64_t begin, int64_t end) {
      // Only the statistics in kMask are summed and copied out; the others stay zero in po.
      std::vector<acc_t> acc(kNumStats * L.C);
      for (int64_t n = begin; n < end; ++n) {
        for (int s = 0; s < kNumStats; ++s)
          if (has_stat(kMask, s)) std::fill_n(acc.begin() + s * L.C, L.C, acc_t(0));
        for (int64_t i0 = 0; i0 < L.size[0]; ++i0)
          for (int64_t i1 = 0; i1 < L.size[1]; ++i1)
            for (int64_t i2 = 0; i2 < L.size[2]; ++i2)
              stats_of_columns<kMask, scalar_t, acc_t>(pa + offset(L, 0, n, 0, i0, i1, i2),
                                                       pb + offset(L, 1, n, 0, i0, i1, i2), L.C, acc.data());
        for (int s = 0; s < kNumStats; ++s) {
          if (!has_stat(kMask, s)) continue;
          for (int64_t c = 0; c < L.C; ++c) po[(n * L.C + c) * kNumStats + s] = acc[s * L.C + c];
        }
      }
    });
    return;
  }

  const bool contiguous_runs = L.rows_contiguous();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / L.D);
  at::parallel_for(0, L.N * L.C, grain, [&](int64_t begin, int64_t end) {
    int64_t r = begin;
    while (r < end) {
      const int64_t n = r / L.C, c = r % L.C;
      acc_t* out_r = po + r * kNumStats;
      if (contiguous_runs && L.size[0] == 1 && L.size[1] == 1) {
        // Each map is one contiguous run: take the rest of this sample's neurons in one call.
        const int64_t rows = std::min(end - r, L.C - c);
        stats_of_rows<kMask, scalar_t, acc_t>(pa + offset(L, 0, n, c, 0, 0, 0), pb + offset(L, 1, n, c, 0, 0, 0), rows,
                                              L.size[2], L.sc[0], L.sc[1], out_r);
        r += rows;
        continue;
      }
      for (int64_t i0 = 0; i0 < L.size[0]; ++i0) {
        for (int64_t i1 = 0; i1 < L.size[1]; ++i1) {
          const scalar_t* ra = pa + offset(L, 0, n, c, i0, i1, 0);
          const scalar_t* rb = pb + offset(L, 1, n, c, i0, i1, 0);
          if (contiguous_runs) {
            stats_of_rows<kMask, scalar_t, acc_t>(ra, rb, 1, L.size[2], 0, 0, out_r);
            continue;
          }
          for (int64_t i2 = 0; i2 < L.size[2]; ++i2)
            accumulate_pair<kMask, acc_t>(static_cast<acc_t>(ra[i2 * L.ss[0][2]]),
                                          static_cast<acc_t>(rb[i2 * L.ss[1][2]]), out_r[kAbsDiff], out_r[kSqDiff],
                                          out_r[kDot], out_r[kSqA], out_r[kSqB], out_r[kAbsA]);
        }
      }
      ++r;
    }
  });
}

at::Tensor pair_stats_cpu(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, int64_t stats) {
  const int64_t cdim = check_pair(a, b, channel_dim, "neurosens._pair_stats");
  TORCH_CHECK_VALUE(stats > 0 && stats <= kAllStats, "neurosens._pair_stats: stats=", stats,
                    " must be a non-empty bit set of the ", kNumStats, " statistics");
  const PairLayout L = make_layout({a, b}, cdim, "neurosens._pair_stats");
  const auto acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({L.N, L.C, kNumStats}, a.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._pair_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    acc_t* po = out.mutable_data_ptr<acc_t>();
    // The sets the public ops ask for; any other set computes everything.
    constexpr int kL1 = stat_bit(kAbsDiff), kL2 = stat_bit(kSqDiff), kRel = stat_bit(kAbsA);
    constexpr int kCos = stat_bit(kDot) | stat_bit(kSqA) | stat_bit(kSqB);
    switch (stats) {
      case kL1: pair_stats_impl<kL1>(pa, pb, L, po); break;
      case kL2: pair_stats_impl<kL2>(pa, pb, L, po); break;
      case kCos: pair_stats_impl<kCos>(pa, pb, L, po); break;
      case kL1 | kRel: pair_stats_impl<kL1 | kRel>(pa, pb, L, po); break;
      case kL2 | kRel: pair_stats_impl<kL2 | kRel>(pa, pb, L, po); break;
      case kL1 | kL2: pair_stats_impl<kL1 | kL2>(pa, pb, L, po); break;
      case kL1 | kCos: pair_stats_impl<kL1 | kCos>(pa, pb, L, po); break;
      case kL2 | kCos: pair_stats_impl<kL2 | kCos>(pa, pb, L, po); break;
      default: pair_stats_impl<kAllStats>(pa, pb, L, po); break;
    }
  });
  return out;
}

template <typename scalar_t, typename acc_t>
void stabilize_grad_impl(const scalar_t* pa, const scalar_t* pb, const acc_t* pst, const acc_t* pw, Metric metric,
                         const PairLayout& L, scalar_t* pga, scalar_t* pgb) {
  const acc_t D = static_cast<acc_t>(L.D);
  if (L.channels_contiguous() && !L.rows_contiguous()) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (L.C * L.D));
    at::parallel_for(0, L.N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> coef(kNumCoefs * L.C);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t c = 0; c < L.C; ++c) {
          acc_t k[kNumCoefs];
          grad_coefficients<acc_t>(metric, pst + (n * L.C + c) * kNumStats, pw[c], D, k);
          for (int i = 0; i < kNumCoefs; ++i) coef[i * L.C + c] = k[i];
        }
        for (int64_t i0 = 0; i0 < L.size[0]; ++i0)
          for (int64_t i1 = 0; i1 < L.size[1]; ++i1)
            for (int64_t i2 = 0; i2 < L.size[2]; ++i2)
              grad_of_columns<scalar_t, acc_t>(pa + offset(L, 0, n, 0, i0, i1, i2), pb + offset(L, 1, n, 0, i0, i1, i2),
                                               L.C, coef.data(), pga + offset(L, 2, n, 0, i0, i1, i2),
                                               pgb + offset(L, 3, n, 0, i0, i1, i2));
      }
    });
    return;
  }
  const bool contiguous_runs = L.rows_contiguous();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / L.D);
  at::parallel_for(0, L.N * L.C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / L.C, c = r % L.C;
      acc_t k[kNumCoefs];
      grad_coefficients<acc_t>(metric, pst + r * kNumStats, pw[c], D, k);
      for (int64_t i0 = 0; i0 < L.size[0]; ++i0) {
        for (int64_t i1 = 0; i1 < L.size[1]; ++i1) {
          const int64_t oa = offset(L, 0, n, c, i0, i1, 0), ob = offset(L, 1, n, c, i0, i1, 0);
          const int64_t oga = offset(L, 2, n, c, i0, i1, 0), ogb = offset(L, 3, n, c, i0, i1, 0);
          if (contiguous_runs) {
            grad_of_run<scalar_t, acc_t>(pa + oa, pb + ob, L.size[2], k, pga + oga, pgb + ogb);
            continue;
          }
          for (int64_t i2 = 0; i2 < L.size[2]; ++i2) {
            acc_t gx, gy;
            pair_grad<acc_t>(k[kAA], k[kAB], k[kBA], k[kBB], k[kSign], static_cast<acc_t>(pa[oa + i2 * L.ss[0][2]]),
                             static_cast<acc_t>(pb[ob + i2 * L.ss[1][2]]), gx, gy);
            pga[oga + i2 * L.ss[2][2]] = static_cast<scalar_t>(gx);
            pgb[ogb + i2 * L.ss[3][2]] = static_cast<scalar_t>(gy);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> stabilize_grad_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& stats,
                                                      const at::Tensor& weight, c10::string_view metric,
                                                      int64_t channel_dim) {
  const char* op = "neurosens._stabilize_grad";
  const int64_t cdim = check_pair(a, b, channel_dim, op);
  check_grad_inputs(a, stats, weight, cdim, op);
  const Metric m = parse_metric(std::string(metric), op, "metric");
  at::Tensor grad_a = at::empty_like(a);
  at::Tensor grad_b = at::empty_like(b);
  const at::Tensor st = stats.contiguous(), w = weight.contiguous();
  const PairLayout L = make_layout({a, b, grad_a, grad_b}, cdim, op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._stabilize_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stabilize_grad_impl<scalar_t, acc_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                         st.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), m, L,
                                         grad_a.mutable_data_ptr<scalar_t>(), grad_b.mutable_data_ptr<scalar_t>());
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurosens, CPU, m) {
  m.impl("_pair_stats", &pair_stats_cpu);
  m.impl("_stabilize_grad", &stabilize_grad_cpu);
}

}  // namespace neurosens
