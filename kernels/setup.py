"""Build the extension mcr_kernels._C (everything else about the package: pyproject.toml).

mcr_kernels._C is built from csrc/: the C++ CPU sources always, the CUDA sources when
torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME, else the toolkit behind
`nvcc` on PATH, following wrapper scripts). MCR_BUILD_CUDA=0 skips CUDA.

torch must be installed first and the build must see it:
    pip install --no-build-isolation -e ./kernels
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup


def find_cuda_root():
    """The CUDA toolkit root (the folder holding include/cuda_runtime.h), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:  # a wrapper script names the real nvcc: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            candidates += [os.path.dirname(bin_dir)
                           for bin_dir in re.findall(r"(/\S+)/nvcc\b", head.decode(errors="ignore"))]
    except OSError:
        pass
    for root in candidates:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


cuda_root = find_cuda_root()
if cuda_root and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = cuda_root  # read by torch.utils.cpp_extension at import

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit("mcr-kernels builds a torch extension: install torch first, then run "
             "`pip install --no-build-isolation -e ./kernels` so that the build sees it.")


def wheel_cuda_include_dirs():
    """Headers of the CUDA libraries shipped by pip's nvidia-* wheels (cuBLAS, cuSPARSE, ...):
    torch's CUDA headers include them, and a compiler-only toolkit lacks them."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


def native_extension():
    """The extension mcr_kernels._C and a note of what was skipped (or None)."""
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    cxx_flags = ["-O3"]
    skip = None
    if os.environ.get("MCR_BUILD_CUDA", "1") == "0":
        skip = "MCR_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        skip = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_root is None:
        skip = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if skip:
        ext = cpp_extension.CppExtension("mcr_kernels._C", cpp_sources,
                                         extra_compile_args={"cxx": cxx_flags})
        return ext, f"CUDA kernels of mcr_kernels._C skipped ({skip}); C++ CPU kernels built."
    # Explicit targets, whatever GPU the build machine has (torch would pick only that one):
    # A100 (sm_80), H100/H200 (sm_90), and sm_90 PTX for newer GPUs. TORCH_CUDA_ARCH_LIST overrides.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    ext = cpp_extension.CUDAExtension(
        "mcr_kernels._C", cpp_sources + cuda_sources,
        define_macros=[("MCR_WITH_CUDA", None)],
        include_dirs=wheel_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]})
    return ext, None


extension, skipped_note = native_extension()
if skipped_note:
    print(f"\n*** {skipped_note}\n", file=sys.stderr)

setup(  # metadata, dependencies and entry points: pyproject.toml
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
