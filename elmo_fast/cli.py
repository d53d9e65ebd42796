"""The `elmo-fast` command: `info` (what was built, what devices exist) and `bench` (microbenchmarks)."""
import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch


def _device_info(index: int, info: dict) -> dict:
    """A GPU's name and capability, and whether this build has code for it (elmo_fast/_cuda_support.py;
    null when the build's arch list is not numbers)."""
    from elmo_fast import _cuda_support

    capability = torch.cuda.get_device_capability(index)
    runs = info["cuda"] and _cuda_support.arch_list_runs_on(";".join(info["cuda_arch"]), capability)
    return {"name": torch.cuda.get_device_name(index), "capability": "%d.%d" % capability, "runs_this_build": runs}


def _info(args: argparse.Namespace) -> int:
    import elmo_fast

    info = elmo_fast.build_info()
    info["cuda_available"] = torch.cuda.is_available()
    info["devices"] = [_device_info(i, info) for i in range(torch.cuda.device_count())]
    info["threads"] = torch.get_num_threads()
    # The run-time switches in force (environment variables or their defaults): what will run here.
    from elmo_fast import wavefront

    ops = torch.ops.elmo_fast
    info["cpu"] = {"gemm": json.loads(ops._cpu_gemm_info())["mode"],
                   "directions": json.loads(ops._cpu_directions_info())["mode"], "wavefront": wavefront.mode()}
    info["cuda_kernels"] = {family: k["mode"] for family, k in elmo_fast.kernel_info().items()}
    print(json.dumps(info, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from elmo_fast import benchmark

    # --quick: one shape, forward only (under a minute); default: a few minutes on 2 cores;
    # --full: the whole grid of issue 8, incl. 64 x 32 and the biLM's backward.
    if args.quick:
        shapes, repeats, modes = [(16, 20)], 1, ["forward"]
    elif args.full:
        shapes, repeats, modes = [(1, 20), (16, 20), (64, 32)], 3, ["forward", "forward+backward"]
    else:
        shapes, repeats, modes = [(1, 20), (16, 20)], 3, ["forward", "forward+backward"]
    if args.shape:
        shapes = args.shape
    models = [args.model or "original"]
    threads = [args.threads] if args.threads else ([1] if args.quick else [1, 2])
    print(f"# machine: {json.dumps(benchmark.machine())}")
    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("elmo-fast bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    print(f"# device {args.device}, dtype {args.dtype}, median of {repeats} interleaved rounds after 1 warm-up; "
          "speedup = reference time / time")
    results = benchmark.run(args.op or list(benchmark.CASES), models, shapes, threads, modes, dtype=dtype,
                            repeats=repeats, full=args.full, device=args.device)
    print()
    print(benchmark.table(results))
    kind = "cpu" if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device)).replace(" ", "-")
    stem = os.path.join(args.out, f"{kind}-{args.dtype}-{time.strftime('%Y%m%d-%H%M%S')}")
    benchmark.write_json(results, stem + ".json")
    print(f"\nwrote {stem}.json")
    from elmo_fast.bench_plot import plot_speedups

    why_not = plot_speedups(results, stem + ".png")
    print(why_not or f"wrote {stem}.png")
    return 0


def _shape(text: str) -> tuple:
    try:
        batch, words = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape takes BATCHxWORDS, e.g. 64x32, got {text!r}") from None
    if batch < 1 or words < 1:
        raise argparse.ArgumentTypeError(f"--shape needs a batch and words of at least 1, got {text!r}")
    return batch, words


def positive_int(text: str) -> int:
    """argparse type for counts such as --threads: 0 or less is an error, not "the default"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elmo-fast", description="A fast, faithful ELMo.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print build facts and devices")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="run the microbenchmarks and print a table")
    bench.add_argument("--model", choices=["small", "medium", "original"], default=None)
    bench.add_argument("--op", action="append", choices=["highway", "char_cnn", "char_encoder", "lstm_projection", "elmo"],
                       help="op to run (repeatable); default all")
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                       help="dtype of weights and activations (default float32)")
    bench.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: 1 and 2)")
    bench.add_argument("--quick", action="store_true", help="one shape, forward only (under a minute)")
    bench.add_argument("--full", action="store_true", help="the whole grid incl. 64x32 and the biLM's backward")
    bench.add_argument("--shape", action="append", type=_shape, metavar="BxW",
                       help="batch x words to time instead of the mode's shapes (repeatable), e.g. 64x32")
    bench.add_argument("--out", default=os.path.join("bench", "results"), help="directory for the JSON results")
    bench.set_defaults(func=_bench)
    from elmo_fast.embed_cli import add_embed_parser

    add_embed_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a pipe's buffered output is written here, not at exit
        return status
    except BrokenPipeError:
        # `elmo-fast info | head`: the reader left. Exit quietly, as other Unix tools do, with no
        # traceback and no second error when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
