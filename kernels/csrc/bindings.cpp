// Python bindings of the native kernels: the module mcr_kernels._C.
#include <torch/extension.h>

#include "patch_drop.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mcr native kernels (C++ CPU, and CUDA when built with it)";
#ifdef MCR_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("gather_tokens_cuda", &mcr::gather_tokens_cuda, "out[b, j] = x[b, ids_keep[b, j]] (CUDA)");
  m.def("scatter_tokens_cuda", &mcr::scatter_tokens_cuda, "backward of gather_tokens (CUDA)");
  m.def("restore_tokens_cuda", &mcr::restore_tokens_cuda, "MAE restore with mask tokens (CUDA)");
  m.def("restore_tokens_backward_cuda", &mcr::restore_tokens_backward_cuda, "backward of restore_tokens (CUDA)");
#else
  m.attr("with_cuda") = false;
#endif
  m.def("gather_tokens_cpu", &mcr::gather_tokens_cpu, "out[b, j] = x[b, ids_keep[b, j]] (CPU)");
  m.def("scatter_tokens_cpu", &mcr::scatter_tokens_cpu, "backward of gather_tokens (CPU)");
  m.def("restore_tokens_cpu", &mcr::restore_tokens_cpu, "MAE restore with mask tokens (CPU)");
  m.def("restore_tokens_backward_cpu", &mcr::restore_tokens_backward_cpu, "backward of restore_tokens (CPU)");
}
