// CPU kernels: per-(sample, neuron) statistics of a pair of activations, and the elementwise
// gradient pass of the stabilizing loss. Both read each input element exactly once.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

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

template <typename scalar_t, typename acc_t>
NEUROSENS_CLONES void stats_of_run(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t len,
                                   acc_t* __restrict__ out) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5)
  for (int64_t i = 0; i < len; ++i)
    accumulate_pair<acc_t>(static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), s0, s1, s2, s3, s4, s5);
  out[kAbsDiff] += s0;
  out[kSqDiff] += s1;
  out[kDot] += s2;
  out[kSqA] += s3;
  out[kSqB] += s4;
  out[kAbsA] += s5;
}

// One spatial position of every neuron of one sample; acc holds kNumStats rows of C sums.
template <typename scalar_t, typename acc_t>
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
    accumulate_pair<acc_t>(static_cast<acc_t>(a[c]), static_cast<acc_t>(b[c]), s0[c], s1[c], s2[c], s3[c], s4[c],
                           s5[c]);
}

template <typename scalar_t, typename acc_t>
NEUROSENS_CLONES void grad_of_run(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t len,
                                  const acc_t* __restrict__ coef, scalar_t* __restrict__ ga,
                                  scalar_t* __restrict__ gb) {
  const acc_t k[kNumCoefs] = {coef[0], coef[1], coef[2], coef[3], coef[4]};
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    acc_t gx, gy;
    pair_grad<acc_t>(k, static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), gx, gy);
    ga[i] = static_cast<scalar_t>(gx);
    gb[i] = static_cast<scalar_t>(gy);
  }
}

// Calls fn(i0, i1) for the outer spatial indices of the layout (the innermost dim is the run).
template <typename Fn>
inline void for_outer(const PairLayout& L, const Fn& fn) {
  for (int64_t i0 = 0; i0 < L.size[0]; ++i0)
    for (int64_t i1 = 0; i1 < L.size[1]; ++i1) fn(i0, i1);
}

inline int64_t offset(const PairLayout& L, int t, int64_t n, int64_t c, int64_t i0, int64_t i1, int64_t i2) {
  return n * L.sn[t] + c * L.sc[t] + i0 * L.ss[t][0] + i1 * L.ss[t][1] + i2 * L.ss[t][2];
}

at::Tensor pair_stats_cpu(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim) {
  const int64_t cdim = check_pair(a, b, channel_dim, "neurosens._pair_stats");
  const PairLayout L = make_layout({a, b}, cdim, "neurosens._pair_stats");
  const auto acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({L.N, L.C, kNumStats}, a.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._pair_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    acc_t* po = out.mutable_data_ptr<acc_t>();

    if (L.channels_contiguous() && !L.rows_contiguous()) {
      // Neurons adjacent in memory: walk the map position by position, all neurons at once.
      const int64_t grain = std::max<int64_t>(1, kGrainElements / (L.C * L.D));
      at::parallel_for(0, L.N, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(kNumStats * L.C);
        for (int64_t n = begin; n < end; ++n) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for_outer(L, [&](int64_t i0, int64_t i1) {
            for (int64_t i2 = 0; i2 < L.size[2]; ++i2)
              stats_of_columns<scalar_t, acc_t>(pa + offset(L, 0, n, 0, i0, i1, i2), pb + offset(L, 1, n, 0, i0, i1, i2),
                                                L.C, acc.data());
          });
          for (int64_t c = 0; c < L.C; ++c)
            for (int s = 0; s < kNumStats; ++s) po[(n * L.C + c) * kNumStats + s] = acc[s * L.C + c];
        }
      });
      return;
    }

    const bool contiguous_runs = L.rows_contiguous();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / L.D);
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / L.C, c = r % L.C;
        acc_t* out_r = po + r * kNumStats;
        for_outer(L, [&](int64_t i0, int64_t i1) {
          const scalar_t* ra = pa + offset(L, 0, n, c, i0, i1, 0);
          const scalar_t* rb = pb + offset(L, 1, n, c, i0, i1, 0);
          if (contiguous_runs) {
            stats_of_run<scalar_t, acc_t>(ra, rb, L.size[2], out_r);
            return;
          }
          for (int64_t i2 = 0; i2 < L.size[2]; ++i2)
            accumulate_pair<acc_t>(static_cast<acc_t>(ra[i2 * L.ss[0][2]]), static_cast<acc_t>(rb[i2 * L.ss[1][2]]),
                                   out_r[kAbsDiff], out_r[kSqDiff], out_r[kDot], out_r[kSqA], out_r[kSqB],
                                   out_r[kAbsA]);
        });
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_grad_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef,
                                                 int64_t channel_dim) {
  const int64_t cdim = check_pair(a, b, channel_dim, "neurosens._pair_grad");
  const auto acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coef.dim() == 3 && coef.size(0) == a.size(0) && coef.size(1) == a.size(cdim) &&
                  coef.size(2) == kNumCoefs && coef.scalar_type() == acc_dtype && coef.device() == a.device(),
              "neurosens._pair_grad: coef must be a ", acc_dtype, " tensor of shape [", a.size(0), ", ",
              a.size(cdim), ", ", kNumCoefs, "] on ", a.device(), ", got ", coef.scalar_type(), " ",
              shape_str(coef), " on ", coef.device());
  at::Tensor grad_a = at::empty_like(a);
  at::Tensor grad_b = at::empty_like(b);
  const at::Tensor k = coef.contiguous();
  const PairLayout L = make_layout({a, b, grad_a, grad_b}, cdim, "neurosens._pair_grad");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._pair_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* pga = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* pgb = grad_b.mutable_data_ptr<scalar_t>();
    const acc_t* pk = k.const_data_ptr<acc_t>();
    const bool contiguous_runs = L.rows_contiguous();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / L.D);
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / L.C, c = r % L.C;
        const acc_t* kr = pk + r * kNumCoefs;
        for_outer(L, [&](int64_t i0, int64_t i1) {
          const int64_t oa = offset(L, 0, n, c, i0, i1, 0), ob = offset(L, 1, n, c, i0, i1, 0);
          const int64_t oga = offset(L, 2, n, c, i0, i1, 0), ogb = offset(L, 3, n, c, i0, i1, 0);
          if (contiguous_runs) {
            grad_of_run<scalar_t, acc_t>(pa + oa, pb + ob, L.size[2], kr, pga + oga, pgb + ogb);
            return;
          }
          for (int64_t i2 = 0; i2 < L.size[2]; ++i2) {
            acc_t gx, gy;
            pair_grad<acc_t>(kr, static_cast<acc_t>(pa[oa + i2 * L.ss[0][2]]), static_cast<acc_t>(pb[ob + i2 * L.ss[1][2]]),
                             gx, gy);
            pga[oga + i2 * L.ss[2][2]] = static_cast<scalar_t>(gx);
            pgb[ogb + i2 * L.ss[3][2]] = static_cast<scalar_t>(gy);
          }
        });
      }
    });
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurosens, CPU, m) {
  m.impl("_pair_stats", &pair_stats_cpu);
  m.impl("_pair_grad", &pair_grad_cpu);
}

}  // namespace neurosens
