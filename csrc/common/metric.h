// Metric names and the constants that make each metric's edge cases explicit. The Python
// reference (neurosens/reference.py) uses the same values.
#pragma once

#include <c10/util/Exception.h>

#include <string>

namespace neurosens {

enum class Metric { L1, L2, Cosine };

// Floor of |a| * |b| in the cosine; both maps exactly zero count as identical (distance 0).
constexpr double kCosineEps = 1e-8;
// Floor of the benign map's mean |a| when distances are taken relative to it.
constexpr double kRelativeEps = 1e-6;

inline Metric parse_metric(const std::string& name, const char* op, const char* arg) {
  if (name == "l1") return Metric::L1;
  if (name == "l2") return Metric::L2;
  if (name == "cosine") return Metric::Cosine;
  TORCH_CHECK_VALUE(false, op, ": unknown ", arg, "='", name, "'; expected one of 'l1', 'l2', 'cosine'");
}

}  // namespace neurosens
