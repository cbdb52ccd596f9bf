// What every backend's kernel entry point does before it reads a tensor: check the arguments and
// lay out the tensors. The kernels then differ only in how they walk the layout.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <optional>
#include <string>

#include "common/metric.h"
#include "common/pair_layout.h"
#include "common/pair_math.h"

namespace neurosens {

// The statistics a metric is computed from.
constexpr int stats_for(Metric metric, bool relative = false) {
  int bits = relative ? stat_bit(kAbsA) : 0;
  switch (metric) {
    case Metric::L1: return bits | stat_bit(kAbsDiff);
    case Metric::L2: return bits | stat_bit(kSqDiff);
    case Metric::Cosine: return bits | kCosineStats;
  }
  return kAllStats;
}

// The metric of a distance op; relative distances divide by the benign map's mean |a|.
inline Metric parse_distance_metric(const std::string& metric, bool relative, const char* op) {
  const Metric m = parse_metric(metric, op, "metric");
  TORCH_CHECK_VALUE(!(relative && m == Metric::Cosine), op,
                    ": relative=True is not defined for metric='cosine' (the cosine is already scale-free)");
  return m;
}

inline void check_k(int64_t k, int64_t C, const at::Tensor& a, const char* op) {
  TORCH_CHECK_VALUE(k >= 1 && k <= C, op, ": k=", k, " is out of range: activations of shape ", shape_str(a),
                    " have ", C, " neurons, so k must be in [1, ", C, "]");
}

// Indices given to stabilize: a 1-D int64 tensor of k neurons on a's device (their range is
// checked apart, where the backend can: check_index_range_host on the CPU).
inline void check_indices(const at::Tensor& idx, int64_t k, int64_t C, const at::Tensor& a, const char* op) {
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.scalar_type() == at::kLong, op, ": indices must be a 1-D int64 tensor, got ",
                    idx.scalar_type(), " of shape ", shape_str(idx));
  TORCH_CHECK_VALUE(idx.device() == a.device(), op, ": indices are on ", idx.device(), " but a is on ", a.device());
  TORCH_CHECK_VALUE(k == idx.numel(), op, ": k=", k, " does not match ", idx.numel(), " indices");
  check_k(k, C, a, op);
}

// The arguments of a distance op, checked before any pass over the activations.
struct DistanceCall {
  PairLayout L;
  Metric metric;
};

inline DistanceCall begin_distance(const at::Tensor& a, const at::Tensor& b, c10::string_view metric,
                                   int64_t channel_dim, bool relative, const char* op) {
  const Metric m = parse_distance_metric(std::string(metric), relative, op);
  return {make_layout({a, b}, check_pair(a, b, channel_dim, op), op), m};
}

// The arguments of stabilize, checked before any pass over the activations: the two metrics, the
// pair, and k or the given indices (their range is each backend's to check).
struct StabilizeArgs {
  Metric metric, select_metric;
  int64_t cdim, C;
};

inline StabilizeArgs begin_stabilize(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& indices,
                                     int64_t k, c10::string_view metric, c10::string_view select_metric,
                                     int64_t channel_dim, const char* op) {
  const Metric m = parse_metric(std::string(metric), op, "metric");
  const int64_t cdim = check_pair(a, b, channel_dim, op);
  const Metric sm = parse_metric(std::string(select_metric), op, "select_metric");
  const int64_t C = a.size(cdim);
  if (indices.has_value()) {
    check_indices(*indices, k, C, a, op);
  } else {
    check_k(k, C, a, op);
  }
  return {m, sm, cdim, C};
}

// Every index of a CPU tensor lies in [0, C), read in place (no ATen op on the success path).
inline void check_index_range_host(const at::Tensor& idx, int64_t C, const at::Tensor& a, const char* op) {
  const auto v = idx.accessor<int64_t, 1>();
  int64_t lo = v[0], hi = v[0];
  for (int64_t i = 1; i < v.size(0); ++i) lo = std::min(lo, v[i]), hi = std::max(hi, v[i]);
  TORCH_CHECK_VALUE(lo >= 0 && hi < C, op, ": indices must lie in [0, ", C, ") for activations of shape ", shape_str(a),
                    ", got values in [", lo, ", ", hi, "]");
}

// The dtype sums are kept in: float32 for float16/bfloat16/float32 inputs, float64 for float64
// (at::opmath_type<scalar_t> inside the kernels).
inline at::ScalarType accumulation_dtype(const at::Tensor& a) { return at::toOpMathType(a.scalar_type()); }

// A kernel returns [N, C, kNumStats] sums, zero outside `stats`.
struct StatsCall {
  PairLayout L;
  int stats;                // bit set of the statistics asked for
  at::TensorOptions acc;    // of the result: a's device, the accumulation dtype
};

inline StatsCall begin_pair_stats(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, int64_t stats) {
  const char* op = "neurosens._pair_stats";
  const int64_t cdim = check_pair(a, b, channel_dim, op);
  TORCH_CHECK_VALUE(stats > 0 && stats <= kAllStats, op, ": stats=", stats, " must be a non-empty bit set of the ",
                    kNumStats, " statistics");
  return {make_layout({a, b}, cdim, op), static_cast<int>(stats), a.options().dtype(accumulation_dtype(a))};
}

struct GradCall {
  PairLayout L;  // of a, b, grad_a, grad_b
  Metric metric;
  at::Tensor stats, weight;  // contiguous
  at::Tensor grad_a, grad_b;
};

inline GradCall begin_stabilize_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& stats,
                                     const at::Tensor& weight, c10::string_view metric, int64_t channel_dim) {
  const char* op = "neurosens._stabilize_grad";
  const int64_t cdim = check_pair(a, b, channel_dim, op);
  const auto acc = accumulation_dtype(a);
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == a.size(0) && stats.size(1) == a.size(cdim) &&
                  stats.size(2) == kNumStats && stats.scalar_type() == acc && stats.device() == a.device(),
              op, ": stats must be a ", acc, " tensor of shape [", a.size(0), ", ", a.size(cdim), ", ", kNumStats,
              "] on ", a.device(), ", got ", stats.scalar_type(), " ", shape_str(stats), " on ", stats.device());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == a.size(cdim) && weight.scalar_type() == acc &&
                  weight.device() == a.device(),
              op, ": weight must be a ", acc, " tensor of shape [", a.size(cdim), "] on ", a.device(), ", got ",
              weight.scalar_type(), " ", shape_str(weight), " on ", weight.device());
  GradCall call;
  call.metric = parse_metric(std::string(metric), op, "metric");
  call.stats = stats.contiguous();
  call.weight = weight.contiguous();
  call.grad_a = at::empty_like(a);
  call.grad_b = at::empty_like(b);
  call.L = make_layout({a, b, call.grad_a, call.grad_b}, cdim, op);
  return call;
}

}  // namespace neurosens
