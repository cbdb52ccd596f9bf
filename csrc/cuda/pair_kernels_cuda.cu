// CUDA kernels: per-(sample, neuron) statistics of a pair of activations, and the elementwise
// gradient pass of the stabilizing loss. Each reads every input element exactly once.
//
// Both passes use one of three mappings, by layout:
//  * flat rows: a warp per (sample, neuron) map that is one stride-1 run in every tensor (NCHW),
//               lanes striding along it with 16-byte loads and stores where every row is aligned;
//  * columns:   a thread per (sample, neuron), or per two neurons for 16-bit inputs, neighbouring
//               threads on neighbouring neurons, so loads coalesce when neurons are adjacent in
//               memory (NHWC, [N, C], [N, T, C]); each thread walks its map with a cursor (no
//               division per element) and keeps its backward coefficients in registers;
//  * otherwise (slices, mixed layouts): statistics by a warp per map, gradients by a thread per
//               element, each computing its offsets from the strides.
// Maps may be cut into segments to keep enough loads in flight; segments write partial sums that
// are added in a fixed order, so results are deterministic. The grids come from common/launch.h;
// every kernel loops over what its grid does not cover.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <unordered_map>

#include "common/entry.h"
#include "common/launch.h"

namespace neurosens {
namespace {

// Elements of scalar_t in one 16-byte load.
template <typename scalar_t>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(scalar_t));
};

// V elements moved by one load or store (16 bytes along rows, 4 for a pair of 16-bit neurons).
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

template <typename scalar_t, int V>
__device__ __forceinline__ Pack<scalar_t, V> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, V>*>(p);
}

// Offset of spatial element j (row-major over the merged spatial dims) in tensor t.
__device__ __forceinline__ int64_t spatial_offset(const PairLayout& L, int t, int64_t j) {
  const int64_t i2 = j % L.size[2];
  j /= L.size[2];
  const int64_t i1 = j % L.size[1];
  const int64_t i0 = j / L.size[1];
  return i0 * L.ss[t][0] + i1 * L.ss[t][1] + i2 * L.ss[t][2];
}

// The offsets of spatial element j in the first NT tensors, moved to j + 1 by additions and a
// carry (an odometer over the three spatial dims), so a walk along a map divides only once.
// NT = 1 serves tensors that share their strides.
template <int NT>
struct Cursor {
  int64_t i1, i2;
  int64_t off[NT];

  __device__ __forceinline__ Cursor(const PairLayout& L, int64_t j) {
    i2 = j % L.size[2];
    const int64_t rest = j / L.size[2];
    i1 = rest % L.size[1];
    const int64_t i0 = rest / L.size[1];
#pragma unroll
    for (int t = 0; t < NT; ++t) off[t] = i0 * L.ss[t][0] + i1 * L.ss[t][1] + i2 * L.ss[t][2];
  }

  // The offset in tensor t.
  __device__ __forceinline__ int64_t operator[](int t) const { return off[NT == 1 ? 0 : t]; }

  __device__ __forceinline__ void next(const PairLayout& L) {
#pragma unroll
    for (int t = 0; t < NT; ++t) off[t] += L.ss[t][2];
    if (++i2 < L.size[2]) return;
    i2 = 0;
#pragma unroll
    for (int t = 0; t < NT; ++t) off[t] += L.ss[t][1] - L.size[2] * L.ss[t][2];
    if (++i1 < L.size[1]) return;
    i1 = 0;
#pragma unroll
    for (int t = 0; t < NT; ++t) off[t] += L.ss[t][0] - L.size[1] * L.ss[t][1];
  }
};

// Spatial elements [begin, end) of segment `seg` when a map of D elements is cut into `segs`
// pieces whose length is a multiple of `align` (so vector loads stay aligned); trailing
// segments may be empty.
__device__ __forceinline__ void segment_bounds(int64_t D, int64_t segs, int64_t seg, int64_t align, int64_t& begin,
                                               int64_t& end) {
  const int64_t len = ((D + segs - 1) / segs + align - 1) / align * align;
  begin = seg * len < D ? seg * len : D;
  end = begin + len < D ? begin + len : D;
}

