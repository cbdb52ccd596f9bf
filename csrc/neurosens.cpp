// Entry point of the extension: the op schemas and a small pybind11 module that reports what
// was built. Kernels register themselves per backend (cpu/, cuda/); the device-agnostic op
// bodies live in ops.cpp, the autograd of stabilize in autograd.cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include "common/launch.h"

TORCH_LIBRARY(neurosens, m) {
  m.def("_pair_stats(Tensor a, Tensor b, int channel_dim, int stats=63) -> Tensor");
  m.def(
      "_stabilize_grad(Tensor a, Tensor b, Tensor stats, Tensor weight, str metric, int channel_dim) "
      "-> (Tensor grad_a, Tensor grad_b)");
  m.def("neuron_distance(Tensor a, Tensor b, str metric=\"l1\", int channel_dim=1, bool relative=False) -> Tensor");
  m.def(
      "neuron_distance_per_sample(Tensor a, Tensor b, str metric=\"l1\", int channel_dim=1, bool relative=False) "
      "-> Tensor");
  m.def(
      "neuron_topk(Tensor a, Tensor b, int k, str metric=\"l1\", int channel_dim=1, bool relative=False, "
      "bool largest=True) -> (Tensor values, Tensor indices)");
  m.def(
      "stabilize(Tensor a, Tensor b, Tensor? indices, int k, str metric=\"l1\", str select_metric=\"l1\", "
      "int channel_dim=1) -> (Tensor loss, Tensor indices, Tensor stats)");
  m.def(
      "_stabilize_backward(Tensor grad, Tensor a, Tensor b, Tensor indices, Tensor stats, str metric, "
      "int channel_dim) -> (Tensor grad_a, Tensor grad_b)");
}

// The statistics are not differentiable: with inputs that require grad they return plain
// tensors. stabilize and its backward get their autograd in autograd.cpp.
TORCH_LIBRARY_IMPL(neurosens, Autograd, m) {
  for (const char* name : {"_pair_stats", "_stabilize_grad", "neuron_distance", "neuron_distance_per_sample", "neuron_topk"})
    m.impl(name, torch::CppFunction::makeFallthrough());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "neurosens fused neuron-sensitivity kernels";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def(
      "launch_config",
      [](const std::string& kernel, int64_t N, int64_t C, int64_t D, int64_t sms) {
        neurosens::Launch l;
        if (kernel == "stats_columns")
          l = neurosens::stats_columns_launch(N, C, D, sms);
        else if (kernel == "stats_rows")
          l = neurosens::stats_rows_launch(N, C, D, sms);
        else if (kernel == "elementwise")
          l = neurosens::elementwise_launch(N * C * D, sms);
        else
          throw pybind11::value_error("unknown kernel '" + kernel + "'");
        return pybind11::make_tuple(pybind11::make_tuple(l.grid[0], l.grid[1], l.grid[2]), l.threads, l.segs);
      },
      "(grid, threads per block, segments per map) of a CUDA kernel for N samples, C neurons and maps of D "
      "elements on a GPU with `sms` multiprocessors; computed on the host, no GPU needed.",
      pybind11::arg("kernel"), pybind11::arg("N"), pybind11::arg("C"), pybind11::arg("D"), pybind11::arg("sms"));
}
