"""Weight-gradient GEMM a^T @ b (linear.h's matmul_tn) at ELMo's shapes: torch's mm against every
route to torch's own oneDNN that the dispatcher offers, interleaved, with the machine's foreign load.

    python bench/cpu_gemm_tn.py [--threads 1 2] [--dtypes float32 bfloat16] [--repeats 7]

Pure torch (no elmo_fast import). Results and conclusions: bench/results/cpu-gemm-weight-grad-*.md.
Routes: oneDNN's linear wants a contiguous input, so a^T is copied (the cost that decides the race);
b^T goes in as a strided weight (oneDNN reorders it itself) or packed per call; the inner-product
backward-weights op needs oneDNN-layout inputs (to_mkldnn copies, float32 only).
"""
import argparse
import os
import resource
import statistics
import time

import torch

LP = torch.ops.mkldnn._linear_pointwise
PACK = torch.ops.mkldnn._reorder_linear_weight
ROUTES = {
    "mm": lambda a, b: torch.mm(a.t(), b),
    "mm(a^T contiguous)": lambda a, b: torch.mm(a.t().contiguous(), b),
    "oneDNN strided W": lambda a, b: LP(a.t(), b.t(), None, "none", [], None),
    "oneDNN packed W": lambda a, b: LP(a.t(), PACK(b.t().contiguous(), None), None, "none", [], None),
    "oneDNN bwd-weights": lambda a, b: torch.ops.aten.mkldnn_linear_backward_weights(
        a.to_mkldnn(), b.to_mkldnn(), torch.empty(a.size(1), b.size(1), dtype=a.dtype), False)[0],
}
# (what, rows M, a's columns N, b's columns K): dW = a^T b is (N, K).
SHAPES = [("LSTM dW_ih/dW_hh, 16 x 22", 352, 16384, 512), ("LSTM dW_proj, 16 x 22", 352, 512, 4096),
          ("LSTM dW_ih/dW_hh, 64 x 22", 1408, 16384, 512), ("LSTM dW_proj, 64 x 22", 1408, 512, 4096),
          ("highway, N = 352", 352, 4096, 2048), ("highway, N = 1408", 1408, 4096, 2048),
          ("highway, N = 2176", 2176, 4096, 2048)]


def busy_seconds():
    v = list(map(int, open("/proc/stat").readline().split()[1:9]))
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    print("| dtype | threads | shape | route | best ms | median ms | GFLOP/s (best) | vs mm | max rel. diff "
          "| foreign load |")
    print("|---|--:|---|---|--:|--:|--:|--:|--:|--:|")
    for dtype in [getattr(torch, d) for d in args.dtypes]:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for what, m, n, k in SHAPES:
                gen = torch.Generator().manual_seed(0)
                a, b = torch.randn(m, n, generator=gen).to(dtype), torch.randn(m, k, generator=gen).to(dtype)
                want = a.double().t() @ b.double()
                routes, diff = {}, {}
                for name, fn in ROUTES.items():
                    try:
                        got = fn(a, b)  # also the warm-up
                    except RuntimeError:
                        continue  # route absent for this dtype / torch
                    routes[name] = fn
                    diff[name] = ((got.double() - want).abs().max() / want.abs().max()).item()
                times = {name: [] for name in routes}
                wall, busy, own = time.time(), busy_seconds(), own_seconds()
                for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits all routes
                    for name, fn in routes.items():
                        t0 = time.perf_counter()
                        fn(a, b)
                        times[name].append(time.perf_counter() - t0)
                load = max(0.0, busy_seconds() - busy - (own_seconds() - own)) / (time.time() - wall)
                mm_best = min(times["mm"])
                for name, ts in times.items():
                    best = min(ts)
                    print(f"| {str(dtype)[6:]} | {threads} | {what} | {name} | {1e3 * best:.2f} | "
                          f"{1e3 * statistics.median(ts):.2f} | {2 * m * n * k / best / 1e9:.0f} | "
                          f"{best / mm_best:.2f} | {diff[name]:.1e} | {load:.2f} |", flush=True)


if __name__ == "__main__":
    main()
