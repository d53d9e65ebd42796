"""ElmoLstm's layers as a pipeline over chunks of time steps on many-core CPUs (inference).

Note [wavefront]
ElmoLstm's forward and backward stacks are independent, and within a stack layer l + 1 at step t needs
only layer l up to step t. So with threads to spare the layers can run as a pipeline over K chunks of
time: at stage s, layer l of the forward stack runs chunk s - l and layer l of the backward stack runs
chunk K - 1 - (s - l) (it reads time from the end), and a stage's chains (up to 2 L) run at the same
time, each on its own team of threads (torch.ops.elmo_fast._lstm_chains, csrc/cpu/lstm_chains.cpp).
Chunk k of a row is its steps [b_k, b_k+1) with length clamp(length - b_k, 0, b_k+1 - b_k), and the state
carries from chunk to chunk: a row that ended before b_k passes its state through (lstm_projection's
length-0 rule), and the reverse direction runs each row backwards within its length inside a chunk,
which is the whole sequence's reverse order cut at the boundaries. Results are the layer-by-layer
results up to float rounding (each chunk has its own input GEMM).
Costs: K chunks take K + L - 1 stages, the first and last L - 1 with fewer chains; the input GEMMs are
1/K as tall. It can only pay where a GEMM split over T threads scales worse than over T / 2 L, i.e. on
many cores; our 2-core machines cannot show that. So "auto" considers it only with at least 2 L threads
(one per chain) and then times it against the layer-by-layer path on the first calls of each shape
class, keeping the faster; "on" always takes it where it applies, "off" never
(ELMO_FAST_CPU_WAVEFRONT, or set_mode). It applies to CPU inference only: no autograd, no autocast,
inputs and parameters of one dtype, not under torch.compile.
"""
import math
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from elmo_fast import functional

MODES = ("auto", "on", "off")
CHUNKS = 4
_WARMUP, _TRIALS = 1, 2

_mode: Optional[str] = None
_lock = threading.Lock()
_records: Dict[tuple, dict] = {}


