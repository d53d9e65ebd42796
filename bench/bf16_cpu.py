"""bfloat16 on the CPU (issue 10): the Elmo biLM forward, original size, 16 x 20 English, 1 thread,
in bf16 against elmo_fast fp32, reference.py fp32 (AllenNLP's algorithm) and reference.py in bf16;
and the bf16 accuracy against elmo_fast fp32 over the real tokens (per-token cosine, mean relative
error), for random original-size weights and for a small trained-looking model.

    python bench/bf16_cpu.py [--repeats 7] [--json bench/results/bf16-cpu.json]

Times are medians (the machine may be shared). Prints the CPU model and its bf16-related flags.
"""
import argparse
import json
import os
import platform
import tempfile

import torch

from elmo_fast import bench_data, benchmark
from elmo_fast import reference as R
from elmo_fast.chars import batch_to_ids
from elmo_fast.elmo import ElmoBiLm
from elmo_fast.synthetic import write_elmo_files
from elmo_fast.weights import load_weights


def cpu_flags():
    try:
        words = open("/proc/cpuinfo").read().split()
    except OSError:
        return []
    return sorted({w for w in words if w.startswith(("avx512", "amx")) or w in ("avx2", "fma")})


def accuracy(files, ids):
    """Per layer of the biLM: (min cosine, mean rel. error) of elmo_fast bf16 and of reference.py
    in bf16, both against elmo_fast fp32, over the real tokens (boundaries included)."""
    options, state = load_weights(*files)
    m32 = ElmoBiLm(*files, stateful=False)
    m16 = ElmoBiLm(*files, stateful=False).to(torch.bfloat16)
    with torch.no_grad():
        a32, a16 = m32(ids), m16(ids)
        r16 = R.elmo_bilm(ids, {k: v.to(torch.bfloat16) for k, v in state.items()}, options)[0]
    mask = a32["mask"].bool()
    out = []
    for k, (a, b, r) in enumerate(zip(a32["activations"], a16["activations"], r16)):
        row = {"layer": k}
        for name, t in (("elmo_fast_bf16", b), ("reference_bf16", r)):
            x, y = a[mask].double(), t[mask].double()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            rel = (x - y).norm(dim=-1) / x.norm(dim=-1)
            row[name] = {"cos_min": cos.min().item(), "cos_mean": cos.mean().item(), "rel_mean": rel.mean().item()}
        out.append(row)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json")
    p.add_argument("--accuracy-only", action="store_true", help="skip the timings")
    p.add_argument("--scales", type=float, nargs="*", default=[0.5, 0.25],
                   help="also measure accuracy on original-size weights scaled by these (less chaotic LSTMs)")
    a = p.parse_args()
    torch.set_num_threads(1)
    report = {"cpu": platform.processor() or "", "flags": cpu_flags(), "torch": torch.__version__, "threads": 1}
    try:
        report["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if not a.accuracy_only:
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            for r in benchmark.run(["elmo"], ["original"], [(16, 20)], [1], ["forward"], dtype=dtype,
                                   repeats=a.repeats, progress=lambda s: None):
                times[f"{r.impl} {r.dtype}"] = r.median_s
        report["median_s"] = times
        fast16 = times["elmo_fast bfloat16"]
        report["speedup_bf16"] = {k: v / fast16 for k, v in times.items()}
    ids = batch_to_ids(bench_data.english_sentences(16, 20))
    report["accuracy_original_random"] = accuracy(bench_data.model_files("original"), ids)
    scratch = tempfile.TemporaryDirectory(prefix="elmo_fast_bf16_")  # scaled copies are 358 MB each
    small = write_elmo_files(os.path.join(scratch.name, "small"),
                             filters=((1, 32), (2, 32), (3, 64), (4, 128), (5, 256)), char_dim=16, n_highway=2,
                             dim=1024, projection_dim=128)  # default scale: trained-looking, clips bite
    report["accuracy_small_trained_looking"] = accuracy(small, ids)
    for scale in a.scales:  # the same weights, scaled: gentler LSTMs amplify rounding less
        options = bench_data.published_model_options("original")
        scaled = write_elmo_files(os.path.join(scratch.name, f"scale_{scale}"), weight_scale=scale, **options)
        report[f"accuracy_original_scale_{scale}"] = accuracy(scaled, ids)
    print(json.dumps(report, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
