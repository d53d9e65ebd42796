"""Builds elmo_fast._C: a CUDAExtension when torch has CUDA and nvcc is found (no GPU is needed to
compile), else a CppExtension. ELMO_FAST_CUDA=1 requires CUDA, 0 disables it, unset = auto.

Always build with `pip install --no-build-isolation ...`: the extension must be compiled against
the torch that will import it (torch is deliberately not in build-system.requires).
"""
import glob
import importlib.util
import os
import sys

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch guesses CUDA_HOME from `which nvcc`, which may be a wrapper script outside the toolkit;
# settle it before torch.utils.cpp_extension computes it at import.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

# Without build isolation the installed setuptools reads pyproject.toml, and before 77 it rejects the
# SPDX string form of project.license with a schema dump that does not say what to do.
with open(os.path.join(ROOT, "pyproject.toml")) as f:
    spdx_license = any(line.startswith('license = "') for line in f)
if spdx_license and int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(
        f"elmo_fast: setuptools {setuptools.__version__} is too old to read pyproject.toml's license field "
        "(PEP 639 needs setuptools >= 77):\n    pip install 'setuptools>=77' wheel"
    )

try:
    import torch
except ImportError:
    sys.exit(
        "elmo_fast: torch is not importable in the build environment. The extension must be built "
        "against the torch you run it with; install torch first, then build without isolation:\n"
        "    pip install --no-build-isolation -e .      (or: pip install --no-build-isolation .)"
    )
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100, H100 (+PTX so newer GPUs JIT from sm_90)


def default_cuda_archs() -> str:
    """DEFAULT_CUDA_ARCHS, plus the archs of the GPUs visible at build time that it has no code for
    (a T4 or V100 user's `pip install` then builds for their GPU). The rules are in
    elmo_fast/_cuda_support.py, loaded by path: the package itself is not built yet."""
    capabilities = []
    if torch.cuda.is_available():
        capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    spec = importlib.util.spec_from_file_location("_cuda_support", os.path.join(ROOT, "elmo_fast", "_cuda_support.py"))
    cuda_support = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_support)
    return cuda_support.archs_with_visible_gpus(DEFAULT_CUDA_ARCHS, capabilities)


def want_cuda() -> bool:
    force = os.environ.get("ELMO_FAST_CUDA", "").strip()
    if force not in ("", "0", "1"):
        sys.exit(f"elmo_fast: ELMO_FAST_CUDA must be 0, 1 or unset, got {force!r}")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    have = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    if force == "1" and not have:
        sys.exit(
            "elmo_fast: ELMO_FAST_CUDA=1 but a CUDA build is impossible here: "
            f"torch {torch.__version__} has torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            + ("" if nvcc is None else f", nvcc {'found' if os.path.exists(nvcc) else 'missing'} at {nvcc}")
            + ". Install a CUDA build of torch and the CUDA toolkit (nvcc), or set CUDA_HOME."
        )
    return have if force == "" else force == "1"


def c_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def extension():
    cuda = want_cuda()
    debug = os.environ.get("ELMO_FAST_DEBUG") == "1"
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    macros = [("Py_LIMITED_API", "0x030A0000"), ("ELMO_FAST_TORCH_VERSION", c_string(torch.__version__))]
    # Without -g the build is ~25% faster and the .so ~10x smaller; ELMO_FAST_DEBUG=1 restores it.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # Both let gcc vectorize the math in the pointwise loops (torch builds with them too). Without
    # -fno-trapping-math a float compare that runs only on one side of a branch (a clip, a select) may
    # not be speculated, so the AVX2 clones stayed scalar; only AVX-512's masked clones vectorized
    # (the float LSTM pointwise pass was 6x slower on an AVX2 Zen 2, Note [CPU multiversioning]).
    cxx += ["-fno-math-errno", "-fno-trapping-math"]
    # ATen's at::parallel_for is inline: without -fopenmp in *our* translation units it compiles to a
    # serial loop and torch.set_num_threads never reaches our kernels. Linking -fopenmp names
    # libgomp.so.1, which resolves to the copy torch ships and has already loaded (same soname), so
    # there is one OpenMP runtime and torch's thread count governs it.
    cxx += ["-fopenmp"]
    link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    if not cuda:
        return CppExtension("elmo_fast._C", sources, include_dirs=include_dirs, define_macros=macros,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True)
    # No GPU at build time means torch cannot guess the archs (and crashes); default to a short list.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_archs()
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
                + sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_glue.cpp")))]
    macros += [("WITH_CUDA", None), ("ELMO_FAST_CUDA_ARCHS", c_string(archs))]
    nvcc = ["-O3", "-lineinfo"] + (["-G"] if debug else [])
    return CUDAExtension("elmo_fast._C", sources, include_dirs=include_dirs, define_macros=macros,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
                         py_limited_api=True)


setup(
    packages=find_packages(include=["elmo_fast", "elmo_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
