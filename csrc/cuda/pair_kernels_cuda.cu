// CUDA kernels: per-(sample, neuron) statistics of a pair of activations, and the elementwise
// gradient pass of the stabilizing loss. Each reads every input element exactly once.
//
// Statistics use one of two mappings, by layout:
//  * rows:    a warp per (sample, neuron) map, lanes striding along it (NCHW and generic strides);
//  * columns: a thread per (sample, neuron), neighbouring threads on neighbouring neurons, so
//             loads coalesce when neurons are adjacent in memory (NHWC, [N, C], [N, T, C]).
// Either may split each map into segments to keep enough loads in flight; segments write
// partial sums that are added in a fixed order, so results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/metric.h"
#include "common/pair_layout.h"
#include "common/pair_math.h"

namespace neurosens {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Offset of spatial element j (row-major over the merged spatial dims) in tensor t.
__device__ __forceinline__ int64_t spatial_offset(const PairLayout& L, int t, int64_t j) {
  const int64_t i2 = j % L.size[2];
  j /= L.size[2];
  const int64_t i1 = j % L.size[1];
  const int64_t i0 = j / L.size[1];
  return i0 * L.ss[t][0] + i1 * L.ss[t][1] + i2 * L.ss[t][2];
}

template <typename acc_t>
struct Sums {
  acc_t v[kNumStats] = {};
  __device__ __forceinline__ void add(acc_t x, acc_t y) { accumulate_pair<kAllStats, acc_t>(x, y, v[0], v[1], v[2], v[3], v[4], v[5]); }
  __device__ __forceinline__ void store(acc_t* out) const {
#pragma unroll
    for (int s = 0; s < kNumStats; ++s) out[s] = v[s];
  }
};

// Spatial elements [begin, end) of segment `seg` when a map of D elements is cut into `segs`.
__device__ __forceinline__ void segment_bounds(int64_t D, int64_t segs, int64_t seg, int64_t& begin, int64_t& end) {
  const int64_t len = (D + segs - 1) / segs;
  begin = seg * len;
  end = begin + len < D ? begin + len : D;
}

// A warp per (sample, neuron, segment). `flat` means the map is one stride-1 run in a and b.
template <typename scalar_t, typename acc_t, bool flat>
__global__ void stats_rows_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, PairLayout L,
                                  int64_t segs, acc_t* __restrict__ partial) {
  const int64_t rows = L.N * L.C;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t warp = blockIdx.x * warps_per_block + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t seg = blockIdx.y;
  if (warp >= rows) return;
  const int64_t n = warp / L.C, c = warp % L.C;
  const scalar_t* ra = a + n * L.sn[0] + c * L.sc[0];
  const scalar_t* rb = b + n * L.sn[1] + c * L.sc[1];
  int64_t begin, end;
  segment_bounds(L.D, segs, seg, begin, end);
  Sums<acc_t> s;
  for (int64_t j = begin + lane; j < end; j += kWarp) {
    if (flat) {
      s.add(static_cast<acc_t>(ra[j]), static_cast<acc_t>(rb[j]));
    } else {
      s.add(static_cast<acc_t>(ra[spatial_offset(L, 0, j)]), static_cast<acc_t>(rb[spatial_offset(L, 1, j)]));
    }
  }
#pragma unroll
  for (int k = 0; k < kNumStats; ++k)
    for (int offset = kWarp / 2; offset > 0; offset /= 2) s.v[k] += __shfl_down_sync(0xffffffff, s.v[k], offset);
  if (lane == 0) s.store(partial + (seg * rows + warp) * kNumStats);
}

// A thread per (sample, neuron, segment); neurons along x so loads coalesce.
template <typename scalar_t, typename acc_t>
__global__ void stats_columns_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, PairLayout L,
                                     int64_t segs, acc_t* __restrict__ partial) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = blockIdx.y;
  const int64_t seg = blockIdx.z;
  if (c >= L.C) return;
  const scalar_t* ra = a + n * L.sn[0] + c * L.sc[0];
  const scalar_t* rb = b + n * L.sn[1] + c * L.sc[1];
  int64_t begin, end;
  segment_bounds(L.D, segs, seg, begin, end);
  Sums<acc_t> s;
  for (int64_t j = begin; j < end; ++j)
    s.add(static_cast<acc_t>(ra[spatial_offset(L, 0, j)]), static_cast<acc_t>(rb[spatial_offset(L, 1, j)]));
  s.store(partial + ((seg * L.N + n) * L.C + c) * kNumStats);
}

int64_t multiprocessors(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count;
}

// Segments per map so that about `target` workers are busy, each with at least `min_len` elements.
int64_t choose_segments(int64_t workers, int64_t D, int64_t target, int64_t min_len) {
  const int64_t want = (target + workers - 1) / workers;
  const int64_t most = std::max<int64_t>(1, D / min_len);
  return std::max<int64_t>(1, std::min<int64_t>({want, most, 65535}));
}

