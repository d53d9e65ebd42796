"""Bidirectional LSTM layer of the original ELMo size (input 512, hidden 4096, proj 512) on the CPU:
torch.nn.LSTM vs elmo_fast.nn.LSTM with its two directions run one after the other (each GEMM on all
threads) or side by side (each on half of the threads), ELMO_FAST_CPU_DIRECTIONS=serial|concurrent, and what
"auto" picks after measuring.

    python bench/directions_cpu.py [--threads 1 2] [--batches 1 16 64] [--steps 22] [--rounds 5] [--json F]

Every figure is the median of --rounds rounds; within a round the implementations run in turn
(interleaved, so a load change hits all of them). Clips are off: torch.nn.LSTM has none.
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

import elmo_fast  # noqa: E402
from cpu_gemm import cpu_facts  # noqa: E402

OPS = torch.ops.elmo_fast


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def case_rows(batch, steps, threads, backward, rounds):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(512, 4096, proj_size=512, bidirectional=True, batch_first=True)
    ours = elmo_fast.nn.LSTM(512, 4096, proj_size=512, bidirectional=True, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, steps, 512, requires_grad=backward)

    def run(model):
        if backward:
            model(x)[0].sum().backward()
        else:
            with torch.no_grad():
                model(x)

    def with_mode(mode):
        def fn():
            OPS._set_cpu_directions(mode)
            run(ours)
        return fn

    impls = {"torch.nn.LSTM": lambda: run(ref), "serial": with_mode("serial"), "concurrent": with_mode("concurrent")}
    torch.set_num_threads(threads)
    for fn in impls.values():  # warm-up: packs weights, sizes buffers
        fn()
        fn()
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            times[name].append(timed(fn))
    OPS._set_cpu_directions("auto")
    OPS._cpu_directions_reset()
    for _ in range(8):  # 2 warm-up calls + 2 of each way per layer-direction pair, then decided
        run(ours)
    decisions = json.loads(OPS._cpu_directions_info())["decisions"]
    choice = sorted({d["choice"] for d in decisions.values()})
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return dict(batch=batch, steps=steps, threads=threads, mode="fwd+bwd" if backward else "fwd", ms=med,
                auto_choice=choice)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="also time forward+backward at batch 16")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    model, flags = cpu_facts()
    print(f"CPU: {model}; flags: {' '.join(flags)}; torch {torch.__version__}\n")
    print("| batch x steps | mode | threads | torch.nn.LSTM | elmo_fast serial | elmo_fast side by side "
          "| best vs torch | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [(b, False) for b in args.batches] + ([(16, True)] if args.backward else [])
    rows = []
    for batch, backward in cases:
        for threads in args.threads:
            r = case_rows(batch, args.steps, threads, backward, args.rounds)
            rows.append(r)
            ms = r["ms"]
            best = min(ms["serial"], ms["concurrent"])
            print(f"| {batch} x {args.steps} | {r['mode']} | {threads} | {ms['torch.nn.LSTM']:.1f} ms "
                  f"| {ms['serial']:.1f} ms | {ms['concurrent']:.1f} ms | {ms['torch.nn.LSTM'] / best:.2f}x "
                  f"| {', '.join(r['auto_choice']) or '-'} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=model, flags=flags, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