// Every statistic is summed (the pass is bound by memory, not math); those outside `keep` are
// written as zero so that both backends return the same tensor.
template <typename acc_t>
__device__ __forceinline__ void store_stats(const double* total, int keep, acc_t* out) {
#pragma unroll
  for (int s = 0; s < kNumStats; ++s) out[s] = has_stat(keep, s) ? static_cast<acc_t>(total[s]) : acc_t(0);
}

// The warp's sums into lane 0.
__device__ __forceinline__ void warp_reduce(double* total) {
#pragma unroll
  for (int k = 0; k < kNumStats; ++k)
    for (int offset = kWarp / 2; offset > 0; offset /= 2) total[k] += __shfl_down_sync(0xffffffff, total[k], offset);
}

// A warp per (sample, neuron, segment). Flat rows (kFlat) are read V elements per load (V = 1:
// unaligned rows); any other strides, one element at a time, offsets computed from the strides.
template <typename scalar_t, typename acc_t, int kMask, bool kFlat, int V>
__global__ void stats_rows_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, PairLayout L,
                                  int64_t segs, int keep, acc_t* __restrict__ partial) {
  const int64_t rows = L.N * L.C;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t seg = blockIdx.y;
  int64_t begin, end;
  segment_bounds(L.D, segs, seg, V, begin, end);
  const int64_t vend = begin + (end - begin) / V * V;
  for (int64_t warp = blockIdx.x * warps_per_block + threadIdx.x / kWarp; warp < rows;
       warp += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t n = warp / L.C, c = warp % L.C;
    const scalar_t* ra = a + n * L.sn[0] + c * L.sc[0];
    const scalar_t* rb = b + n * L.sn[1] + c * L.sc[1];
    BlockedSums<kMask, acc_t> s;
    if constexpr (kFlat) {
#pragma unroll 2
      for (int64_t j = begin + lane * V; j < vend; j += kWarp * V) {
        const Pack<scalar_t, V> x = load_pack<scalar_t, V>(ra + j), y = load_pack<scalar_t, V>(rb + j);
#pragma unroll
        for (int i = 0; i < V; ++i) s.add(static_cast<acc_t>(x.v[i]), static_cast<acc_t>(y.v[i]));
      }
      for (int64_t j = vend + lane; j < end; j += kWarp) s.add(static_cast<acc_t>(ra[j]), static_cast<acc_t>(rb[j]));
    } else {
      for (int64_t j = begin + lane; j < end; j += kWarp)
        s.add(static_cast<acc_t>(ra[spatial_offset(L, 0, j)]), static_cast<acc_t>(rb[spatial_offset(L, 1, j)]));
    }
    s.finish();
    warp_reduce(s.total);
    if (lane == 0) store_stats(s.total, keep, partial + (seg * rows + warp) * kNumStats);
  }
}

// Loads issued together by a column walk before their values are used.
constexpr int kColumnUnroll = 4;

