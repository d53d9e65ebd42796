"""LSTM layers as a pipeline over chunks of time steps on many-core CPUs (inference): ElmoLstm's two
stacks, and elmo_fast.nn.LSTM with several layers in one direction.

Note [wavefront]
In a stack of LSTM layers that all run one way (ElmoLstm has two such stacks, forward and backward;
a unidirectional nn.LSTM one), layer l + 1 at step t needs only layer l up to step t. So with threads
to spare the layers can run as a pipeline over K chunks of time: at stage s, layer l of a forward stack
runs chunk s - l and layer l of a backward stack runs chunk K - 1 - (s - l) (it reads time from the
end), and a stage's chains (up to L per stack) run at the same time, each on its own team of threads
(torch.ops.elmo_fast._lstm_chains, csrc/cpu/lstm_chains.cpp). A bidirectional nn.LSTM has no such
pipeline: each of its layers reads both directions of the one below at every step.
Chunk k of a row is its steps [b_k, b_k+1) with length clamp(length - b_k, 0, b_k+1 - b_k), and the state
carries from chunk to chunk: a row that ended before b_k passes its state through (lstm_projection's
length-0 rule), and the reverse direction runs each row backwards within its length inside a chunk,
which is the whole sequence's reverse order cut at the boundaries. Results are the layer-by-layer
results up to float rounding (each chunk has its own input GEMM).
Costs: K chunks take K + L - 1 stages, the first and last L - 1 with fewer chains; the input GEMMs are
1/K as tall. It can only pay where a GEMM split over T threads scales worse than over the chains' teams
of T / (chains of a stage), i.e. on many cores; our 2-core machines cannot show that. So "auto"
considers it only with 2 or more layers and at least a thread per chain of a full stage, and then
times it against the layer-by-layer path on the first calls of each shape class, keeping the faster;
"on" always takes it where it applies, "off" never (ELMO_FAST_CPU_WAVEFRONT, or set_mode). It applies to CPU inference only: no autograd, no autocast,
no dropout, inputs and parameters of one dtype, not under torch.compile.
"""
import math
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from elmo_fast import functional

MODES = ("auto", "on", "off")
CHUNKS = 4
# Warm-up calls take the layer-by-layer path untimed: the first packs the weights, and by the third
# the directions' own measured choice (Note [side by side]: 2 warm-up and 2 + 2 timed calls per layer
# shape; ELMo's two layers share one) is decided, so the trials compare against its final form.
_WARMUP, _TRIALS = 3, 2

_mode: Optional[str] = None
_lock = threading.Lock()
_records: Dict[tuple, dict] = {}

Result = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # out, h_n, c_n


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


