"""One layer-direction of the original ELMo biLM (input 512, 4096 cells, projection 512) forward on a
GPU: torch.nn.LSTM(proj_size=512) (cuDNN) against elmo_fast's lstm_projection with the stepwise
kernels and with the persistent kernel (ELMO_FAST_LSTM_KERNEL, Note [persistent LSTM]), and how far
the persistent outputs are from the stepwise ones.

    python bench/lstm_cuda.py [--dtype bfloat16] [--shapes 16x22 64x34] [--rounds 20] [--json F]

Times are CUDA-event medians of --rounds rounds after warm-up; within a round the implementations run
in turn. Clips are off: cuDNN has none. The issue's target: persistent >= 3x cuDNN at 64 x 34 in bf16.
"""
import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import elmo_fast  # noqa: E402
from elmo_fast import functional  # noqa: E402


def event_time(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3  # microseconds


def case(batch, steps, dtype, rounds):
    torch.manual_seed(0)
    n, p = 4096, 512
    native = torch.nn.LSTM(p, n, proj_size=p, batch_first=True).to(device="cuda", dtype=dtype)
    x = torch.randn(batch, steps, p, device="cuda", dtype=dtype)
    lengths = torch.full((batch,), steps, dtype=torch.long)
    bias = native.bias_ih_l0 + native.bias_hh_l0
    h0 = torch.zeros(batch, p, device="cuda", dtype=dtype)
    c0 = torch.zeros(batch, n, device="cuda", dtype=dtype)
    args = (x, lengths, native.weight_ih_l0, native.weight_hh_l0, bias, native.weight_hr_l0, h0, c0)

    def ours(kernel):
        def fn():
            elmo_fast.set_kernel("lstm", kernel)
            return functional.lstm_projection(*args)[0]
        return fn

    fns = {"cudnn": lambda: native(x)[0], "stepwise": ours("stepwise"), "persistent": ours("persistent")}
    row = {"batch": batch, "steps": steps, "dtype": str(dtype).replace("torch.", "")}
    with torch.no_grad():
        try:
            outs = {name: fn() for name, fn in fns.items()}
        except RuntimeError as err:  # e.g. the persistent kernel does not fit this GPU
            row["error"] = str(err).splitlines()[0]
            fns.pop("persistent")
            outs = {name: fn() for name, fn in fns.items()}
        for name, out in outs.items():
            if name != "stepwise":
                diff = (out.double() - outs["stepwise"].double()).norm() / outs["stepwise"].double().norm()
                row[f"rel_diff_{name}_vs_stepwise"] = diff.item()
        for fn in fns.values():
            for _ in range(3):
                fn()
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(event_time(fn))
    elmo_fast.set_kernel("lstm", "auto")
    for name, t in times.items():
        row[f"{name}_us"] = statistics.median(t)
    for name in fns:
        if name != "cudnn":
            row[f"{name}_speedup_vs_cudnn"] = row["cudnn_us"] / row[f"{name}_us"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shapes", nargs="+", default=["16x22", "64x34"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("lstm_cuda.py needs a GPU")
    dtype = getattr(torch, args.dtype)
    rows = [case(*map(int, s.split("x")), dtype, args.rounds) for s in args.shapes]
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": datetime.date.today().isoformat(), "kernels": elmo_fast.kernel_info(),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
