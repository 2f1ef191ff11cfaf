"""kvfuse build: the pure-Python package always; the CUDA extension ``kvfuse._C`` when possible.

The extension is built only with a CUDA build of torch and nvcc available. ``KVFUSE_SKIP_CUDA_BUILD=1``
skips it. ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0a") and ``MAX_JOBS`` are honoured. Nothing is
downloaded during the build.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_extension():
    if os.environ.get("KVFUSE_SKIP_CUDA_BUILD", "0") == "1":
        return None, "KVFUSE_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 - any import failure means no extension
        return None, f"torch is not importable at build time ({e}); use --no-build-isolation"
    if torch.version.cuda is None:
        return None, "torch is a CPU-only build"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None, "nvcc not found (set CUDA_HOME)"
    # csrc/*.cu (checks + dtype dispatch) and csrc/bindings.cpp; the kernels are csrc/include/kvfuse/*.cuh
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return None, "no CUDA sources"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    ext = CUDAExtension(
        name="kvfuse._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    return (ext, BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)), None


ext, why_not = cuda_extension()
kwargs = {}
if ext is not None:
    kwargs = dict(ext_modules=[ext[0]], cmdclass={"build_ext": ext[1]})
else:
    print(f"kvfuse: building without the CUDA extension: {why_not}", file=sys.stderr)

setup(
    packages=find_packages(include=["kvfuse", "kvfuse.*"]),
    **kwargs,
)
