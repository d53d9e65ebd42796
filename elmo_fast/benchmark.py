"""The microbenchmark driver behind `elmo-fast bench` and `make bench`.

Every case times elmo_fast against its baseline in the same run (the reference is AllenNLP's
algorithm in plain PyTorch), with the thread count pinned, and reports the median of repeats; the
implementations take turns within each repeat, so load changes on a shared machine hit all alike.
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

import elmo_fast
from elmo_fast import bench_data, functional, gemm_floor, reference

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


def flops(op: str, model: str, batch: int, words: int, backward: bool) -> float:
    """Nominal FLOPs of one call as AllenNLP's algorithm computes it (dense: every token's full
    char-CNN, every step of every row), so that GFLOP/s compare implementations doing less work
    (padding shortcut, dedup) against the machine's GEMM rate. Backward counts 2x the forward."""
    m = MODELS[model]
    n, p, layers = m["dim"], m["projection_dim"], m["n_highway"]
    tokens = batch * (words + 2)
    conv = sum(2 * tokens * (51 - w) * w * 16 * k for w, k in [(1, 32), (2, 32), (3, 64), (4, 128), (5, 256),
                                                               (6, 512), (7, 1024)])
    highway = layers * 2 * tokens * NUM_FILTERS * 2 * NUM_FILTERS
    lstm_step = 2 * p * 4 * n * 2 + 2 * n * p  # input + recurrent GEMM (both P -> 4n) + projection, per row
    lstm = tokens * lstm_step
    projection = 2 * tokens * NUM_FILTERS * p
    total = {"highway": highway, "char_cnn": conv, "lstm_projection": lstm,
             "char_encoder": conv + highway + projection, "elmo": conv + highway + projection + 4 * lstm}[op]
    return float(total * (3 if backward else 1))


