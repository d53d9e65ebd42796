"""CPU GEMM layer benchmark: torch's mm vs elmo_fast's layer (oneDNN, packed weights) at ELMo's
shapes, and the highway op with each forced path against reference.highway.

    python bench/cpu_gemm.py [--threads 1 2] [--dtype float32 bfloat16] [--repeats 7] [--json bench/results/x.json]

Prints markdown tables; every number is the median of --repeats timed runs after one warm-up.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

# Benchmark this checkout's elmo_fast, not whichever one is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import elmo_fast  # noqa: F401
from elmo_fast import functional as F
from elmo_fast import reference as R

OPS = torch.ops.elmo_fast
# (M, K, N, what)
SHAPES = [(16, 512, 16384, "LSTM recurrent step, batch 16"), (16, 4096, 512, "projection step, batch 16"),
          (352, 512, 16384, "hoisted input GEMM, 16 x 22"), (1408, 2048, 4096, "highway layer, 64 x 22 tokens"),
          (1, 512, 16384, "recurrent step, batch 1"), (1, 4096, 512, "projection step, batch 1")]
SMALL = [(16, 64, 64), (64, 64, 64), (16, 128, 128), (64, 128, 128), (16, 256, 256), (256, 256, 256)]


def cpu_facts():
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.*)", out)
    flags = re.search(r"Flags:\s*(.*)", out)
    wanted = sorted(f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx512", "amx", "avx2")))
    return (model.group(1).strip() if model else "?"), wanted


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_rows(repeats, dtype=torch.float32):
    rows = []
    for m, k, n, what in SHAPES:
        x, w, b = (t.to(dtype) for t in (torch.randn(m, k), torch.randn(n, k), torch.randn(n)))
        out = torch.empty(m, n, dtype=dtype)
        gflop = 2 * m * n * k / 1e9
        mm = gflop / median_time(lambda: torch.addmm(b, x, w.t(), out=out), repeats)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        raw = gflop / median_time(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], None), repeats)
        ours = {}
        for mode in ["onednn", "auto"]:
            OPS._set_cpu_gemm(mode)
            OPS._cpu_gemm_linear(x, w, b)  # first sight (auto packs at the second)
            ours[mode] = gflop / median_time(lambda: OPS._cpu_gemm_linear(x, w, b), repeats)
        pack_ms = 1e3 * median_time(lambda: torch.ops.mkldnn._reorder_linear_weight(w, None), 3)
        rows.append(dict(shape=f"{m} x {k} x {n}", what=what, mm=mm, onednn_raw=raw, layer_onednn=ours["onednn"],
                         layer_auto=ours["auto"], pack_ms=pack_ms))
    return rows


def small_rows(repeats):
    rows = []
    for m, k, n in SMALL:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        res = {}
        for mode in ["mm", "onednn"]:
            OPS._set_cpu_gemm(mode)
            res[mode] = 1e6 * median_time(lambda: [OPS._cpu_gemm_linear(x, w, b) for _ in range(100)], repeats) / 100
        rows.append(dict(shape=f"{m} x {k} x {n}", mnk=m * n * k, mm_us=res["mm"], onednn_us=res["onednn"]))
    return rows


def highway_rows(repeats, n=64 * 34, f=2048, layers=2):
    torch.manual_seed(0)
    x = torch.randn(n, f)
    ws = [(torch.randn(2 * f, f) / f**0.5).requires_grad_() for _ in range(layers)]
    bs = [torch.randn(2 * f).requires_grad_() for _ in range(layers)]
    variants = {"reference": lambda *a: R.highway(*a)}
    for mode in ["mm", "onednn", "auto"]:
        variants[f"elmo_fast {mode}"] = (lambda mode: lambda *a: (OPS._set_cpu_gemm(mode), F.highway(*a))[1])(mode)
    rows = []
    for name, fn in variants.items():
        with torch.no_grad():
            fwd = median_time(lambda: fn(x, ws, bs), repeats)

        def fwd_bwd():
            xg = x.detach().requires_grad_()
            fn(xg, ws, bs).sum().backward()

        # Training: weights change every step; an in-place bump per iteration makes each run re-pack,
        # as after an optimizer step.
        def train_step():
            with torch.no_grad():
                for w in ws:
                    w.add_(0.0)
            fwd_bwd()

        rows.append(dict(variant=name, forward_s=fwd, fwd_bwd_s=median_time(fwd_bwd, repeats),
                         train_step_s=median_time(train_step, repeats)))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="dtypes of the GEMM table (the small-shape and highway tables stay float32)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--highway-repeats", type=int, default=3)
    p.add_argument("--skip-highway", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    model, flags = cpu_facts()
    report = dict(cpu=model, flags=flags, torch=torch.__version__, info=json.loads(OPS._cpu_gemm_info()), runs=[])
    print(f"CPU: {model}; flags: {' '.join(flags)}; torch {torch.__version__}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        run = dict(threads=threads, small=small_rows(args.repeats))
        for dtype_name in args.dtype:
            rows = gemm_rows(args.repeats, getattr(torch, dtype_name))
            run["gemm" if dtype_name == "float32" else f"gemm_{dtype_name}"] = rows
            print(f"\n### {threads} thread(s), {dtype_name}: GFLOP/s (median of {args.repeats})\n")
            print("| M x K x N | what | mm | oneDNN raw (no copy) | layer, onednn | layer, auto | pack ms |")
            print("|---|---|--:|--:|--:|--:|--:|")
            for r in rows:
                print(f"| {r['shape']} | {r['what']} | {r['mm']:.0f} | {r['onednn_raw']:.0f} | {r['layer_onednn']:.0f} "
                      f"| {r['layer_auto']:.0f} | {r['pack_ms']:.1f} |")
        print("\n| small M x K x N | M*N*K | mm us | onednn us |\n|---|--:|--:|--:|")
        for r in run["small"]:
            print(f"| {r['shape']} | {r['mnk']} | {r['mm_us']:.1f} | {r['onednn_us']:.1f} |")
        if not args.skip_highway:
            run["highway"] = highway_rows(args.highway_repeats)
            print(f"\nhighway N = {64 * 34}, F = 2048, 2 layers (s, median of {args.highway_repeats})\n")
            print("| variant | forward | fwd+bwd | train step (re-pack) |\n|---|--:|--:|--:|")
            for r in run["highway"]:
                print(f"| {r['variant']} | {r['forward_s']:.3f} | {r['fwd_bwd_s']:.3f} | {r['train_step_s']:.3f} |")
        report["runs"].append(run)
    OPS._set_cpu_gemm("auto")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
