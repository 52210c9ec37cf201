// The CPU extension module `gig_fast._C`. Each op registers its entry points in its own source file
// with TORCH_LIBRARY_FRAGMENT(gig_fast_cpp, m); importing this module loads them into torch.ops.gig_fast_cpp.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gig_fast CPU kernels (C++/OpenMP); the ops live in torch.ops.gig_fast_cpp";
  m.def("num_threads", []() { return at::get_num_threads(); }, "threads used by the CPU kernels");
}
