"""The simulated CUDA kernel tests again, with the simulator built under a sanitizer: AddressSanitizer
and UndefinedBehaviorSanitizer (compute-sanitizer's memcheck, on the CPU: an out-of-bounds read or write
of a kernel, in global or shared memory, fails the run with the kernel's source line), and
ThreadSanitizer (its racecheck: the block's threads are OS threads and the kernel's barriers are real
ones, so two accesses to the same address with no barrier between them, one a write, are a data race).
ThreadSanitizer runs a few cases per kernel: it is slow, and a race shows in any of them. The ASan run
is every simulated test, so a session that collects this file leaves their unsanitized runs out
(tests/conftest.py)."""
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

import cuda_sim

TESTS = pathlib.Path(__file__).resolve().parent
SIM_TESTS = sorted(str(p) for p in TESTS.glob("test_cuda_sim_*.py") if p.name != pathlib.Path(__file__).name)
# One or two cases of every kernel family: the widest layouts (several blocks, warps, tiles, passes).
TSAN_CASES = [
    "test_cuda_sim_pointwise.py::test_highway_kernels[5-130-torch.bfloat16]",
    "test_cuda_sim_pointwise.py::test_lstm_pointwise_kernels[0.5-0.3-5-130-torch.float32]",
    "test_cuda_sim_char_cnn.py::test_simt_forward[wide-torch.float32]",
    "test_cuda_sim_char_cnn.py::test_tensor_core_forward[wide-torch.bfloat16]",
    "test_cuda_sim_char_cnn.py::test_tensor_core_forward[elmo-torch.float16]",
    "test_cuda_sim_char_cnn.py::test_backward[elmo-torch.float32]",
    "test_cuda_sim_char_cnn.py::test_forward_propagates_nan[tensor_core-torch.bfloat16]",
    "test_cuda_sim_lstm_persistent.py::test_persistent_forward[torch.bfloat16-ragged_reverse_clips]",
    "test_cuda_sim_lstm_persistent.py::test_persistent_forward[torch.bfloat16-col_and_unit_groups]",
    "test_cuda_sim_lstm_persistent.py::test_persistent_forward[torch.float16-split]",
]
OPTIONS = {
    "address": dict(ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86",
                    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87"),
    # torch itself on one thread: libgomp is not instrumented, so its teams would look racy to TSan.
    "thread": dict(TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1"),
}


def _start(sanitizer):
    """Starts the sanitized run in a subprocess; returns it, or a reason to skip."""
    preload = cuda_sim.sanitizer_preload(sanitizer)
    if preload is None:
        return f"g++ has no {sanitizer} sanitizer runtime"
    selection = [str(TESTS / case) for case in TSAN_CASES] if sanitizer == "thread" else SIM_TESTS
    env = dict(os.environ, LD_PRELOAD=preload, ELMO_FAST_SIM_SANITIZE=sanitizer, **OPTIONS[sanitizer])
    # -s: a sanitizer report goes to stderr as it happens (the process exits before pytest would print it).
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider", *selection],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_simulated_kernels_under_sanitizers():
    """ASan and TSan side by side: each run is mostly one busy thread (building its library, then
    simulated threads that take turns at barriers), so on a 2-core CI machine the pair costs about one."""
    reason = cuda_sim.unavailable()
    if reason:
        pytest.skip(f"CUDA simulator: {reason}")
    runs = {sanitizer: _start(sanitizer) for sanitizer in ("address", "thread")}
    outputs = {}
    for sanitizer, run in runs.items():
        if isinstance(run, str):
            continue
        try:
            outputs[sanitizer] = (run.communicate(timeout=1500)[0], run.returncode)
        except subprocess.TimeoutExpired:
            run.kill()
            outputs[sanitizer] = (run.communicate()[0] + "\n(timed out after 1500 s)", -1)
    if not outputs:
        pytest.skip("; ".join(runs.values()))
    for run in runs.values():
        if isinstance(run, str):  # the other sanitizer ran: say, in the warnings summary, which did not
            warnings.warn(f"simulated kernels not run under this sanitizer: {run}")
    for sanitizer, (output, returncode) in outputs.items():
        assert returncode == 0, f"{sanitizer}:\n{output[-10000:]}"
        assert " passed" in output and "Sanitizer" not in output, f"{sanitizer}:\n{output[-10000:]}"