// Columns: a thread per (sample, P neighbouring neurons, segment); neurons along x so loads
// coalesce. P = 2 for 16-bit inputs makes each load 4 bytes, as for float32.
template <typename scalar_t, typename acc_t, int kMask, int NT, int P>
__global__ void stats_columns_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, PairLayout L,
                                     int64_t segs, int keep, acc_t* __restrict__ partial) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * P;
  const int64_t seg = blockIdx.z;
  if (c >= L.C) return;
  int64_t begin, end;
  segment_bounds(L.D, segs, seg, 1, begin, end);
  for (int64_t n = blockIdx.y; n < L.N; n += gridDim.y) {
    const scalar_t* ra = a + n * L.sn[0] + c * L.sc[0];
    const scalar_t* rb = b + n * L.sn[1] + c * L.sc[1];
    BlockedSums<kMask, acc_t> s[P];
    Cursor<NT> at(L, begin);
    for (int64_t j = begin; j < end; j += kColumnUnroll) {
      Pack<scalar_t, P> x[kColumnUnroll], y[kColumnUnroll];
#pragma unroll
      for (int u = 0; u < kColumnUnroll; ++u) {
        if (j + u < end) {
          x[u] = load_pack<scalar_t, P>(ra + at[0]);
          y[u] = load_pack<scalar_t, P>(rb + at[1]);
          at.next(L);
        }
      }
#pragma unroll
      for (int u = 0; u < kColumnUnroll; ++u) {
        if (j + u < end) {
#pragma unroll
          for (int q = 0; q < P; ++q) s[q].add(static_cast<acc_t>(x[u].v[q]), static_cast<acc_t>(y[u].v[q]));
        }
      }
    }
#pragma unroll
    for (int q = 0; q < P; ++q) {
      s[q].finish();
      store_stats(s[q].total, keep, partial + ((seg * L.N + n) * L.C + c + q) * kNumStats);
    }
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

// Every map is one stride-1 run in every tensor of the layout (contiguous NCHW and its kin).
bool flat_rows(const PairLayout& L) { return L.rows_contiguous() && L.size[0] == 1 && L.size[1] == 1; }

// Flat rows whose every start is 16-byte aligned in every tensor, so they can be read V at a time.
// The sample and neuron strides matter only where there is more than one sample or neuron.
template <typename scalar_t>
bool rows_aligned(const PairLayout& L, std::initializer_list<const void*> data) {
  constexpr int V = VecWidth<scalar_t>::value;
  bool ok = true;
  for (const void* p : data) ok = ok && reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
  for (int t = 0; t < L.ntensors; ++t) ok = ok && (L.N == 1 || L.sn[t] % V == 0) && (L.C == 1 || L.sc[t] % V == 0);
  return ok;
}

// Neurons that can be read two at a time in a 4-byte load (16-bit inputs walked by columns): an
// even count, and every pair 4-byte aligned in every tensor.
bool columns_paired(const PairLayout& L, int64_t element_size, std::initializer_list<const void*> data) {
  if (element_size != 2 || L.C % 2 != 0) return false;
  bool ok = true;
  for (const void* p : data) ok = ok && reinterpret_cast<std::uintptr_t>(p) % 4 == 0;
  for (int t = 0; t < L.ntensors; ++t) {
    ok = ok && L.sc[t] == 1 && (L.N == 1 || L.sn[t] % 2 == 0);
    for (int i = 0; i < kMaxSpatial; ++i) ok = ok && (L.size[i] == 1 || L.ss[t][i] % 2 == 0);
  }
  return ok;
}

// Every tensor of the layout has the same strides (one cursor serves them all).
bool same_strides(const PairLayout& L) {
  bool same = true;
  for (int t = 1; t < L.ntensors; ++t) {
    same = same && L.sn[t] == L.sn[0] && L.sc[t] == L.sc[0];
    for (int i = 0; i < kMaxSpatial; ++i) same = same && L.ss[t][i] == L.ss[0][i];
  }
  return same;
}

// The statistics of the l1 distances, plain and relative: their pass sums two of the six. The
// narrow mask halves the arithmetic per element, which bounds the pass on 16-bit inputs.
constexpr int kL1Stats = stat_bit(kAbsDiff) | stat_bit(kAbsA);

// How a statistics pass walks its layout, decided on the host.
struct StatsPlan {
  bool columns, paired, flat, aligned, shared;
  dim3 grid;
  Launch launch;
};

template <typename scalar_t, typename acc_t, int kMask>
void launch_stats(const StatsPlan& p, cudaStream_t stream, const scalar_t* pa, const scalar_t* pb, const PairLayout& L,
                  int keep, acc_t* pp) {
  const int threads = p.launch.threads;
  const int64_t segs = p.launch.segs;
  constexpr int P = sizeof(scalar_t) == 2 ? 2 : 1;  // the pairs exist for 16-bit types only
  if (p.columns && p.paired && p.shared) {
    stats_columns_kernel<scalar_t, acc_t, kMask, 1, P><<<p.grid, threads, 0, stream>>>(pa, pb, L, segs, keep, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (p.columns && p.paired) {
    stats_columns_kernel<scalar_t, acc_t, kMask, 2, P><<<p.grid, threads, 0, stream>>>(pa, pb, L, segs, keep, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (p.columns && p.shared) {
    stats_columns_kernel<scalar_t, acc_t, kMask, 1, 1><<<p.grid, threads, 0, stream>>>(pa, pb, L, segs, keep, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (p.columns) {
    stats_columns_kernel<scalar_t, acc_t, kMask, 2, 1><<<p.grid, threads, 0, stream>>>(pa, pb, L, segs, keep, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (p.flat && p.aligned) {
    stats_rows_kernel<scalar_t, acc_t, kMask, true, VecWidth<scalar_t>::value>
        <<<p.grid, threads, 0, stream>>>(pa, pb, L, segs, keep, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (p.flat) {
    stats_rows_kernel<scalar_t, acc_t, kMask, true, 1><<<p.grid, threads, 0, stream>>>(pa, pb, L, segs, keep, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    stats_rows_kernel<scalar_t, acc_t, kMask, false, 1><<<p.grid, threads, 0, stream>>>(pa, pb, L, segs, keep, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor pair_stats_cuda(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, int64_t stats) {
  const StatsCall call = begin_pair_stats(a, b, channel_dim, stats);
  const PairLayout& L = call.L;
  const c10::cuda::CUDAGuard guard(a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool columns = L.by_columns();
  const bool paired = columns && columns_paired(L, a.element_size(), {a.const_data_ptr(), b.const_data_ptr()});
  const bool flat = flat_rows(L);
  // Paired columns: a thread per two neurons, so the grid spans C / 2 of them.
  const Launch launch = columns ? stats_columns_launch(L.N, paired ? L.C / 2 : L.C, L.D, multiprocessors())
                                : stats_rows_launch(L.N, L.C, L.D, multiprocessors());
  at::Tensor partial = at::empty({launch.segs, L.N, L.C, kNumStats}, call.acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "neurosens._pair_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    const StatsPlan plan{columns, paired, flat, rows_aligned<scalar_t>(L, {pa, pb}), same_strides(L), grid_of(launch),
                         launch};
    if ((call.stats & ~kL1Stats) == 0) {
      launch_stats<scalar_t, acc_t, kL1Stats>(plan, stream, pa, pb, L, call.stats, pp);
    } else {
      launch_stats<scalar_t, acc_t, kAllStats>(plan, stream, pa, pb, L, call.stats, pp);
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

// One (sample, neuron)'s backward coefficients, held in registers while its map is walked.
template <typename acc_t>
struct Coefficients {
  acc_t aa, ab, ba, bb, sign;

  Coefficients() = default;
  __device__ __forceinline__ explicit Coefficients(const acc_t* k) { load(k); }

  __device__ __forceinline__ void load(const acc_t* k) {
    aa = k[kAA];
    ab = k[kAB];
    ba = k[kBA];
    bb = k[kBB];
    sign = k[kSign];
  }

  // opposite: opposite_coefficients of the call's metric.
  template <typename scalar_t>
  __device__ __forceinline__ void apply(bool opposite, scalar_t x, scalar_t y, scalar_t& gx, scalar_t& gy) const {
    acc_t fx, fy;
    pair_grad<acc_t>(opposite, aa, ab, ba, bb, sign, static_cast<acc_t>(x), static_cast<acc_t>(y), fx, fy);
    gx = static_cast<scalar_t>(fx);
    gy = static_cast<scalar_t>(fy);
  }
};

// Flat rows: a warp per (sample, neuron, segment), V elements per load and store.
template <typename scalar_t, typename acc_t, int V>
__global__ void grad_flat_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                 const acc_t* __restrict__ coef, PairLayout L, int64_t segs, bool opposite,
                                 scalar_t* __restrict__ ga, scalar_t* __restrict__ gb) {
  const int64_t rows = L.N * L.C;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  int64_t begin, end;
  segment_bounds(L.D, segs, blockIdx.y, V, begin, end);
  const int64_t vend = begin + (end - begin) / V * V;
  for (int64_t warp = blockIdx.x * warps_per_block + threadIdx.x / kWarp; warp < rows;
       warp += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t n = warp / L.C, c = warp % L.C;
    const Coefficients<acc_t> k(coef + warp * kNumCoefs);
    const scalar_t* ra = a + n * L.sn[0] + c * L.sc[0];
    const scalar_t* rb = b + n * L.sn[1] + c * L.sc[1];
    scalar_t* rga = ga + n * L.sn[2] + c * L.sc[2];
    scalar_t* rgb = gb + n * L.sn[3] + c * L.sc[3];
#pragma unroll 2
    for (int64_t j = begin + lane * V; j < vend; j += kWarp * V) {
      const Pack<scalar_t, V> x = load_pack<scalar_t, V>(ra + j), y = load_pack<scalar_t, V>(rb + j);
      Pack<scalar_t, V> gx, gy;
#pragma unroll
      for (int i = 0; i < V; ++i) k.apply(opposite, x.v[i], y.v[i], gx.v[i], gy.v[i]);
      *reinterpret_cast<Pack<scalar_t, V>*>(rga + j) = gx;
      *reinterpret_cast<Pack<scalar_t, V>*>(rgb + j) = gy;
    }
    for (int64_t j = vend + lane; j < end; j += kWarp) k.apply(opposite, ra[j], rb[j], rga[j], rgb[j]);
  }
}

// Columns: a thread per (sample, P neighbouring neurons, segment), neurons along x so loads and
// stores coalesce (P as in the statistics pass).
template <typename scalar_t, typename acc_t, int NT, int P>
__global__ void grad_columns_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                    const acc_t* __restrict__ coef, PairLayout L, int64_t segs, bool opposite,
                                    scalar_t* __restrict__ ga, scalar_t* __restrict__ gb) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * P;
  if (c >= L.C) return;
  int64_t begin, end;
  segment_bounds(L.D, segs, blockIdx.z, 1, begin, end);
  for (int64_t n = blockIdx.y; n < L.N; n += gridDim.y) {
    Coefficients<acc_t> k[P];
#pragma unroll
    for (int q = 0; q < P; ++q) k[q].load(coef + (n * L.C + c + q) * kNumCoefs);
    const scalar_t* ra = a + n * L.sn[0] + c * L.sc[0];
    const scalar_t* rb = b + n * L.sn[1] + c * L.sc[1];
    scalar_t* rga = ga + n * L.sn[2] + c * L.sc[2];
    scalar_t* rgb = gb + n * L.sn[3] + c * L.sc[3];
    Cursor<NT> at(L, begin);
    for (int64_t j = begin; j < end; j += kColumnUnroll) {
      Pack<scalar_t, P> x[kColumnUnroll], y[kColumnUnroll];
      int64_t oa[kColumnUnroll], ob[kColumnUnroll];
#pragma unroll
      for (int u = 0; u < kColumnUnroll; ++u) {
        if (j + u < end) {
          x[u] = load_pack<scalar_t, P>(ra + at[0]);
          y[u] = load_pack<scalar_t, P>(rb + at[1]);
          oa[u] = at[2];
          ob[u] = at[3];
          at.next(L);
        }
      }
#pragma unroll
      for (int u = 0; u < kColumnUnroll; ++u) {
        if (j + u < end) {
          Pack<scalar_t, P> gx, gy;
#pragma unroll
          for (int q = 0; q < P; ++q) k[q].apply(opposite, x[u].v[q], y[u].v[q], gx.v[q], gy.v[q]);
          *reinterpret_cast<Pack<scalar_t, P>*>(rga + oa[u]) = gx;
          *reinterpret_cast<Pack<scalar_t, P>*>(rgb + ob[u]) = gy;
        }
      }
    }
  }
}

// Any strides: a thread per element, ordered (n, c, j) so neighbouring threads share a map.
template <typename scalar_t, typename acc_t>
__global__ void grad_strided_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                    const acc_t* __restrict__ coef, PairLayout L, bool opposite,
                                    scalar_t* __restrict__ ga, scalar_t* __restrict__ gb) {
  const int64_t total = L.N * L.C * L.D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t j = e % L.D, row = e / L.D;
    const int64_t n = row / L.C, c = row % L.C;
    const Coefficients<acc_t> k(coef + row * kNumCoefs);
    k.apply(opposite, a[n * L.sn[0] + c * L.sc[0] + spatial_offset(L, 0, j)], b[n * L.sn[1] + c * L.sc[1] + spatial_offset(L, 1, j)],
            ga[n * L.sn[2] + c * L.sc[2] + spatial_offset(L, 2, j)], gb[n * L.sn[3] + c * L.sc[3] + spatial_offset(L, 3, j)]);
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
  const int64_t sms = multiprocessors();
  const bool columns = L.by_columns();
  const bool paired = columns && columns_paired(L, a.element_size(), {a.const_data_ptr(), b.const_data_ptr(),
                                                                      call.grad_a.const_data_ptr(),
                                                                      call.grad_b.const_data_ptr()});
  const bool shared = same_strides(L);
  const bool flat = flat_rows(L);
  const Launch per_map = elementwise_launch(L.N * L.C, sms);
  // The walks over maps are cut and gridded like the statistics passes of the same layout.
  const Launch walk = columns ? stats_columns_launch(L.N, paired ? L.C / 2 : L.C, L.D, sms)
                      : flat  ? stats_rows_launch(L.N, L.C, L.D, sms)
                              : elementwise_launch(L.N * L.C * L.D, sms);

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
    const dim3 grid = grid_of(walk);
    constexpr int P = sizeof(scalar_t) == 2 ? 2 : 1;  // as in the statistics pass
    const bool opposite = opposite_coefficients(call.metric);
    if (columns && paired && shared) {
      grad_columns_kernel<scalar_t, acc_t, 1, P><<<grid, walk.threads, 0, stream>>>(pa, pb, pk, L, walk.segs, opposite, pga, pgb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (columns && paired) {
      grad_columns_kernel<scalar_t, acc_t, 4, P><<<grid, walk.threads, 0, stream>>>(pa, pb, pk, L, walk.segs, opposite, pga, pgb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (columns && shared) {
      grad_columns_kernel<scalar_t, acc_t, 1, 1><<<grid, walk.threads, 0, stream>>>(pa, pb, pk, L, walk.segs, opposite, pga, pgb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (columns) {
      grad_columns_kernel<scalar_t, acc_t, 4, 1><<<grid, walk.threads, 0, stream>>>(pa, pb, pk, L, walk.segs, opposite, pga, pgb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (flat && rows_aligned<scalar_t>(L, {pa, pb, pga, pgb})) {
      grad_flat_kernel<scalar_t, acc_t, VecWidth<scalar_t>::value><<<grid, walk.threads, 0, stream>>>(pa, pb, pk, L, walk.segs, opposite, pga, pgb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (flat) {
      grad_flat_kernel<scalar_t, acc_t, 1><<<grid, walk.threads, 0, stream>>>(pa, pb, pk, L, walk.segs, opposite, pga, pgb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      grad_strided_kernel<scalar_t, acc_t><<<grid, walk.threads, 0, stream>>>(pa, pb, pk, L, opposite, pga, pgb);
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
