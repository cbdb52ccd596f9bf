// The public ops, written once for every device over the two per-backend kernels
// (_pair_stats, _stabilize_grad). Everything here works on [N, C]-sized tensors only: the
// activations themselves are read by the kernels and nowhere else. The CPU has its own version
// of every public op and of _stabilize_backward (cpu/), which turn statistics into distances as
// they are summed: at the late layers' sizes the ATen ops here would cost more than the pass.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/entry.h"
#include "common/metric.h"
#include "common/pair_layout.h"
#include "common/pair_math.h"

namespace neurosens {
namespace {

at::Tensor pair_stats(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, int64_t stats) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neurosens::_pair_stats", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(a, b, channel_dim, stats);
}

std::tuple<at::Tensor, at::Tensor> stabilize_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& stats,
                                                  const at::Tensor& weight, c10::string_view metric,
                                                  int64_t channel_dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neurosens::_stabilize_grad", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, c10::string_view, int64_t)>();
  return op.call(a, b, stats, weight, metric, channel_dim);
}

at::Tensor stat(const at::Tensor& stats, Stat s) { return stats.select(-1, s); }

// Elements of one neuron's map.
int64_t map_size(const at::Tensor& a, int64_t cdim) { return a.numel() / (a.size(0) * a.size(cdim)); }

// [N, C] per-sample distances from the [N, C, kNumStats] sums.
at::Tensor distances_from_stats(const at::Tensor& stats, Metric metric, int64_t D, bool relative) {
  at::Tensor dist;
  switch (metric) {
    case Metric::L1:
      dist = stat(stats, kAbsDiff) / static_cast<double>(D);
      break;
    case Metric::L2:
      dist = stat(stats, kSqDiff).sqrt() / static_cast<double>(D);
      break;
    case Metric::Cosine: {
      const at::Tensor sq_a = stat(stats, kSqA), sq_b = stat(stats, kSqB);
      const at::Tensor cos = stat(stats, kDot) / (sq_a.sqrt() * sq_b.sqrt()).clamp_min(kCosineEps);
      const at::Tensor zero = stat(stats, kAbsA).eq(0).logical_and(stat(stats, kAbsDiff).eq(0));
      dist = at::where(zero, at::zeros_like(cos), 1.0 - cos);
      break;
    }
  }
  if (relative) dist = dist / (stat(stats, kAbsA) / static_cast<double>(D)).clamp_min(kRelativeEps);
  return dist;
}

at::Tensor per_sample_impl(const at::Tensor& a, const at::Tensor& b, const std::string& metric, int64_t channel_dim,
                           bool relative, const char* op) {
  const Metric m = parse_distance_metric(metric, relative, op);
  const int64_t cdim = check_pair(a, b, channel_dim, op);
  return distances_from_stats(pair_stats(a, b, cdim, stats_for(m, relative)), m, map_size(a, cdim), relative);
}

at::Tensor neuron_distance_per_sample(const at::Tensor& a, const at::Tensor& b, c10::string_view metric,
                                      int64_t channel_dim, bool relative) {
  return per_sample_impl(a, b, std::string(metric), channel_dim, relative, "neurosens.neuron_distance_per_sample");
}

at::Tensor neuron_distance(const at::Tensor& a, const at::Tensor& b, c10::string_view metric, int64_t channel_dim,
                           bool relative) {
  return per_sample_impl(a, b, std::string(metric), channel_dim, relative, "neurosens.neuron_distance").sum(0);
}

// The k largest (largest=false: smallest) values, sorted, with their indices; between equal
// values the lower index comes first, on every backend.
std::tuple<at::Tensor, at::Tensor> topk_lower_index_first(const at::Tensor& values, int64_t k, bool largest) {
  auto [sorted, order] = at::sort(values, /*stable=*/true, /*dim=*/0, /*descending=*/largest);
  return {sorted.slice(0, 0, k), order.slice(0, 0, k)};
}

std::tuple<at::Tensor, at::Tensor> neuron_topk(const at::Tensor& a, const at::Tensor& b, int64_t k,
                                               c10::string_view metric, int64_t channel_dim, bool relative,
                                               bool largest) {
  const char* op = "neurosens.neuron_topk";
  const at::Tensor dist = per_sample_impl(a, b, std::string(metric), channel_dim, relative, op);
  check_k(k, dist.size(1), a, op);
  return topk_lower_index_first(dist.mean(0), k, largest);
}

// Indices must lie in [0, C). On a GPU the check runs on the device (an asynchronous assert), so
// that a training step neither waits for the GPU nor breaks CUDA-graph capture.
void check_index_range(const at::Tensor& idx, int64_t C, const at::Tensor& a, const char* op) {
  if (idx.device().is_cpu()) return check_index_range_host(idx, C, a, op);
  // A fixed message: nothing is formatted on the success path of every step.
  at::_assert_async(idx.ge(0).logical_and(idx.lt(C)).all(),
                    "neurosens.stabilize: indices must lie in [0, C), C the activations' neuron count");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stabilize(const at::Tensor& a, const at::Tensor& b,
                                                         const std::optional<at::Tensor>& indices, int64_t k,
                                                         c10::string_view metric, c10::string_view select_metric,
                                                         int64_t channel_dim) {
  const char* op = "neurosens.stabilize";
  const StabilizeArgs args = begin_stabilize(a, b, indices, k, metric, select_metric, channel_dim, op);
  const Metric m = args.metric, sm = args.select_metric;
  const int64_t cdim = args.cdim, C = args.C;
  if (indices.has_value()) check_index_range(*indices, C, a, op);
  const int64_t D = map_size(a, cdim);
  const at::Tensor stats = pair_stats(a, b, cdim, stats_for(m) | (indices.has_value() ? 0 : stats_for(sm)));
  at::Tensor selected;
  if (indices.has_value()) {
    selected = indices->clone();
  } else {
    selected = std::get<1>(topk_lower_index_first(distances_from_stats(stats, sm, D, false).mean(0), k, true));
  }
  const at::Tensor loss = distances_from_stats(stats, m, D, false).index_select(1, selected).mean();
  return {loss, selected, stats};
}

std::tuple<at::Tensor, at::Tensor> stabilize_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                                      const at::Tensor& indices, const at::Tensor& stats,
                                                      c10::string_view metric, int64_t channel_dim) {
  const char* op = "neurosens._stabilize_backward";
  const int64_t cdim = check_pair(a, b, channel_dim, op);
  // d loss / d dist(n, c): the loss is the mean over samples and selected neurons (a neuron
  // listed twice counts twice, as in the forward).
  const at::Tensor hits =
      at::zeros({a.size(cdim)}, stats.options()).index_add_(0, indices, at::ones({indices.numel()}, stats.options()));
  const at::Tensor weight = hits * (grad.to(stats.scalar_type()) / static_cast<double>(a.size(0) * indices.numel()));
  return stabilize_grad(a, b, stats, weight, metric, cdim);
}

}  // namespace

TORCH_LIBRARY_IMPL(neurosens, CompositeExplicitAutograd, m) {
  m.impl("neuron_distance", &neuron_distance);
  m.impl("neuron_distance_per_sample", &neuron_distance_per_sample);
  m.impl("neuron_topk", &neuron_topk);
  m.impl("stabilize", &stabilize);
  m.impl("_stabilize_backward", &stabilize_backward);
}

}  // namespace neurosens