def gemm_peak_gflops(threads: int, dtype: torch.dtype = torch.float32, repeats: int = 5) -> Dict[str, float]:
    """GFLOP/s of one ELMo-shaped GEMM (the hoisted LSTM input GEMM, 352 x 512 -> 16384) on torch's
    mm and on elmo_fast's CPU GEMM layer (oneDNN packed where available), measured now."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(352, 512, generator=gen).to(dtype)
        w = torch.randn(16384, 512, generator=gen).to(dtype)
        work = 2 * 352 * 512 * 16384
        rates = {"mm": work / time_call(lambda: torch.mm(x, w.t()), repeats) / 1e9}
        layer = getattr(torch.ops.elmo_fast, "_cpu_gemm_linear", None)
        if layer is not None:
            rates["elmo_fast_gemm"] = work / time_call(lambda: layer(x, w, None), repeats, warmup=2) / 1e9
        return rates
    finally:
        torch.set_num_threads(saved)


# Dense tensor-core peaks from NVIDIA's spec sheets (SXM parts), TFLOP/s: the % of peak of a GPU
# row is against these, not a measurement. float32 is the non-tensor-core FP32 rate.
GPU_PEAK_TFLOPS = {
    "H100": {torch.float32: 67.0, torch.bfloat16: 989.0, torch.float16: 989.0},
    "H200": {torch.float32: 67.0, torch.bfloat16: 989.0, torch.float16: 989.0},
    "A100": {torch.float32: 19.5, torch.bfloat16: 312.0, torch.float16: 312.0},
}


def gpu_peak_gflops(device: str, dtype: torch.dtype) -> float:
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in name and dtype in peaks:
            return peaks[dtype] * 1e3
    return float("nan")


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     device: str = "cpu") -> Dict[str, float]:
    """Median wall time of each fn over `repeats` rounds after `warmup` calls, every round calling
    each fn once in turn, so that a change in the machine's load hits all of them alike (the ratios
    are what we report). CUDA: synchronized around each call, so the time covers the kernels."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` calls (CUDA: synchronized
    before and after each call, so the time covers the kernels, not just their launches)."""
    return time_interleaved({"fn": fn}, repeats, warmup, device)["fn"]


def _cpu_choices_pending() -> bool:
    """Whether one of elmo_fast's measured CPU choices (GEMM path per shape class, directions side
    by side or not) is still being measured."""
    ops = torch.ops.elmo_fast
    infos = (json.loads(ops._cpu_gemm_info()).get("decisions", {}),
             json.loads(ops._cpu_directions_info()).get("decisions", {}))
    return any(d.get("choice") == "measuring" for info in infos for d in info.values())


def settle(fn: Callable[[], object], max_calls: int = 8) -> None:
    """Call fn until elmo_fast's run-time measurements have decided (at most max_calls times), so
    that the timed calls see what a long-running process gets, not the trials. A shape class that
    fn itself never reaches again can stay undecided; max_calls bounds that."""
    fn()
    for _ in range(max_calls - 1):
        if not _cpu_choices_pending():
            return
        fn()


def _grad_runner(fn, inputs, backward):
    """fn() -> tensor or tuple of tensors; with backward, also the gradients of every input."""
    def run():
        out = fn()
        if backward:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            outs = [o for o in outs if o.requires_grad]
            torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], [torch.ones_like(o) for o in outs])
    return run


# A pseudo-implementation timed beside the others on the CPU (forward): the unavoidable GEMMs, each
# on its fastest path (elmo_fast/gemm_floor.py). elmo_fast's time over it is the overhead left.
GEMM_FLOOR = "gemm floor"

# The device every case builds its tensors on; run() sets it for the duration of a run.
_DEVICE = ["cpu"]


def _leaves(tensors, dtype, backward):
    # copy=True: never flag or alter the cached model state of bench_data
    return [t.to(device=_DEVICE[0], dtype=dtype, copy=True).requires_grad_(backward) for t in tensors]


def _highway_case(model: str, batch: int, words: int, dtype: torch.dtype, backward: bool):
    layers = MODELS[model]["n_highway"]
    n, f = batch * (words + 2), NUM_FILTERS  # tokens incl. BOS/EOS
    gen = torch.Generator().manual_seed(0)
    x, *params = _leaves([torch.randn(n, f, generator=gen)]
                         + [torch.randn(2 * f, f, generator=gen) / f**0.5 for _ in range(layers)]
                         + [torch.randn(2 * f, generator=gen) for _ in range(layers)], dtype, backward)
    weights, biases = params[:layers], params[layers:]
    inputs = [x, *params]
    return n, {"reference": _grad_runner(lambda: reference.highway(x, weights, biases), inputs, backward),
               "elmo_fast": _grad_runner(lambda: functional.highway(x, weights, biases), inputs, backward)}


def _sentence_ids(batch: int, words: int, text: str) -> torch.Tensor:
    """(batch, words, 50) char ids of English ("english") or random ("random") words, no boundaries."""
    from elmo_fast.chars import batch_to_ids

    sentences = (bench_data.english_sentences if text == "english" else bench_data.random_sentences)(batch, words)
    return batch_to_ids(sentences)


def _char_ids(batch: int, words: int, text: str) -> torch.Tensor:
    ids, _ = reference.add_sentence_boundaries(_sentence_ids(batch, words, text))
    return ids


def _distinct_tokens(with_boundaries: torch.Tensor, mask: torch.Tensor) -> int:
    """How many distinct real tokens (BOS/EOS included) the char encoder encodes after its dedup."""
    return torch.unique(with_boundaries[mask.bool()], dim=0).shape[0]


def _char_cnn_case(model: str, batch: int, words: int, dtype: torch.dtype, backward: bool, text: str = "english"):
    options, state = bench_data.model_state(model)
    ids = _char_ids(batch, words, text).reshape(-1, 50).to(_DEVICE[0])
    filters = options["char_cnn"]["filters"]
    emb, *params = _leaves([state["_token_embedder._char_embedding_weights"]]
                           + [state[f"_token_embedder.char_conv_{i}.weight"] for i in range(len(filters))]
                           + [state[f"_token_embedder.char_conv_{i}.bias"] for i in range(len(filters))],
                           dtype, backward)
    weights, biases = params[:len(filters)], params[len(filters):]
    act = options["char_cnn"]["activation"]
    inputs = [emb, *params]
    return ids.shape[0], {
        "reference": _grad_runner(lambda: reference.char_cnn(ids, emb, weights, biases, act), inputs, backward),
        "elmo_fast": _grad_runner(lambda: functional.char_cnn(ids, emb, weights, biases, act), inputs, backward)}


def _char_encoder_case(model: str, batch: int, words: int, dtype: torch.dtype, backward: bool,
                       text: str = "english"):
    """The token encoder (char-CNN, highways, projection) on every token incl. BOS/EOS; elmo_fast
    encodes each distinct token once (exact dedup), the reference every token."""
    from elmo_fast.elmo import ElmoCharacterEncoder

    options, state = bench_data.model_state(model)
    cpu_ids = _sentence_ids(batch, words, text)
    ids = cpu_ids.to(_DEVICE[0])
    cpu_with_boundaries, mask = reference.add_sentence_boundaries(cpu_ids)
    with_boundaries = cpu_with_boundaries.to(_DEVICE[0])
    module = ElmoCharacterEncoder(*bench_data.model_files(model), requires_grad=backward).to(
        device=_DEVICE[0], dtype=dtype)
    ref_state = {k: v.to(device=_DEVICE[0], dtype=dtype, copy=True).requires_grad_(backward)
                 for k, v in state.items() if k.startswith("_token_embedder.")}
    impls = {"reference": _grad_runner(lambda: reference.char_encoder(with_boundaries, ref_state, options),
                                       list(ref_state.values()), backward),
             "elmo_fast": _grad_runner(lambda: module(ids)["token_embedding"], list(module.parameters()), backward)}
    if _DEVICE[0] == "cpu" and not backward:
        m = MODELS[model]
        impls[GEMM_FLOOR] = gemm_floor.floor_runner(
            gemm_floor.elmo_gemms(_distinct_tokens(cpu_with_boundaries, mask), [], m["n_highway"], NUM_FILTERS,
                                  m["dim"], m["projection_dim"]), dtype)
    return batch * (words + 2), impls


def _lstm_case(model: str, batch: int, words: int, dtype: torch.dtype, backward: bool):
    """One layer-direction of the biLM on (words + 2) steps, all rows full length."""
    n, p = MODELS[model]["dim"], MODELS[model]["projection_dim"]
    steps = words + 2
    gen = torch.Generator().manual_seed(0)
    x, w_ih, w_hh, bias, w_proj = _leaves([torch.randn(batch, steps, p, generator=gen),
                                          torch.randn(4 * n, p, generator=gen) / p**0.5,
                                          torch.randn(4 * n, p, generator=gen) / p**0.5,
                                          torch.randn(4 * n, generator=gen) * 0.1,
                                          torch.randn(p, n, generator=gen) / n**0.5], dtype, backward)
    lengths = torch.full((batch,), steps, dtype=torch.long)
    h0, c0 = (torch.zeros(batch, size, dtype=dtype, device=_DEVICE[0]) for size in (p, n))
    inputs = [x, w_ih, w_hh, bias, w_proj]
    native = torch.nn.LSTM(p, n, proj_size=p, batch_first=True).to(device=_DEVICE[0], dtype=dtype)
    with torch.no_grad():  # same weights; torch has no clips, so the clips are off for all three
        native.weight_ih_l0.copy_(w_ih)
        native.weight_hh_l0.copy_(w_hh)
        native.bias_ih_l0.copy_(bias)
        native.bias_hh_l0.zero_()
        native.weight_hr_l0.copy_(w_proj)
    native.requires_grad_(backward)
    args = (x, lengths, w_ih, w_hh, bias, w_proj, h0, c0)
    impls = {"reference": _grad_runner(lambda: reference.lstm_projection(*args)[0], inputs, backward),
             "torch.nn.LSTM": _grad_runner(lambda: native(x)[0], [x, *native.parameters()], backward),
             "elmo_fast": _grad_runner(lambda: functional.lstm_projection(*args)[0], inputs, backward)}
    if _DEVICE[0] == "cpu" and not backward:
        impls[GEMM_FLOOR] = gemm_floor.floor_runner(gemm_floor.lstm_gemms([steps] * batch, p, n, p), dtype)
    return batch * steps, impls


def _elmo_case(model: str, batch: int, words: int, dtype: torch.dtype, backward: bool, text: str = "english"):
    """The whole biLM (char encoder + 2-layer biLSTM) from char ids, stateless."""
    from elmo_fast.elmo import ElmoBiLm

    options, state = bench_data.model_state(model)
    cpu_ids = _sentence_ids(batch, words, text)
    ids = cpu_ids.to(_DEVICE[0])
    module = ElmoBiLm(*bench_data.model_files(model), requires_grad=backward, stateful=False).to(
        device=_DEVICE[0], dtype=dtype)
    ref_state = {k: v.to(device=_DEVICE[0], dtype=dtype, copy=True).requires_grad_(backward)
                 for k, v in state.items()}
    fast_inputs = list(module.parameters())
    ref_inputs = list(ref_state.values())
    impls = {"reference": _grad_runner(lambda: reference.elmo_bilm(ids, ref_state, options)[0][-1], ref_inputs,
                                       backward),
             "elmo_fast": _grad_runner(lambda: module(ids)["activations"][-1], fast_inputs, backward)}
    if _DEVICE[0] == "cpu" and not backward:
        with_boundaries, mask = reference.add_sentence_boundaries(cpu_ids)
        m = MODELS[model]
        gemms = gemm_floor.elmo_gemms(_distinct_tokens(with_boundaries, mask), mask.sum(-1).tolist(), m["n_highway"],
                                      NUM_FILTERS, m["dim"], m["projection_dim"])
        impls[GEMM_FLOOR] = gemm_floor.floor_runner(gemms, dtype)
    return batch * words, impls


CASES = {"highway": _highway_case, "char_cnn": _char_cnn_case, "char_encoder": _char_encoder_case,
         "lstm_projection": _lstm_case, "elmo": _elmo_case}


def run(ops: List[str], models: List[str], shapes: List[tuple], threads: List[int], modes: List[str],
        dtype: torch.dtype = torch.float32, repeats: int = 3, progress: Callable[[str], None] = print,
        full: bool = False, device: str = "cpu") -> List[Result]:
    """Time every (op, model, shape, mode, threads) cell; the whole biLM's backward only when full.
    On CUDA, % of peak is against the device's spec-sheet dense FLOP/s (GPU_PEAK_TFLOPS)."""
    results = []
    peaks: Dict[int, float] = {}  # threads -> the best GEMM rate measured in this run
    saved_threads = torch.get_num_threads()
    _DEVICE[0] = device
    cuda = torch.device(device).type == "cuda"
    try:
        for op in ops:
            for model in models:
                for batch, words in shapes:
                    for mode in modes:
                        if op == "elmo" and mode != "forward" and not full:
                            continue  # the reference biLM's backward alone takes ~20 s at 16 x 20
                        tokens, impls = CASES[op](model, batch, words, dtype, mode == "forward+backward")
                        work = flops(op, model, batch, words, mode == "forward+backward")
                        for nthreads in threads:
                            if nthreads not in peaks:
                                peaks[nthreads] = (gpu_peak_gflops(device, dtype) if cuda
                                                   else max(gemm_peak_gflops(nthreads, dtype).values()))
                            torch.set_num_threads(nthreads)
                            if "elmo_fast" in impls and not cuda:
                                settle(impls["elmo_fast"])
                            times = time_interleaved(impls, repeats, device=device)
                            base = times["reference"]
                            for name, t in times.items():
                                gflops = work / t / 1e9
                                r = Result(op, mode, model, f"{batch}x{words}", str(dtype).replace("torch.", ""),
                                           nthreads, name, t, repeats, tokens, "reference", base / t,
                                           extra={"gflops": gflops, "gemm_peak_gflops": peaks[nthreads],
                                                  "pct_of_gemm_peak": 100 * gflops / peaks[nthreads]})
                                results.append(r)
                                progress(format_row(r))
    finally:
        torch.set_num_threads(saved_threads)
        _DEVICE[0] = "cpu"
    return results


def format_row(r: Result) -> str:
    return (f"{r.op:<16} {r.mode:<17} {r.model:<9} {r.shape:>6} {r.dtype:<8} {r.threads:>2} thr "
            f"{r.impl:<13} {r.median_s * 1e3:9.2f} ms  {r.tokens / r.median_s:10.0f} tok/s  x{r.speedup:5.2f}  "
            f"{r.extra.get('pct_of_gemm_peak', float('nan')):5.1f}%")


def table(results: List[Result]) -> str:
    header = (f"{'op':<16} {'mode':<17} {'model':<9} {'shape':>6} {'dtype':<8} {'threads':>7} "
              f"{'impl':<13} {'median':>12}  {'throughput':>16}  {'vs ref':>6}  of GEMM peak")
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
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    modes = elmo_fast.kernel_info()
    info["cuda_kernels"] = " ".join(f"{family}={v['mode']}" for family, v in sorted(modes.items()))
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
