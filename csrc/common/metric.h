// Metric names as the ops take them. The metric constants live in pair_math.h; the Python
// reference (neurosens/reference.py) uses the same values.
#pragma once

#include <c10/util/Exception.h>

#include <string>

#include "common/pair_math.h"

namespace neurosens {

inline Metric parse_metric(const std::string& name, const char* op, const char* arg) {
  if (name == "l1") return Metric::L1;
  if (name == "l2") return Metric::L2;
  if (name == "cosine") return Metric::Cosine;
  TORCH_CHECK_VALUE(false, op, ": unknown ", arg, "='", name, "'; expected one of 'l1', 'l2', 'cosine'");
}

}  // namespace neurosens
