"""The extension's build facts and the loader's error messages."""
import concurrent.futures
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

import elmo_fast
from elmo_fast import _loader


def test_build_info_reports_the_build():
    info = elmo_fast.build_info()
    assert set(info) >= {"version", "torch", "cuda", "cuda_arch", "openmp", "compiler"}
    assert info["version"] == elmo_fast.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert isinstance(info["cuda_arch"], list)
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("elmo_fast::highway", "CUDA")
    assert info["cuda"] == has_cuda_kernel
    assert bool(info["cuda_arch"]) == info["cuda"]


def test_kernels_run_on_torchs_threads():
    """Our at::parallel_for loops use torch's OpenMP threads (built with -fopenmp, one OpenMP runtime)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend is not OpenMP")
    assert elmo_fast.build_info()["openmp"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.ops.elmo_fast._parallel_for_threads(64) == 1
        torch.set_num_threads(2)
        assert torch.ops.elmo_fast._parallel_for_threads(64) == 2
    finally:
        torch.set_num_threads(threads)


def test_every_op_has_a_cpu_kernel():
    for op in ["highway", "highway_backward", "lstm_projection", "lstm_projection_backward", "lstm_bidirectional",
               "lstm_bidirectional_backward", "char_cnn", "char_cnn_backward"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"elmo_fast::{op}", "CPU"), op


POINTWISE_LOOPS = ("forward_rows_dispatch", "backward_rows_dispatch", "forward_rows_any", "backward_rows_any",
                   "mix_rows_any", "token_max_any")


@pytest.mark.skipif(platform.machine() != "x86_64" or not (shutil.which("nm") and shutil.which("objdump")),
                    reason="needs x86-64 and binutils")
def test_pointwise_loops_are_vectorized_in_their_avx2_clones():
    """Note [CPU multiversioning]: the LSTM and highway pointwise loops and the char-CNN's max must use
    256-bit vectors in their AVX2 (x86-64-v3) clones. Without -fno-trapping-math gcc left them scalar, and on AVX2 machines the
    LSTM's pointwise pass took 6x longer; nothing else would notice."""
    lib = elmo_fast._C.__file__
    symbols = subprocess.run(["nm", lib], capture_output=True, text=True, check=True).stdout.split()
    clones = [s for s in symbols if s.endswith(".arch_x86_64_v3") and any(n in s for n in POINTWISE_LOOPS)]
    if not clones:
        pytest.skip("built without target_clones (not gcc, or ELMO_FAST_NO_MULTIVERSION)")
    assert len(clones) >= 10, clones  # LSTM forward/backward and highway forward/mix/backward, float and bf16
    scalar = []
    for symbol in clones:
        code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--disassemble={symbol}", lib],
                              capture_output=True, text=True, check=True).stdout
        if "ymm" not in code:
            scalar.append(symbol)
    assert not scalar, f"AVX2 clones without a single 256-bit instruction: {scalar}"


def nvcc_path():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else None


CSRC = Path(__file__).resolve().parents[1] / "csrc"


def nvcc(*args):
    """nvcc with the project's include dirs and C++ standard (the .cu files need no torch headers)."""
    return subprocess.run([nvcc_path(), "-std=c++17", f"-I{CSRC}", f"-I{CSRC / 'include'}", *args],
                          capture_output=True, text=True)


@pytest.mark.skipif(not elmo_fast.build_info()["cuda"] or nvcc_path() is None, reason="needs a CUDA build and nvcc")
@pytest.mark.parametrize("source", ["char_cnn_tc.cu", "lstm_persistent.cu"])
def test_tensor_core_kernels_build_for_archs_below_sm80(tmp_path, source):
    """A pre-Ampere arch in TORCH_CUDA_ARCH_LIST (a T4's 7.5) must still build: bf16 WMMA does not exist
    there, so the kernel bodies are left out (ELMO_FAST_TENSOR_CORE_ARCH) and the glue never launches them."""
    result = nvcc("-arch=sm_75", "-c", str(CSRC / "cuda" / source), "-o", str(tmp_path / "kernel.o"))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr


def _ptxas_report(source, arch):
    """ptxas's resource report of one .cu file for one arch (a cubin only: no host compile, no link)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = nvcc("-cubin", f"-arch={arch}", "--resource-usage", str(source), "-o", f"{tmp}/k.cubin")
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def parse_ptxas_report(report):
    """{function: (stack frame bytes, spill store bytes, spill load bytes)} from ptxas's -v lines."""
    functions = {}
    current = None
    for line in report.splitlines():
        heading = re.search(r"Function properties for (\S+)", line)
        if heading:
            current = heading.group(1)
            continue
        sizes = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if sizes and current is not None:
            functions[current] = tuple(int(n) for n in sizes.groups())
            current = None
    return functions


def test_parse_ptxas_report():
    report = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 124 registers, used 1 barriers
ptxas info    : Function properties for _Z1gv
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads"""
    assert parse_ptxas_report(report) == {"_Z1kv": (0, 0, 0), "_Z1gv": (16, 8, 4)}


@pytest.mark.skipif(not elmo_fast.build_info()["cuda"] or nvcc_path() is None, reason="needs a CUDA build and nvcc")
def test_kernels_do_not_spill():
    """Every kernel, for both archs the wheel targets, keeps its state in registers: no spill to local
    memory and no stack frame (a dynamically indexed local array, or a register budget the launch bounds
    cannot meet, would put it there, and the persistent LSTM's weights-on-chip design depends on it).
    ptxas's numbers need no GPU, so a regression shows in CI and not in the GPU session's few minutes."""
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    jobs = [(source, arch) for source in sources for arch in ("sm_80", "sm_90")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(lambda job: _ptxas_report(*job), jobs))
    offenders = {}
    for (source, arch), report in zip(jobs, reports):
        functions = parse_ptxas_report(report)
        assert functions, f"no ptxas report for {source.name} on {arch}:\n{report}"
        for name, sizes in functions.items():
            if any(sizes):
                offenders[f"{source.name} {arch} {name}"] = sizes
    assert not offenders, f"(stack frame, spill stores, spill loads) in bytes: {offenders}"


def test_torch_version_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ELMO_FAST_ALLOW_TORCH_MISMATCH", raising=False)
    _loader.check_torch_version("2.14.1+cu130", "2.14.1+cu130")
    with pytest.raises(ImportError, match=r"(?s)built against torch 2.13.0.*torch 2.14.1\+cu130 is installed.*"
                                          r"--no-build-isolation"):
        _loader.check_torch_version("2.13.0", "2.14.1+cu130")
    monkeypatch.setenv("ELMO_FAST_ALLOW_TORCH_MISMATCH", "1")
    _loader.check_torch_version("2.13.0", "2.14.1+cu130")


def test_undefined_symbol_is_explained():
    error = _loader.explain_import_error(ImportError("/x/_C.abi3.so: undefined symbol: _ZN3c104cuda9SetDeviceEa"))
    assert "built against another torch" in str(error) and "--no-build-isolation" in str(error)
    missing = _loader.explain_import_error(ImportError("No module named 'elmo_fast._C'"))
    assert "is not built" in str(missing)
    other = ImportError("something else")
    assert _loader.explain_import_error(other) is other