def _parse(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def mode() -> str:
    global _mode
    if _mode is None:
        _mode = _parse(os.environ.get("ELMO_FAST_CPU_WAVEFRONT", "") or "auto", "ELMO_FAST_CPU_WAVEFRONT")
    return _mode


def set_mode(new_mode: str) -> None:
    """"auto" (the default: measured), "on" or "off"; overrides ELMO_FAST_CPU_WAVEFRONT."""
    global _mode
    _mode = _parse(new_mode, "wavefront mode")


def info() -> dict:
    """{"mode", "decisions": {shape class: {"layers_ms", "wavefront_ms", "choice"}}}."""
    with _lock:
        decisions = {" ".join(map(str, key)): dict(
            layers_ms=rec["best"][0] * 1e3 if rec["runs"][0] else -1.0,
            wavefront_ms=rec["best"][1] * 1e3 if rec["runs"][1] else -1.0,
            choice=_decision(rec) or "measuring") for key, rec in _records.items()}
    return dict(mode=mode(), decisions=decisions)


def reset() -> None:
    """Forget the measured decisions."""
    with _lock:
        _records.clear()


def _decision(rec: dict) -> Optional[str]:
    if min(rec["runs"]) < _TRIALS:
        return None
    return "wavefront" if rec["best"][1] < rec["best"][0] else "layers"


def _applies(module, inputs: torch.Tensor, h0: torch.Tensor) -> bool:
    if inputs.device.type != "cpu" or inputs.shape[0] == 0 or inputs.shape[1] < 2 or module.num_layers < 1:
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    params = list(module.parameters())
    if any(p.dtype != inputs.dtype or p.device.type != "cpu" for p in params) or h0.dtype != inputs.dtype:
        return False  # the layer-by-layer path raises its clear errors (or casts)
    return not (torch.is_grad_enabled() and (inputs.requires_grad or h0.requires_grad or
                                             any(p.requires_grad for p in params)))


def run(module, inputs: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
        layer_by_layer: Callable[[], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """ElmoLstm's stack by the wavefront or by `layer_by_layer`, as the mode and the measurements say."""
    current = mode()
    if current == "off" or not _applies(module, inputs, h0):
        return layer_by_layer()
    if current == "on":
        return run_stack(module, inputs, lengths, h0, c0)
    threads = torch.get_num_threads()
    if module.num_layers < 2 or threads < 2 * module.num_layers:
        return layer_by_layer()
    B, T = inputs.shape[:2]
    key = (str(inputs.dtype), module.input_size, module.hidden_size, module.cell_size, module.num_layers,
           f"B>={2 ** int(math.log2(B))}", f"T>={2 ** int(math.log2(T))}", f"threads={threads}")
    with _lock:
        rec = _records.setdefault(key, dict(calls=0, runs=[0, 0], best=[math.inf, math.inf]))
        rec["calls"] += 1
        decided = _decision(rec)
        if decided is None and rec["calls"] <= _WARMUP:
            way = None  # untimed: the first calls pay for packing weights
        elif decided is None:
            way = 1 if rec["runs"][1] <= rec["runs"][0] else 0
        else:
            way = 1 if decided == "wavefront" else 0
    start = time.perf_counter()
    result = run_stack(module, inputs, lengths, h0, c0) if way == 1 else layer_by_layer()
    if way is not None:
        elapsed = time.perf_counter() - start
        with _lock:
            rec["runs"][way] += 1
            rec["best"][way] = min(rec["best"][way], elapsed)
    return result


def run_stack(module, inputs: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
              chunks: int = CHUNKS):
    """ElmoLstm._run_stack by the wavefront (Note [wavefront]): -> (L, B, T, 2P), h_n, c_n."""
    T = inputs.shape[1]
    L, p, n = module.num_layers, module.hidden_size, module.cell_size
    K = max(1, min(chunks, T))
    bounds = [k * T // K for k in range(K + 1)]
    chunk_lengths = [(lengths - bounds[k]).clamp(0, bounds[k + 1] - bounds[k]) for k in range(K)]
    stacks = (module.forward_layers, module.backward_layers)
    weights = [[layer.weights() for layer in stack] for stack in stacks]
    state = [[(h0[l, :, d * p:(d + 1) * p], c0[l, :, d * n:(d + 1) * n]) for l in range(L)] for d in range(2)]
    out: List[List[List[Optional[torch.Tensor]]]] = [[[None] * K for _ in range(L)] for _ in range(2)]
    cell = functional._check_clip(module.cell_clip_value, "cell_clip")
    proj = functional._check_clip(module.proj_clip_value, "proj_clip")
    for stage in range(K + L - 1):
        chains = []  # (direction, layer, chunk, input)
        for l in range(max(0, stage - K + 1), min(L, stage + 1)):
            for d in range(2):
                k = stage - l if d == 0 else K - 1 - (stage - l)
                x = inputs[:, bounds[k]:bounds[k + 1]] if l == 0 else out[d][l - 1][k]
                chains.append((d, l, k, x))
        results = torch.ops.elmo_fast._lstm_chains(
            [x for _, _, _, x in chains], [chunk_lengths[k] for _, _, k, _ in chains],
            *([weights[d][l][i] for d, l, _, _ in chains] for i in range(4)),
            [state[d][l][0] for d, l, _, _ in chains], [state[d][l][1] for d, l, _, _ in chains],
            [d == 1 for d, _, _, _ in chains], cell, proj)
        for (d, l, k, x), o, h, c in zip(chains, *results):
            out[d][l][k] = o + x if l != 0 else o  # skip connections on outputs only (spec §5.3)
            state[d][l] = (h, c)
    outputs = torch.stack([torch.cat([torch.cat(out[d][l], dim=1) for d in range(2)], dim=-1) for l in range(L)])
    h_n = torch.stack([torch.cat([state[0][l][0], state[1][l][0]], dim=-1) for l in range(L)])
    c_n = torch.stack([torch.cat([state[0][l][1], state[1][l][1]], dim=-1) for l in range(L)])
    return outputs, h_n, c_n