// Computes every statistic whatever `stats` asks: on a GPU the pass is bound by memory, not math.
at::Tensor pair_stats_cuda(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, int64_t stats) {
  const int64_t cdim = check_pair(a, b, channel_dim, "neurosens._pair_stats");
  TORCH_CHECK_VALUE(stats > 0 && stats <= kAllStats, "neurosens._pair_stats: stats=", stats,
                    " must be a non-empty bit set of the ", kNumStats, " statistics");
  const PairLayout L = make_layout({a, b}, cdim, "neurosens._pair_stats");
  const c10::cuda::CUDAGuard guard(a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t sms = multiprocessors(a.device());
  const bool columns = L.channels_contiguous() && !L.rows_contiguous();
  const bool flat = L.rows_contiguous() && L.size[0] == 1 && L.size[1] == 1;
  const int64_t rows = L.N * L.C;

  int64_t segs;
  if (columns) {
    segs = choose_segments(rows, L.D, sms * 2048, 8);
  } else {
    segs = choose_segments(rows, L.D, sms * 64, 4 * kWarp);
  }
  TORCH_CHECK(L.N <= 65535 || !columns, "neurosens._pair_stats: batches over 65535 samples need the NCHW layout");
  at::Tensor partial = at::empty({segs, L.N, L.C, kNumStats}, a.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._pair_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    if (columns) {
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, ((L.C + kWarp - 1) / kWarp) * kWarp));
      const dim3 grid(static_cast<unsigned>((L.C + threads - 1) / threads), static_cast<unsigned>(L.N),
                      static_cast<unsigned>(segs));
      stats_columns_kernel<scalar_t, acc_t><<<grid, threads, 0, stream>>>(pa, pb, L, segs, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t warps_per_block = kThreads / kWarp;
      const int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
      TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "neurosens._pair_stats: too many neurons (",
                  rows, " sample-neuron pairs)");
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(segs));
      if (flat) {
        stats_rows_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(pa, pb, L, segs, pp);
      } else {
        stats_rows_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(pa, pb, L, segs, pp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return segs == 1 ? partial.squeeze(0) : partial.sum(0);
}

// A thread per (sample, neuron): the backward coefficients from the saved statistics.
template <typename acc_t>
__global__ void coefficients_kernel(const acc_t* __restrict__ stats, const acc_t* __restrict__ weight, int64_t N,
                                    int64_t C, int64_t D, Metric metric, acc_t* __restrict__ coef) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= N * C) return;
  grad_coefficients<acc_t>(metric, stats + r * kNumStats, weight[r % C], static_cast<acc_t>(D), coef + r * kNumCoefs);
}

// A thread per element; `channels_inner` orders elements as (n, j, c), else (n, c, j), so that
// consecutive threads touch consecutive addresses in the common layouts.
template <typename scalar_t, typename acc_t, bool channels_inner>
__global__ void grad_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                            const acc_t* __restrict__ coef, PairLayout L, scalar_t* __restrict__ ga,
                            scalar_t* __restrict__ gb) {
  const int64_t total = L.N * L.C * L.D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    int64_t n, c, j;
    if (channels_inner) {
      c = e % L.C;
      j = (e / L.C) % L.D;
      n = e / (L.C * L.D);
    } else {
      j = e % L.D;
      c = (e / L.D) % L.C;
      n = e / (L.D * L.C);
    }
    const acc_t* k = coef + (n * L.C + c) * kNumCoefs;
    acc_t gx, gy;
    pair_grad<acc_t>(k[kAA], k[kAB], k[kBA], k[kBB], k[kSign],
                     static_cast<acc_t>(a[n * L.sn[0] + c * L.sc[0] + spatial_offset(L, 0, j)]),
                     static_cast<acc_t>(b[n * L.sn[1] + c * L.sc[1] + spatial_offset(L, 1, j)]), gx, gy);
    ga[n * L.sn[2] + c * L.sc[2] + spatial_offset(L, 2, j)] = static_cast<scalar_t>(gx);
    gb[n * L.sn[3] + c * L.sc[3] + spatial_offset(L, 3, j)] = static_cast<scalar_t>(gy);
  }
}

std::tuple<at::Tensor, at::Tensor> stabilize_grad_cuda(const at::Tensor& a, const at::Tensor& b,
                                                       const at::Tensor& stats, const at::Tensor& weight,
                                                       c10::string_view metric, int64_t channel_dim) {
  const char* op = "neurosens._stabilize_grad";
  const int64_t cdim = check_pair(a, b, channel_dim, op);
  check_grad_inputs(a, stats, weight, cdim, op);
  const Metric m = parse_metric(std::string(metric), op, "metric");
  const c10::cuda::CUDAGuard guard(a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_a = at::empty_like(a);
  at::Tensor grad_b = at::empty_like(b);
  const at::Tensor st = stats.contiguous(), w = weight.contiguous();
  at::Tensor coef = at::empty({a.size(0), a.size(cdim), kNumCoefs}, stats.options());
  const PairLayout L = make_layout({a, b, grad_a, grad_b}, cdim, op);
  const bool channels_inner = L.channels_contiguous() && !L.rows_contiguous();
  const int64_t total = L.N * L.C * L.D;
  const int64_t sms = multiprocessors(a.device());
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, sms * 32));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._stabilize_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const int64_t rows = L.N * L.C;
    coefficients_kernel<acc_t><<<static_cast<unsigned>((rows + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        st.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), L.N, L.C, L.D, m, coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const acc_t* pk = coef.const_data_ptr<acc_t>();
    scalar_t* pga = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* pgb = grad_b.mutable_data_ptr<scalar_t>();
    if (channels_inner) {
      grad_kernel<scalar_t, acc_t, true><<<blocks, kThreads, 0, stream>>>(pa, pb, pk, L, pga, pgb);
    } else {
      grad_kernel<scalar_t, acc_t, false><<<blocks, kThreads, 0, stream>>>(pa, pb, pk, L, pga, pgb);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurosens, CUDA, m) {
  m.impl("_pair_stats", &pair_stats_cuda);
  m.impl("_stabilize_grad", &stabilize_grad_cuda);
}

}  // namespace neurosens
