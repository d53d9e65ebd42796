"""The CUDA kernels of csrc/cuda, run on the CPU.

Note [CUDA simulator]
No session so far has had a GPU, so the kernels would otherwise first run on the device machine, inside
its few minutes. This package compiles the real .cu files with g++ instead: translate.py rewrites the
launches and shared-memory declarations, and cuda_sim.h supplies the execution model (threads of a block
as OS threads with real barriers, warp collectives and WMMA as checked warp-wide operations, cooperative
launches with a grid barrier). drivers.cpp exposes every launcher to ctypes with raw pointers, so tests
pass CPU tensors' data and compare against elmo_fast.reference. Built with a sanitizer (sanitize="address" or
"thread"), the library must run in a process that preloads its runtime (test_cuda_sim_sanitized.py).
What it does not model: timing, memory coherence between blocks (a missing __ldcg is not seen), the
fragment layout of real WMMA (code that depends on it would pass here), bank conflicts, occupancy.
"""
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}

sys.path.insert(0, str(HERE))
from translate import translate  # noqa: E402


def cuda_include():
    """The CUDA toolkit's include dir (only headers are used: the fp16/bf16 types, cuda_runtime_api.h)."""
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (pathlib.Path(root) / "include" / "cuda_bf16.h").exists():
            return pathlib.Path(root) / "include"
    return None


def unavailable():
    """Why the simulator cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "no g++"
    if cuda_include() is None:
        return "no CUDA headers (CUDA_HOME or /usr/local/cuda)"
    return None


def _sources():
    yield HERE / "cuda_sim.h", (HERE / "cuda_sim.h").read_text()
    yield HERE / "drivers.cpp", (HERE / "drivers.cpp").read_text()
    for cu in KERNELS:
        yield cu, cu.read_text()
    for header in sorted((ROOT / "csrc" / "include" / "elmo_fast").iterdir()):
        yield header, header.read_text()


@functools.lru_cache(maxsize=None)
def library_path(sanitize=None):
    """Builds (once per source state) and returns the simulator library; sanitize: None, "address"
    (ASan + UBSan) or "thread" (TSan: a data race between simulated threads is a race in the kernel)."""
    flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
             f"-I{HERE}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{cuda_include()}"]
    if sanitize == "address":
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    elif sanitize == "thread":
        flags += ["-fsanitize=thread", "-fno-omit-frame-pointer"]
    elif sanitize is not None:
        raise ValueError(f"sanitize must be None, 'address' or 'thread', got {sanitize!r}")
    digest = hashlib.sha256(" ".join(flags).encode())
    translate_py = (HERE / "translate.py").read_text()
    digest.update(translate_py.encode())
    for path, text in _sources():
        digest.update(str(path.name).encode() + text.encode())
    out_dir = ROOT / "build" / "cuda_sim" / digest.hexdigest()[:16]
    lib = out_dir / "libcuda_sim.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    units = [HERE / "drivers.cpp"]
    for cu in KERNELS:
        cpp = out_dir / (cu.stem + "_sim.cpp")
        cpp.write_text(translate(cu.read_text(), filename=str(cu)))
        units.append(cpp)
    tmp = out_dir / f"libcuda_sim.{os.getpid()}.so"
    result = subprocess.run(["g++", *flags, *map(str, units), "-o", str(tmp)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError("building the CUDA simulator failed:\n" + result.stderr[-6000:])
    os.replace(tmp, lib)
    return lib


def _gcc_library(name):
    out = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def sanitizer_preload(sanitize):
    """LD_PRELOAD for a sanitized run (None when g++ lacks the runtime): libasan or libtsan, then
    libstdc++, so that the sanitizer's __cxa_throw interceptor finds the real one when a C++ library
    throws during import (triton does, under torch: a CHECK failure in ASan otherwise)."""
    runtime = _gcc_library({"address": "libasan.so", "thread": "libtsan.so"}[sanitize])
    if runtime is None:
        return None
    return ":".join(p for p in (runtime, _gcc_library("libstdc++.so.6")) if p)
