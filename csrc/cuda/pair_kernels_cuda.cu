// CUDA kernels: per-(sample, neuron) statistics of a pair of activations, and the elementwise
// gradient pass of the stabilizing loss. Each reads every input element exactly once.
//
// Statistics use one of two mappings, by layout:
//  * rows:    a warp per (sample, neuron) map, lanes striding along it (NCHW and generic strides);
//  * columns: a thread per (sample, neuron), neighbouring threads on neighbouring neurons, so
//             loads coalesce when neurons are adjacent in memory (NHWC, [N, C], [N, T, C]).
// Either may split each map into segments to keep enough loads in flight; segments write
// partial sums that are added in a fixed order, so results are deterministic. The grids come
// from common/launch.h; every kernel loops over what its grid does not cover.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>

#include "common/entry.h"
#include "common/launch.h"

namespace neurosens {
namespace {

// Offset of spatial element j (row-major over the merged spatial dims) in tensor t.
__device__ __forceinline__ int64_t spatial_offset(const PairLayout& L, int t, int64_t j) {
  const int64_t i2 = j % L.size[2];
  j /= L.size[2];
  const int64_t i1 = j % L.size[1];
  const int64_t i0 = j / L.size[1];
  return i0 * L.ss[t][0] + i1 * L.ss[t][1] + i2 * L.ss[t][2];
}

// Spatial elements [begin, end) of segment `seg` when a map of D elements is cut into `segs`.
__device__ __forceinline__ void segment_bounds(int64_t D, int64_t segs, int64_t seg, int64_t& begin, int64_t& end) {
  const int64_t len = (D + segs - 1) / segs;
  begin = seg * len;
  end = begin + len < D ? begin + len : D;
}

// Every statistic is summed (the pass is bound by memory, not math); those outside `keep` are
// written as zero so that both backends return the same tensor.
template <typename acc_t>
__device__ __forceinline__ void store_stats(const double* total, int keep, acc_t* out) {
#pragma unroll
  for (int s = 0; s < kNumStats; ++s) out[s] = has_stat(keep, s) ? static_cast<acc_t>(total[s]) : acc_t(0);
}

// A warp per (sample, neuron, segment). `flat` means the map is one stride-1 run in a and b.
template <typename scalar_t, typename acc_t, bool flat>
__global__ void stats_rows_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, PairLayout L,
                                  int64_t segs, int keep, acc_t* __restrict__ partial) {
  const int64_t rows = L.N * L.C;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t seg = blockIdx.y;
  int64_t begin, end;
  segment_bounds(L.D, segs, seg, begin, end);
  for (int64_t warp = blockIdx.x * warps_per_block + threadIdx.x / kWarp; warp < rows;
       warp += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t n = warp / L.C, c = warp % L.C;
    const scalar_t* ra = a + n * L.sn[0] + c * L.sc[0];
    const scalar_t* rb = b + n * L.sn[1] + c * L.sc[1];
    BlockedSums<kAllStats, acc_t> s;
    for (int64_t j = begin + lane; j < end; j += kWarp) {
      if (flat) {
        s.add(static_cast<acc_t>(ra[j]), static_cast<acc_t>(rb[j]));
      } else {
        s.add(static_cast<acc_t>(ra[spatial_offset(L, 0, j)]), static_cast<acc_t>(rb[spatial_offset(L, 1, j)]));
      }
    }
    s.finish();
#pragma unroll
    for (int k = 0; k < kNumStats; ++k)
      for (int offset = kWarp / 2; offset > 0; offset /= 2) s.total[k] += __shfl_down_sync(0xffffffff, s.total[k], offset);
    if (lane == 0) store_stats(s.total, keep, partial + (seg * rows + warp) * kNumStats);
  }
}

// A thread per (sample, neuron, segment); neurons along x so loads coalesce.
template <typename scalar_t, typename acc_t>
__global__ void stats_columns_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, PairLayout L,
                                     int64_t segs, int keep, acc_t* __restrict__ partial) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t seg = blockIdx.z;
  if (c >= L.C) return;
  int64_t begin, end;
  segment_bounds(L.D, segs, seg, begin, end);
  for (int64_t n = blockIdx.y; n < L.N; n += gridDim.y) {
    const scalar_t* ra = a + n * L.sn[0] + c * L.sc[0];
    const scalar_t* rb = b + n * L.sn[1] + c * L.sc[1];
    BlockedSums<kAllStats, acc_t> s;
    for (int64_t j = begin; j < end; ++j)
      s.add(static_cast<acc_t>(ra[spatial_offset(L, 0, j)]), static_cast<acc_t>(rb[spatial_offset(L, 1, j)]));
    s.finish();
    store_stats(s.total, keep, partial + ((seg * L.N + n) * L.C + c) * kNumStats);
  }
}