def _applies(inputs: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    if inputs.device.type != "cpu" or inputs.shape[0] == 0 or inputs.shape[1] < 2:
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    others = [h0, c0, *params]
    if any(t.dtype != inputs.dtype or t.device.type != "cpu" for t in others):
        return False  # the layer-by-layer path raises its clear errors (or casts)
    return not functional._needs_grad(inputs, *others)  # _lstm_chains has no autograd formula


def _shape_key(what: str, inputs: torch.Tensor, *sizes) -> tuple:
    B, T = inputs.shape[:2]
    return (what, str(inputs.dtype), *sizes, f"B>={2 ** int(math.log2(B))}", f"T>={2 ** int(math.log2(T))}")


def _choose(key: tuple, layers: int, chains: int, wavefront: Callable[[], Result],
            layer_by_layer: Callable[[], Result]) -> Result:
    """One of the two ways, as the mode and the measurements of this shape class say (the caller has
    checked that the wavefront applies)."""
    current = mode()
    if current == "on":
        return wavefront()
    threads = torch.get_num_threads()
    if current == "off" or layers < 2 or threads < chains:
        return layer_by_layer()
    key = key + (f"threads={threads}",)
    with _lock:
        rec = _records.setdefault(key, dict(calls=0, runs=[0, 0], best=[math.inf, math.inf]))
        rec["calls"] += 1
        decided = _decision(rec)
        if decided is None and rec["calls"] <= _WARMUP:
            way = None  # untimed (above)
        elif decided is None:
            way = 1 if rec["runs"][1] <= rec["runs"][0] else 0
        else:
            way = 1 if decided == "wavefront" else 0
    start = time.perf_counter()
    result = wavefront() if way == 1 else layer_by_layer()
    if way is not None:
        elapsed = time.perf_counter() - start
        with _lock:
            rec["runs"][way] += 1
            rec["best"][way] = min(rec["best"][way], elapsed)
    return result


def pipeline(inputs: torch.Tensor, lengths: torch.Tensor, weights: Sequence[Sequence[tuple]],
             reverse: Sequence[bool], h0: Sequence[Sequence[torch.Tensor]], c0: Sequence[Sequence[torch.Tensor]],
             cell_clip: float, proj_clip: float, skip: bool, chunks: int = CHUNKS):
    """Stacks of layers over one input by the wavefront (Note [wavefront]). weights[s][l]: stack s, layer
    l as (w_ih, w_hh, bias, w_proj); reverse[s]: the stack's direction; h0/c0[s][l] its initial state;
    skip: layers >= 1 add their input to their output (ElmoLstm). Returns out[s][l] (B, T, P) and the
    final h[s][l], c[s][l]."""
    T = inputs.shape[1]
    S, L = len(weights), len(weights[0])
    K = max(1, min(chunks, T))
    bounds = [k * T // K for k in range(K + 1)]
    chunk_lengths = [(lengths - bounds[k]).clamp(0, bounds[k + 1] - bounds[k]) for k in range(K)]
    state = [[(h0[s][l], c0[s][l]) for l in range(L)] for s in range(S)]
    out: List[List[List[Optional[torch.Tensor]]]] = [[[None] * K for _ in range(L)] for _ in range(S)]
    for stage in range(K + L - 1):
        chains = []  # (stack, layer, chunk, input)
        for l in range(max(0, stage - K + 1), min(L, stage + 1)):
            for s in range(S):
                k = K - 1 - (stage - l) if reverse[s] else stage - l
                x = inputs[:, bounds[k]:bounds[k + 1]] if l == 0 else out[s][l - 1][k]
                chains.append((s, l, k, x))
        results = torch.ops.elmo_fast._lstm_chains(
            [x for _, _, _, x in chains], [chunk_lengths[k] for _, _, k, _ in chains],
            *([weights[s][l][i] for s, l, _, _ in chains] for i in range(4)),
            [state[s][l][0] for s, l, _, _ in chains], [state[s][l][1] for s, l, _, _ in chains],
            [reverse[s] for s, _, _, _ in chains], cell_clip, proj_clip)
        for (s, l, k, x), o, h, c in zip(chains, *results):
            out[s][l][k] = o + x if skip and l != 0 else o
            state[s][l] = (h, c)
    outputs = [[torch.cat(out[s][l], dim=1) for l in range(L)] for s in range(S)]
    return outputs, [[h for h, _ in row] for row in state], [[c for _, c in row] for row in state]


def run_stack(module, inputs: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
              chunks: int = CHUNKS) -> Result:
    """ElmoLstm._run_stack by the wavefront: -> (L, B, T, 2P), h_n, c_n."""
    L, p, n = module.num_layers, module.hidden_size, module.cell_size
    stacks = (module.forward_layers, module.backward_layers)
    outs, hs, cs = pipeline(
        inputs, lengths, [[layer.weights() for layer in stack] for stack in stacks], (False, True),
        [[h0[l, :, d * p:(d + 1) * p] for l in range(L)] for d in range(2)],
        [[c0[l, :, d * n:(d + 1) * n] for l in range(L)] for d in range(2)],
        functional._check_clip(module.cell_clip_value, "cell_clip"),
        functional._check_clip(module.proj_clip_value, "proj_clip"), skip=True, chunks=chunks)
    join = lambda per_stack: torch.stack([torch.cat([per_stack[0][l], per_stack[1][l]], dim=-1)  # noqa: E731
                                          for l in range(L)])
    return join(outs), join(hs), join(cs)


def run(module, inputs: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
        layer_by_layer: Callable[[], Result]) -> Result:
    """ElmoLstm's stack by the wavefront or by `layer_by_layer`, as the mode and the measurements say."""
    if not _applies(inputs, h0, c0, list(module.parameters())):
        return layer_by_layer()
    key = _shape_key("ElmoLstm", inputs, module.input_size, module.hidden_size, module.cell_size, module.num_layers)
    return _choose(key, module.num_layers, 2 * module.num_layers,
                   lambda: run_stack(module, inputs, lengths, h0, c0), layer_by_layer)


def lstm_applies(module, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> bool:
    """Whether elmo_fast.nn.LSTM may take run_lstm: one direction, several layers, no dropout between them."""
    return (not module.bidirectional and module.num_layers >= 2 and not (module.dropout > 0 and module.training)
            and _applies(x, h0, c0, list(module.parameters())))


def run_lstm(module, x: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
             layer_by_layer: Callable[[], Result], chunks: int = CHUNKS) -> Result:
    """elmo_fast.nn.LSTM's layers (x (B, T, I) batch first; h0, c0 (L, B, .)) by the wavefront or by
    `layer_by_layer`, as the mode and the measurements say: -> last layer's out, h_n, c_n."""
    L = module.num_layers

    def wavefront() -> Result:
        outs, hs, cs = pipeline(x, lengths, [[module._weights(l) for l in range(L)]], (False,),
                                [list(h0.unbind(0))], [list(c0.unbind(0))],
                                functional._check_clip(module.cell_clip, "cell_clip"),
                                functional._check_clip(module.proj_clip, "proj_clip"), skip=False, chunks=chunks)
        return outs[0][-1], torch.stack(hs[0]), torch.stack(cs[0])

    key = _shape_key("LSTM", x, module.input_size, module.hidden_size, module.proj_size, L)
    return _choose(key, L, L, wavefront, layer_by_layer)
