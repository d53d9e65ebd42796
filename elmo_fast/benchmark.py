"""The microbenchmark driver behind `elmo-fast bench` and `make bench`.

Every case times elmo_fast against its baseline in the same run (the reference is AllenNLP's
algorithm in plain PyTorch), with the thread count pinned, and reports the median of repeats.
"""
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from elmo_fast import functional, reference

# Published model sizes (spec §1): LSTM cell size n, projection P, highway layers; all share the
# 2048-filter char-CNN (F = 2048).
MODELS = {
    "small": dict(dim=1024, projection_dim=128, n_highway=1),
    "medium": dict(dim=2048, projection_dim=256, n_highway=1),
    "original": dict(dim=4096, projection_dim=512, n_highway=2),
}
NUM_FILTERS = 2048


@dataclass
class Result:
    op: str
    mode: str  # "forward" or "forward+backward"
    model: str
    shape: str
    dtype: str
    threads: int
    impl: str
    median_s: float
    repeats: int
    tokens: int
    baseline: Optional[str] = None
    speedup: Optional[float] = None
    extra: Dict[str, float] = field(default_factory=dict)


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _highway_case(model: str, batch: int, words: int, dtype: torch.dtype, backward: bool):
    layers = MODELS[model]["n_highway"]
    n, f = batch * (words + 2), NUM_FILTERS  # tokens incl. BOS/EOS
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, f, generator=gen).to(dtype)
    weights = [(torch.randn(2 * f, f, generator=gen) / f**0.5).to(dtype) for _ in range(layers)]
    biases = [torch.randn(2 * f, generator=gen).to(dtype) for _ in range(layers)]
    if backward:
        for t in [x, *weights, *biases]:
            t.requires_grad_(True)
    grad = torch.randn(n, f, generator=gen).to(dtype)

    def runner(fn):
        def run():
            out = fn(x, weights, biases)
            if backward:
                torch.autograd.grad(out, [x, *weights, *biases], grad)
        return run

    return n, {"reference": runner(reference.highway), "elmo_fast": runner(functional.highway)}


CASES = {"highway": _highway_case}


def run(ops: List[str], models: List[str], shapes: List[tuple], threads: List[int], modes: List[str],
        dtype: torch.dtype = torch.float32, repeats: int = 3, progress: Callable[[str], None] = print) -> List[Result]:
    results = []
    saved_threads = torch.get_num_threads()
    try:
        for op in ops:
            for model in models:
                for batch, words in shapes:
                    for mode in modes:
                        tokens, impls = CASES[op](model, batch, words, dtype, mode == "forward+backward")
                        for nthreads in threads:
                            torch.set_num_threads(nthreads)
                            times = {name: time_call(fn, repeats) for name, fn in impls.items()}
                            base = times["reference"]
                            for name, t in times.items():
                                r = Result(op, mode, model, f"{batch}x{words}", str(dtype).replace("torch.", ""),
                                           nthreads, name, t, repeats, tokens, "reference", base / t)
                                results.append(r)
                            progress(format_row(results[-1]))
    finally:
        torch.set_num_threads(saved_threads)
    return results


def format_row(r: Result) -> str:
    return (f"{r.op:<16} {r.mode:<17} {r.model:<9} {r.shape:>6} {r.dtype:<8} {r.threads:>2} thr "
            f"{r.impl:<10} {r.median_s * 1e3:9.2f} ms  {r.tokens / r.median_s:10.0f} tok/s  x{r.speedup:.2f}")


def table(results: List[Result]) -> str:
    header = (f"{'op':<16} {'mode':<17} {'model':<9} {'shape':>6} {'dtype':<8} {'threads':>7} "
              f"{'impl':<10} {'median':>12}  {'throughput':>16}  vs reference")
    return "\n".join([header] + [format_row(r) for r in results])


def machine() -> Dict[str, str]:
    """What the figures were measured on (CPU model and the flags that decide GEMM speed)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": str(os.cpu_count())}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["cpu_family"] = fields.get("CPU family", "").strip()
        flags = fields.get("Flags", "").split()
        info["cpu_flags"] = " ".join(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        timeout=10, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_json(results: List[Result], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "results": [asdict(r) for r in results]}, f, indent=1)
