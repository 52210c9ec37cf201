"""Build gig_fast: the Python package, the CPU C++ extension and (where possible) the CUDA one.

* ``gig_fast._C``      — always built: every ``csrc/<op>/<op>_cpu.cpp`` with OpenMP.
* ``gig_fast._C_cuda`` — built when ``nvcc`` and a CUDA build of torch are present, unless
  ``GIG_FAST_SKIP_CUDA=1``. Targets sm_80 and sm_90 (``GIG_FAST_CUDA_ARCH`` overrides, e.g. ``90``).

Each op registers its C++ entry points with ``TORCH_LIBRARY_FRAGMENT`` in its own source file, so
adding an op never touches a shared binding list; ``csrc/bind_*.cpp`` only make the modules importable.
"""
import glob
import os
import shutil

from setuptools import setup

# torch guesses CUDA_HOME from the nvcc on PATH (/usr/local/bin/nvcc → /usr/local), where the CUDA
# libraries are not; point it at the toolkit folder before torch reads it.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _want_cuda():
    if os.environ.get("GIG_FAST_SKIP_CUDA", "0") == "1":
        return False
    has_nvcc = CUDA_HOME is not None and (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return bool(has_nvcc) and torch.version.cuda is not None


def _cuda_arch_flags():
    archs = os.environ.get("GIG_FAST_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]


def extensions():
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is chosen by torch (C++20 for torch >= 2.10)
    exts = [
        CppExtension(
            "gig_fast._C",
            ["csrc/bind_cpu.cpp"] + _sources("csrc/*/*_cpu.cpp"),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if _want_cuda():
        exts.append(
            CUDAExtension(
                "gig_fast._C_cuda",
                ["csrc/bind_cuda.cpp"] + _sources("csrc/*/*_cuda.cu"),
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={
                    "cxx": ["-O3"],
                    "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] + _cuda_arch_flags()
                    # the register/spill report of every kernel, for tuning on the GPU
                    + (["-Xptxas=-v"] if os.environ.get("GIG_FAST_PTXAS_VERBOSE") == "1" else []),
                },
            )
        )
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
