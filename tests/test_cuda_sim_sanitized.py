"""The simulated CUDA kernel tests again, with the simulator built under AddressSanitizer and
UndefinedBehaviorSanitizer (compute-sanitizer's memcheck, on the CPU): any out-of-bounds read or write of
a kernel, in global or shared memory, or undefined behaviour fails the run with the kernel's source line."""
import os
import pathlib
import subprocess
import sys

import pytest

import cuda_sim

TESTS = pathlib.Path(__file__).resolve().parent


def test_simulated_kernels_under_address_sanitizer():
    reason = cuda_sim.unavailable()
    if reason:
        pytest.skip(f"CUDA simulator: {reason}")
    runtime = cuda_sim.asan_runtime()
    if runtime is None:
        pytest.skip("g++ has no libasan")
    files = sorted(str(p) for p in TESTS.glob("test_cuda_sim_*.py") if p.name != pathlib.Path(__file__).name)
    env = dict(os.environ, LD_PRELOAD=runtime, ELMO_FAST_SIM_SANITIZE="1",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                            env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert " passed" in output and "AddressSanitizer" not in output, output[-8000:]
