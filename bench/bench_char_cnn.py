"""Char-CNN timing: fused op vs elmo_fast.reference (AllenNLP's algorithm), original-size filters.

    python bench/bench_char_cnn.py [--threads 1] [--sentences 64] [--words 20] [--repeats 7] [--backward] [--cpu-time]

Tokens: 64 sentences x 20 words (+ <S>/</S> per sentence, spec §4.1) cut from Python standard
library docstrings ("english"), or random byte words of 2-10 bytes, all distinct ("random").
Prints median seconds per call and the ratio; --json PATH also writes them.
"""
import argparse
import json
import os
import platform
import pydoc
import random
import re
import statistics
import sys
import time

import torch

# Measure this checkout's elmo_fast, not whichever one the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import elmo_fast  # noqa: E402
import elmo_fast.functional as F  # noqa: E402
import elmo_fast.reference as R  # noqa: E402

PUBLISHED = [(1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024)]
BOS = [259, 257, 260] + [261] * 47
EOS = [259, 258, 260] + [261] * 47


def token_to_ids(token: str, c: int = 50) -> list:
    """Spec §3.1 (after the +1 shift)."""
    raw = list(token.encode("utf-8", "ignore")[: c - 2])
    ids = [258] + raw + [259] + [260] * (c - 2 - len(raw))
    return [i + 1 for i in ids]


def english_words() -> list:
    import collections, json as j, os, re as r, textwrap, typing  # noqa: E401, F401
    text = " ".join(pydoc.getdoc(m) for m in (collections, j, os, r, textwrap, typing, argparse, statistics))
    return re.findall(r"\w+|[^\w\s]", text)


def batch(words: list, sentences: int, per: int) -> torch.Tensor:
    rows = []
    for s in range(sentences):
        rows.append(BOS)
        rows.extend(token_to_ids(w) for w in words[s * per:(s + 1) * per])
        rows.append(EOS)
    return torch.tensor(rows, dtype=torch.long)


def random_words(n: int, rng: random.Random) -> list:
    seen, out = set(), []
    while len(out) < n:
        w = bytes(rng.randrange(97, 123) for _ in range(rng.randint(2, 10))).decode()
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


CLOCK = time.perf_counter


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--words", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process's CPU time (meaningful at 1 thread on a shared, loaded machine)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(262, 16, generator=g)
    emb[0] = 0
    weights = [torch.randn(m, 16, w, generator=g) * 0.1 for w, m in PUBLISHED]
    biases = [torch.randn(m, generator=g) * 0.1 for _, m in PUBLISHED]
    n_words = args.sentences * args.words
    cases = {"english": english_words()[:n_words], "random": random_words(n_words, random.Random(0))}
    print(f"elmo_fast from {os.path.dirname(elmo_fast.__file__)}, torch {torch.__version__}, {args.threads} thread(s)")
    results = {"threads": args.threads, "clock": "process_time" if args.cpu_time else "perf_counter",
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "filters": PUBLISHED, "d": 16, "dtype": "float32"}
    for name, words in cases.items():
        ids = batch(words, args.sentences, args.words)
        fused = lambda: F.char_cnn(ids, emb, weights, biases)  # noqa: E731
        ref = lambda: R.char_cnn(ids, emb, weights, biases)  # noqa: E731
        with torch.no_grad():
            err = (fused() - ref()).abs().max().item()
            tf, tr = median_time(fused, args.repeats), median_time(ref, args.repeats)
        row = {"tokens": ids.shape[0], "fused_s": tf, "reference_s": tr, "speedup": tr / tf, "max_abs_diff": err}
        if args.backward:
            leaves = [emb] + weights + biases

            def step(fn):
                ps = [p.detach().requires_grad_() for p in leaves]
                fn(ids, ps[0], ps[1:8], ps[8:]).sum().backward()

            row["fused_fwd_bwd_s"] = median_time(lambda: step(F.char_cnn), args.repeats)
            row["reference_fwd_bwd_s"] = median_time(lambda: step(R.char_cnn), args.repeats)
        results[name] = row
        print(f"{name:8s} N={ids.shape[0]}  fused {tf * 1e3:8.2f} ms  reference {tr * 1e3:8.2f} ms  "
              f"x{tr / tf:5.2f}  max|diff| {err:.2e}"
              + (f"  | fwd+bwd fused {row['fused_fwd_bwd_s'] * 1e3:.1f} ms, reference "
                 f"{row['reference_fwd_bwd_s'] * 1e3:.1f} ms" if args.backward else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
