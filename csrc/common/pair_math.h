// Element-level math shared by the CPU and CUDA kernels (host and device).
//
// Forward: every metric is derived from six sums per (sample, neuron), so one pass over a and b
// serves them all. Backward: every metric's gradient is a per-(sample, neuron) linear mix of a, b
// and sign(a - b), so one elementwise pass writes both gradients.
#pragma once

#include <c10/macros/Macros.h>

namespace neurosens {

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

template <typename acc_t>
C10_HOST_DEVICE inline void accumulate_pair(acc_t x, acc_t y, acc_t& abs_diff, acc_t& sq_diff, acc_t& dot,
                                            acc_t& sq_a, acc_t& sq_b, acc_t& abs_a) {
  const acc_t d = x - y;
  abs_diff += d < acc_t(0) ? -d : d;
  sq_diff += d * d;
  dot += x * y;
  sq_a += x * x;
  sq_b += y * y;
  abs_a += x < acc_t(0) ? -x : x;
}

template <typename acc_t>
C10_HOST_DEVICE inline void pair_grad(const acc_t* coef, acc_t x, acc_t y, acc_t& gx, acc_t& gy) {
  const acc_t d = x - y;
  const acc_t s = coef[kSign] * static_cast<acc_t>((d > acc_t(0)) - (d < acc_t(0)));
  gx = coef[kAA] * x + coef[kAB] * y + s;
  gy = coef[kBA] * x + coef[kBB] * y - s;
}

}  // namespace neurosens
