// The CUDA extension module `gig_fast._C_cuda`. Each op registers its entry points in its own .cu file
// with TORCH_LIBRARY_FRAGMENT(gig_fast_cuda, m); importing this module loads them into torch.ops.gig_fast_cuda.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gig_fast CUDA kernels; the ops live in torch.ops.gig_fast_cuda";
}
