// The strided view every kernel works on: a benign/adversarial pair of activations seen as
// [N, C, spatial...] with up to three spatial dims, each tensor with its own strides.
// Spatial dims that are laid out back to back in both tensors are merged, so contiguous NCHW
// becomes one stride-1 run per neuron and channels_last one stride-C run; slices keep their
// strides and are read in place, never copied.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <vector>

#include "common/pair_math.h"

namespace neurosens {

constexpr int kMaxSpatial = 3;
constexpr int kMaxTensors = 4;  // a, b and, in the backward, grad_a, grad_b

struct PairLayout {
  int64_t N;  // samples
  int64_t C;  // neurons
  int64_t D;  // elements of one neuron's map
  int ntensors;
  // Spatial dims after merging, outermost first, padded with size 1 in front.
  int64_t size[kMaxSpatial];
  int64_t sn[kMaxTensors];               // sample stride of each tensor
  int64_t sc[kMaxTensors];               // neuron stride
  int64_t ss[kMaxTensors][kMaxSpatial];  // spatial strides

  // The innermost spatial run is contiguous in every tensor (e.g. NCHW).
  bool rows_contiguous() const {
    bool ok = size[kMaxSpatial - 1] > 1;
    for (int t = 0; t < ntensors; ++t) ok = ok && ss[t][kMaxSpatial - 1] == 1;
    return ok;
  }
  // Neurons are adjacent in memory in every tensor (e.g. NHWC, [N, C], [N, T, C]).
  bool channels_contiguous() const {
    bool ok = C > 1;
    for (int t = 0; t < ntensors; ++t) ok = ok && sc[t] == 1;
    return ok;
  }
  // Kernels walk such layouts by columns: all neurons of a position at once.
  bool by_columns() const { return channels_contiguous() && !rows_contiguous(); }
};

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// Checks a pair of activations and the channel dim; returns the channel dim as a positive index.
inline int64_t check_pair(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, const char* op) {
  TORCH_CHECK(a.defined() && b.defined(), op, ": a and b must be tensors");
  TORCH_CHECK(a.device() == b.device(), op, ": a and b must be on the same device, got a on ", a.device(),
              " and b on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must have the same dtype, got a ",
              a.scalar_type(), " and b ", b.scalar_type());
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": a and b must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": a and b must have the same shape, got a ", shape_str(a), " and b ",
              shape_str(b));
  TORCH_CHECK(a.dim() >= 2, op, ": activations need a batch and a neuron dim ([N, C, ...]), got shape ",
              shape_str(a));
  const int64_t dim = a.dim();
  TORCH_CHECK_VALUE(channel_dim >= -dim && channel_dim < dim, op, ": channel_dim=", channel_dim,
                    " is out of range for shape ", shape_str(a));
  const int64_t cdim = channel_dim < 0 ? channel_dim + dim : channel_dim;
  TORCH_CHECK_VALUE(cdim != 0, op, ": channel_dim=", channel_dim, " points at the batch dim of shape ",
                    shape_str(a));
  TORCH_CHECK_VALUE(a.size(0) > 0, op, ": the batch is empty (shape ", shape_str(a), ")");
  TORCH_CHECK_VALUE(a.numel() > 0, op, ": activations of shape ", shape_str(a), " have no elements");
  return cdim;
}

// Layout of tensors of one shape (checked by check_pair) iterated together.
inline PairLayout make_layout(const std::vector<at::Tensor>& ts, int64_t cdim, const char* op) {
  const at::Tensor& a = ts.front();
  PairLayout L;
  L.ntensors = static_cast<int>(ts.size());
  L.N = a.size(0);
  L.C = a.size(cdim);
  for (int t = 0; t < L.ntensors; ++t) {
    L.sn[t] = ts[t].stride(0);
    L.sc[t] = ts[t].stride(cdim);
  }
  struct Dim {
    int64_t size;
    int64_t stride[kMaxTensors];
  };
  std::vector<Dim> dims;  // outermost first
  L.D = 1;
  for (int64_t d = 1; d < a.dim(); ++d) {
    if (d == cdim) continue;
    L.D *= a.size(d);
    if (a.size(d) == 1) continue;
    Dim dim{a.size(d), {}};
    for (int t = 0; t < L.ntensors; ++t) dim.stride[t] = ts[t].stride(d);
    dims.push_back(dim);
  }
  std::vector<Dim> merged;  // innermost first
  for (auto it = dims.rbegin(); it != dims.rend(); ++it) {
    bool mergeable = !merged.empty();
    for (int t = 0; mergeable && t < L.ntensors; ++t)
      mergeable = it->stride[t] == merged.back().size * merged.back().stride[t];
    if (mergeable)
      merged.back().size *= it->size;
    else
      merged.push_back(*it);
  }
  TORCH_CHECK(static_cast<int>(merged.size()) <= kMaxSpatial, op, ": activations of shape ", shape_str(a),
              " with strides ", a.strides(), " have more than ", kMaxSpatial,
              " spatial dims that cannot be merged; pass .contiguous() tensors");
  for (int i = 0; i < kMaxSpatial; ++i) {
    const int from_inner = kMaxSpatial - 1 - i;
    const bool real = from_inner < static_cast<int>(merged.size());
    L.size[i] = real ? merged[from_inner].size : 1;
    for (int t = 0; t < L.ntensors; ++t) L.ss[t][i] = real ? merged[from_inner].stride[t] : 0;
  }
  return L;
}

}  // namespace neurosens
