"""Corpus embedding throughput: `elmo-fast embed` (ElmoEmbedder.embed_file, the CLI's code path) against a
plain loop of the reference biLM (elmo_fast.reference.elmo_bilm, AllenNLP's algorithm in plain PyTorch) at
batch 64 in file order, in the same run, on CPU with random weights of the original model size.

Corpus: sentences of 5-40 consecutive tokens (uniform, seeded) of English text (elmo_fast.bench_data). The
reference is slow, so both are also timed on a prefix (--prefix sentences) and compared there; elmo_fast
also runs the whole corpus. Times: the embedding loop only (model loading excluded; hdf5 writing included
for elmo_fast, nothing written for the reference). Writes a markdown table to stdout and --out.

    python bench/bench_embed.py [--sentences 1000] [--prefix 128] [--threads 1] [--out bench/results/embed-DATE.md]
"""
import argparse
import datetime
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from elmo_fast import reference as R  # noqa: E402
from elmo_fast.bench_data import english_tokens, model_files, model_state  # noqa: E402
from elmo_fast.chars import batch_to_ids  # noqa: E402
from elmo_fast.embedder import ElmoEmbedder  # noqa: E402


def corpus(n, seed=0, lo=5, hi=40):
    tokens = english_tokens()
    rng = random.Random(seed)
    out, pos = [], rng.randrange(len(tokens))
    for _ in range(n):
        k = rng.randint(lo, hi)
        if pos + k > len(tokens):
            pos = 0
        out.append(list(tokens[pos:pos + k]))
        pos += k
    return out


def cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def reference_loop(sentences, batch_size, state):
    options, weights = state
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            R.elmo_bilm(batch_to_ids(sentences[i:i + batch_size]), weights, options)
    return time.perf_counter() - start


def embed(sentences, files, directory, name, **kw):
    path = os.path.join(directory, f"{name}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(" ".join(s) + "\n" for s in sentences)
    embedder = ElmoEmbedder(*files, stateful=kw.pop("stateful", True))
    summary = embedder.embed_file(path, os.path.join(directory, f"{name}.hdf5"), "all", **kw)
    return summary["seconds"], summary["tokens"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--prefix", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results",
                                                 f"embed-{datetime.date.today().isoformat()}.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sentences = corpus(args.sentences)
    prefix = sentences[:args.prefix]
    ntok = lambda ss: sum(map(len, ss))  # noqa: E731
    files = model_files("original")
    state = model_state("original")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        embed(sentences[:8], files, d, "warmup", batch_size=args.batch_size)
        t_ref = reference_loop(prefix, args.batch_size, state)
        rows.append(("reference elmo_bilm loop, zero state", f"first {len(prefix)}", ntok(prefix), t_ref))
        t, k = embed(prefix, files, d, "prefix", batch_size=args.batch_size)
        rows.append(("elmo-fast embed (stateful, file order)", f"first {len(prefix)}", k, t))
        t, k = embed(sentences, files, d, "all", batch_size=args.batch_size)
        rows.append(("elmo-fast embed (stateful, file order)", f"all {len(sentences)}", k, t))
        t, k = embed(sentences, files, d, "sorted", batch_size=args.batch_size, stateful=False)
        rows.append(("elmo-fast embed --stateless (length-sorted)", f"all {len(sentences)}", k, t))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    lines = [f"# `elmo-fast embed` vs the reference biLM loop, CPU, {datetime.date.today().isoformat()}", "",
             f"CPU: {cpu_model()}; {args.threads} thread(s); torch {torch.__version__}; commit {commit}; "
             f"original-size random weights (n=4096, P=512, 2 highways); batch {args.batch_size}; "
             f"{len(sentences)} sentences of 5-40 English tokens ({ntok(sentences)} tokens, mean "
             f"{ntok(sentences) / len(sentences):.1f}). Loop time only (no model loading); elmo_fast includes "
             f"writing the hdf5 (`--all`).", "",
             "| what | sentences | tokens | seconds | tokens/s | vs reference |", "|---|---|---:|---:|---:|---:|"]
    ref_rate = rows[0][2] / rows[0][3]
    for what, which, k, t in rows:
        lines.append(f"| {what} | {which} | {k} | {t:.1f} | {k / t:.1f} | {k / t / ref_rate:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