// Multiprocessors of the current device, asked of the driver once per device.
int64_t multiprocessors() {
  static std::mutex mutex;
  static std::unordered_map<int, int> counts;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it == counts.end()) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    it = counts.emplace(device, count).first;
  }
  return it->second;
}

dim3 grid_of(const Launch& l) {
  return dim3(static_cast<unsigned>(l.grid[0]), static_cast<unsigned>(l.grid[1]), static_cast<unsigned>(l.grid[2]));
}

at::Tensor pair_stats_cuda(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, int64_t stats) {
  const StatsCall call = begin_pair_stats(a, b, channel_dim, stats);
  const PairLayout& L = call.L;
  const c10::cuda::CUDAGuard guard(a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool columns = L.by_columns();
  const bool flat = L.rows_contiguous() && L.size[0] == 1 && L.size[1] == 1;
  const Launch launch = columns ? stats_columns_launch(L.N, L.C, L.D, multiprocessors())
                                : stats_rows_launch(L.N, L.C, L.D, multiprocessors());
  at::Tensor partial = at::empty({launch.segs, L.N, L.C, kNumStats}, call.acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._pair_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    if (columns) {
      stats_columns_kernel<scalar_t, acc_t>
          <<<grid_of(launch), launch.threads, 0, stream>>>(pa, pb, L, launch.segs, call.stats, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (flat) {
      stats_rows_kernel<scalar_t, acc_t, true>
          <<<grid_of(launch), launch.threads, 0, stream>>>(pa, pb, L, launch.segs, call.stats, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      stats_rows_kernel<scalar_t, acc_t, false>
          <<<grid_of(launch), launch.threads, 0, stream>>>(pa, pb, L, launch.segs, call.stats, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return launch.segs == 1 ? partial.squeeze(0) : partial.sum(0);
}

// A thread per (sample, neuron): the backward coefficients from the saved statistics.
template <typename acc_t>
__global__ void coefficients_kernel(const acc_t* __restrict__ stats, const acc_t* __restrict__ weight, int64_t N,
                                    int64_t C, int64_t D, Metric metric, acc_t* __restrict__ coef) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < N * C; r += stride)
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
  GradCall call = begin_stabilize_grad(a, b, stats, weight, metric, channel_dim);
  const PairLayout& L = call.L;
  const c10::cuda::CUDAGuard guard(a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor coef = at::empty({L.N, L.C, kNumCoefs}, call.stats.options());
  const bool channels_inner = L.by_columns();
  const Launch per_map = elementwise_launch(L.N * L.C, multiprocessors());
  const Launch per_element = elementwise_launch(L.N * L.C * L.D, multiprocessors());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._stabilize_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    coefficients_kernel<acc_t><<<grid_of(per_map), per_map.threads, 0, stream>>>(
        call.stats.const_data_ptr<acc_t>(), call.weight.const_data_ptr<acc_t>(), L.N, L.C, L.D, call.metric,
        coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const acc_t* pk = coef.const_data_ptr<acc_t>();
    scalar_t* pga = call.grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* pgb = call.grad_b.mutable_data_ptr<scalar_t>();
    if (channels_inner) {
      grad_kernel<scalar_t, acc_t, true><<<grid_of(per_element), per_element.threads, 0, stream>>>(pa, pb, pk, L, pga, pgb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      grad_kernel<scalar_t, acc_t, false><<<grid_of(per_element), per_element.threads, 0, stream>>>(pa, pb, pk, L, pga, pgb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {call.grad_a, call.grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurosens, CUDA, m) {
  m.impl("_pair_stats", &pair_stats_cuda);
  m.impl("_stabilize_grad", &stabilize_grad_cuda);
}

}  // namespace neurosens
