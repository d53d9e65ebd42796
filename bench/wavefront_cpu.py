"""ElmoLstm of the original ELMo size (2 layers, input 512, cell 4096, projection 512, clips 3.0) on the
CPU, inference: the layers one after the other (each layer's two directions as
ELMO_FAST_CPU_DIRECTIONS decides) against the wavefront (Note [wavefront], elmo_fast/wavefront.py: the
four chains of a stage at the same time, each on its own thread team), and what "auto" picks.

    python bench/wavefront_cpu.py [--threads 1 2 4] [--shapes 16x22 64x34] [--dtype float32] [--rounds 5] [--json F]

Every figure is the median of --rounds rounds; within a round the two ways run in turn (interleaved).
"auto" only considers the wavefront with >= 4 threads (a team per chain), so below that it reports "-".
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from elmo_fast import wavefront  # noqa: E402
from elmo_fast.elmo import ElmoLstm  # noqa: E402
from cpu_gemm import cpu_facts  # noqa: E402


def case_row(batch, steps, threads, dtype, rounds):
    torch.manual_seed(0)
    lstm = ElmoLstm(512, 512, 4096, 2, memory_cell_clip_value=3.0, state_projection_clip_value=3.0,
                    stateful=False).to(dtype)
    x = torch.randn(batch, steps, 512, dtype=dtype)
    mask = torch.ones(batch, steps, dtype=torch.bool)
    mask[batch // 2:, steps * 2 // 3:] = False  # ragged, as real sentences are
    torch.set_num_threads(threads)

    def way(mode):
        def fn():
            wavefront.set_mode(mode)
            lstm(x, mask)
        return fn

    impls = {"layers": way("off"), "wavefront": way("on")}
    times = {name: [] for name in impls}
    with torch.no_grad():
        for fn in impls.values():  # warm-up: packs weights, sizes buffers
            fn()
            fn()
        for _ in range(rounds):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        wavefront.set_mode("auto")
        wavefront.reset()
        for _ in range(8):  # 3 warm-up calls and 2 timed calls each way decide it (elmo_fast/wavefront.py)
            lstm(x, mask)
    choice = sorted({d["choice"] for d in wavefront.info()["decisions"].values()})
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return dict(batch=batch, steps=steps, threads=threads, dtype=str(dtype), ms=ms, auto_choice=choice)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=["16x22"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    model, flags = cpu_facts()
    print(f"CPU: {model}; flags: {' '.join(flags)}; torch {torch.__version__}; cores {os.cpu_count()}\n")
    print("| batch x steps | dtype | threads | layer by layer | wavefront | wavefront vs layers | auto picks |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for shape in args.shapes:
        batch, steps = map(int, shape.split("x"))
        for threads in args.threads:
            r = case_row(batch, steps, threads, getattr(torch, args.dtype), args.rounds)
            rows.append(r)
            ms = r["ms"]
            print(f"| {shape} | {args.dtype} | {threads} | {ms['layers']:.1f} ms | {ms['wavefront']:.1f} ms "
                  f"| {ms['layers'] / ms['wavefront']:.2f}x | {', '.join(r['auto_choice']) or '-'} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=model, flags=flags, torch=torch.__version__, cores=os.cpu_count(), rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
