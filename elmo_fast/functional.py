"""The hot paths as functions: tensors in, tensors out. Each validates its arguments (a clear
ValueError/TypeError naming the argument) and calls the fused op in torch.ops.elmo_fast.
elmo_fast.reference holds the same functions in plain PyTorch, as the tests' oracle.
"""
import functools
import platform
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from elmo_fast import _cuda_support
from elmo_fast import _ops  # noqa: F401  (registers torch.ops.elmo_fast.*)

__all__ = ["highway", "char_cnn", "lstm_projection", "lstm_bidirectional"]

_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float_dtype(t: torch.Tensor, name: str) -> None:
    allowed = _DTYPES.get(t.device.type)
    if allowed is None:
        raise ValueError(f"{name} is on {t.device}; elmo_fast supports cpu and cuda tensors")
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype {names} on {t.device.type}, got {str(t.dtype).replace('torch.', '')}")
    if t.device.type == "cuda" and not torch.compiler.is_compiling():
        _check_cuda_device(t.device.index if t.device.index is not None else torch.cuda.current_device(), name)


def _cuda_device_problem(index: int, name: str) -> Optional[str]:
    """Why this build cannot run on CUDA device index, where tensor name is, or None."""
    import elmo_fast

    info = elmo_fast.build_info()
    if not info["cuda"]:
        return (f"{name} is on cuda, but this elmo_fast was built without its CUDA kernels (no CUDA toolkit "
                f"at build time, or ELMO_FAST_CUDA=0). Rebuild on a machine with nvcc, from the source tree: "
                f"ELMO_FAST_CUDA=1 pip install --no-build-isolation -e .")
    return _cuda_support.unsupported_gpu_message(name, ";".join(info["cuda_arch"]),
                                                 torch.cuda.get_device_capability(index),
                                                 f"cuda:{index} ({torch.cuda.get_device_name(index)})")


@functools.lru_cache(maxsize=None)
def _cuda_device_ok(index: int) -> bool:
    return _cuda_device_problem(index, "") is None


def _check_cuda_device(index: int, name: str) -> None:
    """Once per device (cached): a GPU this build has no code for is a clear error before any op."""
    if not _cuda_device_ok(index):
        raise RuntimeError(_cuda_device_problem(index, name))


def _check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def _check_tensor_list(values, name: str) -> list:
    if isinstance(values, torch.Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(values).__name__}")
    return [_check_tensor(v, f"{name}[{k}]") for k, v in enumerate(values)]


def _autocast(device: torch.device, *values):
    """Under torch.autocast("cpu") the CPU ops run in bfloat16 (their autocast rule in _ops.py casts
    every floating input but float64, as torch.library.register_autocast does). The same cast is done
    here first, so that the checks below see the dtypes the op will, e.g. a bf16 activation with
    float32 weights. values: tensors, None or lists of tensors; returned in the same shape."""
    if device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return values

    def cast(v):
        if isinstance(v, torch.Tensor):
            ok = v.is_floating_point() and v.device.type == "cpu" and v.dtype != torch.float64
            return v.to(torch.bfloat16) if ok else v
        return [cast(t) for t in v] if isinstance(v, list) else v

    return tuple(cast(v) for v in values)


@functools.lru_cache(maxsize=None)
def _native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively: x86 avx512_bf16 or amx_bf16, Arm bf16
    (the flags of /proc/cpuinfo). False where the flags cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in words
    return "avx512_bf16" in words or "amx_bf16" in words


_warned_slow_bf16 = False


def _check_bf16_speed(t: torch.Tensor) -> None:
    """Warns once per process when bfloat16 runs on a CPU without native bf16: it works (converted to
    float around every product) but is slower than float32 there."""
    global _warned_slow_bf16
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or _warned_slow_bf16 or torch.compiler.is_compiling():
        return
    if not _native_bf16():
        _warned_slow_bf16 = True
        warnings.warn("elmo_fast: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16 flag); bfloat16 "
                      "works but will be slow, likely slower than float32", RuntimeWarning, stacklevel=3)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def highway(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """AllenNLP's highway stack (spec §4.2 step 4) as one fused op per call.

    x: (N, F); weights[k]: (2F, F); biases[k]: (2F,) -> (N, F). Per layer k:
    proj = x @ W_k^T + b_k; x <- g * x + (1 - g) * relu(proj[:, :F]) with g = sigmoid(proj[:, F:]).
    """
    x = _check_tensor(x, "x")
    weights = _check_tensor_list(weights, "weights")
    biases = _check_tensor_list(biases, "biases")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, F), got {tuple(x.shape)}")
    x, weights, biases = _autocast(x.device, x, weights, biases)
    _check_float_dtype(x, "x")
    _check_bf16_speed(x)
    if len(weights) != len(biases):
        raise ValueError(f"weights and biases must have one entry per layer, got {len(weights)} and {len(biases)}")
    f = x.shape[1]
    for k, (w, b) in enumerate(zip(weights, biases)):
        if tuple(w.shape) != (2 * f, f):
            raise ValueError(f"weights[{k}] must have shape (2F, F) = {(2 * f, f)} for x of F = {f}, got {tuple(w.shape)}")
        if tuple(b.shape) != (2 * f,):
            raise ValueError(f"biases[{k}] must have shape (2F,) = {(2 * f,)}, got {tuple(b.shape)}")
        _check_like(w, x, f"weights[{k}]", "x")
        _check_like(b, x, f"biases[{k}]", "x")
    save = _needs_grad(x, *weights, *biases)
    y, _ = torch.ops.elmo_fast.highway(x, weights, biases, save)
    return y


def char_cnn(char_ids: torch.Tensor, embedding: torch.Tensor, weights: Sequence[torch.Tensor],
             biases: Sequence[torch.Tensor], activation: str = "relu") -> torch.Tensor:
    """ELMo's character CNN (spec §4.2 steps 1-3).

    char_ids: (N, C) int64 in 0..261 (0 = padding slot); embedding: (262, d);
    weights[i]: (m_i, d, w_i) (Conv1d layout); biases[i]: (m_i,) -> (N, sum m_i):
    concat over i of act(max_t conv_i(embedding[char_ids])[t] + b_i), act = relu or tanh.
    """
    char_ids = _check_tensor(char_ids, "char_ids")
    embedding = _check_tensor(embedding, "embedding")
    weights = _check_tensor_list(weights, "weights")
    biases = _check_tensor_list(biases, "biases")
    if char_ids.dtype.is_floating_point or char_ids.dtype.is_complex or char_ids.dtype == torch.bool:
        raise TypeError(f"char_ids must be an integer tensor (int64 char ids), got dtype {char_ids.dtype}")
    if char_ids.dim() != 2:
        raise ValueError(f"char_ids must have shape (N, C), got {tuple(char_ids.shape)}")
    if embedding.dim() != 2 or embedding.shape[0] < 1 or embedding.shape[1] < 1:
        raise ValueError(f"embedding must have shape (V, d) with V, d >= 1, got {tuple(embedding.shape)}")
    embedding, weights, biases = _autocast(embedding.device, embedding, weights, biases)
    _check_float_dtype(embedding, "embedding")
    _check_bf16_speed(embedding)
    if char_ids.device != embedding.device:
        raise ValueError(f"char_ids is on {char_ids.device} but embedding is on {embedding.device}; "
                         "they must be on one device")
    if not isinstance(activation, str) or activation not in ("relu", "tanh"):
        raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
    if len(weights) != len(biases):
        raise ValueError(f"weights and biases must have one entry per filter width, got {len(weights)} and "
                         f"{len(biases)}")
    d = embedding.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 3 or w.shape[1] != d or w.shape[2] < 1:
            raise ValueError(f"weights[{i}] must have shape (m, d, width) = (m, {d}, width >= 1) for embedding "
                             f"of d = {d}, got {tuple(w.shape)}")
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"biases[{i}] must have shape (m,) = {(w.shape[0],)} to match weights[{i}], "
                             f"got {tuple(b.shape)}")
        _check_like(w, embedding, f"weights[{i}]", "embedding")
        _check_like(b, embedding, f"biases[{i}]", "embedding")
    widest = max([1] + [w.shape[2] for w in weights])  # no max(default=): dynamo in torch 2.13 rejects it
    if char_ids.shape[1] < widest:
        raise ValueError(f"char_ids has {char_ids.shape[1]} char slots per token, fewer than the widest filter "
                         f"of weights ({widest})")
    char_ids = char_ids.long()
    # The id range is a value check (one device sync on CUDA); under torch.compile the op's own
    # check (CPU) or clamp (CUDA) stands in, so that the graph does not break.
    if char_ids.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(char_ids)
        if lo.item() < 0 or hi.item() >= embedding.shape[0]:
            raise ValueError(f"char_ids must lie in 0..{embedding.shape[0] - 1} (the rows of embedding), got values "
                             f"in {lo.item()}..{hi.item()}")
    save = _needs_grad(embedding, *weights, *biases)
    out, _ = torch.ops.elmo_fast.char_cnn(char_ids, embedding, weights, biases, activation, save)
    return out


def _check_clip(value, name: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    return float(value)


def _check_direction(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, where: str = "", check_lengths: bool = True):
    """lstm_projection's argument checks (messages name the argument, prefixed by `where`); returns
    (x, lengths, w_ih, w_hh, bias, w_proj, h0, c0) after the autocast cast."""
    x = _check_tensor(x, f"{where}x")
    lengths = _check_tensor(lengths, "lengths")
    w_ih, w_hh = _check_tensor(w_ih, f"{where}w_ih"), _check_tensor(w_hh, f"{where}w_hh")
    h0, c0 = _check_tensor(h0, f"{where}h0"), _check_tensor(c0, f"{where}c0")
    if bias is not None:
        bias = _check_tensor(bias, f"{where}bias")
    if w_proj is not None:
        w_proj = _check_tensor(w_proj, f"{where}w_proj")
    if x.dim() != 3:
        raise ValueError(f"{where}x must have shape (B, T, I), got {tuple(x.shape)}")
    x, w_ih, w_hh, bias, w_proj, h0, c0 = _autocast(x.device, x, w_ih, w_hh, bias, w_proj, h0, c0)
    _check_float_dtype(x, f"{where}x")
    _check_bf16_speed(x)
    b, t, i = x.shape
    if lengths.device.type != "cpu":
        raise ValueError(f"lengths must be a CPU tensor (as for pack_padded_sequence), got one on {lengths.device}")
    if lengths.dtype != torch.int64:
        raise TypeError(f"lengths must have dtype int64, got {str(lengths.dtype).replace('torch.', '')}")
    if lengths.dim() != 1 or lengths.shape[0] != b:
        raise ValueError(f"lengths must have shape (B,) = ({b},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(lengths.shape)}")
    if w_ih.dim() != 2 or w_ih.shape[0] % 4 != 0:
        raise ValueError(f"{where}w_ih must have shape (4n, I), got {tuple(w_ih.shape)}")
    n = w_ih.shape[0] // 4
    if w_ih.shape[1] != i:
        raise ValueError(f"{where}w_ih must have shape (4n, I) = ({4 * n}, {i}) for x with I = {i} features, "
                         f"got {tuple(w_ih.shape)}")
    p = w_proj.shape[0] if w_proj is not None and w_proj.dim() == 2 else n
    if w_proj is not None and tuple(w_proj.shape) != (p, n):
        raise ValueError(f"{where}w_proj must have shape (P, n) with n = {n}, got {tuple(w_proj.shape)}")
    if tuple(w_hh.shape) != (4 * n, p):
        raise ValueError(f"{where}w_hh must have shape (4n, P) = {(4 * n, p)}, got {tuple(w_hh.shape)}")
    if bias is not None and tuple(bias.shape) != (4 * n,):
        raise ValueError(f"{where}bias must have shape (4n,) = ({4 * n},), got {tuple(bias.shape)}")
    if tuple(h0.shape) != (b, p):
        raise ValueError(f"{where}h0 must have shape (B, P) = {(b, p)}, got {tuple(h0.shape)}")
    if tuple(c0.shape) != (b, n):
        raise ValueError(f"{where}c0 must have shape (B, n) = {(b, n)}, got {tuple(c0.shape)}")
    for value, name in ((w_ih, "w_ih"), (w_hh, "w_hh"), (bias, "bias"), (w_proj, "w_proj"), (h0, "h0"), (c0, "c0")):
        if value is not None:
            _check_like(value, x, where + name, f"{where}x")
    if check_lengths and not torch.compiler.is_compiling() and b > 0:  # value checks would break a compiled graph
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > t:
            raise ValueError(f"lengths must lie in [0, T] = [0, {t}], got values in [{low}, {high}]")
    return x, lengths, w_ih, w_hh, bias, w_proj, h0, c0


def lstm_projection(x: torch.Tensor, lengths: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                    bias: Optional[torch.Tensor], w_proj: Optional[torch.Tensor], h0: torch.Tensor,
                    c0: torch.Tensor, cell_clip: Optional[float] = None, proj_clip: Optional[float] = None,
                    reverse: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer, one direction of ELMo's LSTM with projection over a whole batch (spec §5.1-5.2).

    x: (B, T, I); lengths: (B,) int64, each <= T; w_ih: (4n, I); w_hh: (4n, P); bias: (4n,) or None;
    w_proj: (P, n) or None (plain LSTM, P = n); h0: (B, P); c0: (B, n). Gate order [i, f, j, o].
    Returns out (B, T, P) (zero at t >= length), h_n (B, P), c_n (B, n).

    lengths must be a CPU int64 tensor (as for torch's pack_padded_sequence): the op plans its row
    order on the host. cell_clip / proj_clip: None or <= 0 means no clip.
    """
    x, lengths, w_ih, w_hh, bias, w_proj, h0, c0 = _check_direction(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0)
    cell = _check_clip(cell_clip, "cell_clip")
    proj = _check_clip(proj_clip, "proj_clip")
    save = _needs_grad(x, w_ih, w_hh, h0, c0, *(v for v in (bias, w_proj) if v is not None))
    out, h_n, c_n, _ = torch.ops.elmo_fast.lstm_projection(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell, proj,
                                                           bool(reverse), save)
    return out, h_n, c_n


def lstm_bidirectional(x, lengths: torch.Tensor, weights, h0, c0, cell_clip: Optional[float] = None,
                       proj_clip: Optional[float] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor],
                                                                    List[torch.Tensor]]:
    """Both directions of one layer: lstm_projection forward and reversed, in one op so that the CPU
    can run the two side by side when that is faster on this machine (ELMO_FAST_CPU_DIRECTIONS).

    x: one (B, T, I) tensor both directions read (torch.nn.LSTM), or a pair (forward's, reverse's
    input: ELMo's two stacks); weights: a pair of (w_ih, w_hh, bias, w_proj) tuples; h0, c0: pairs.
    Returns ([out_fwd, out_rev], [h_n_fwd, h_n_rev], [c_n_fwd, c_n_rev]), each as lstm_projection's.
    """
    xs = [x, x] if isinstance(x, torch.Tensor) else list(x)
    for value, name in ((xs, "x"), (weights, "weights"), (h0, "h0"), (c0, "c0")):
        if isinstance(value, torch.Tensor) or len(value) != 2:
            raise ValueError(f"{name} must be a pair (forward, reverse)" + (" or one tensor" if name == "x" else ""))
    checked = []
    for i, where in enumerate(("forward ", "reverse ")):
        if len(weights[i]) != 4:
            raise ValueError(f"weights[{i}] must be (w_ih, w_hh, bias, w_proj), got {len(weights[i])} items")
        checked.append(_check_direction(xs[i], lengths, *weights[i], h0[i], c0[i], where=where, check_lengths=i == 0))
    (xf, lengths, *wf), (xb, _, *wb) = checked
    _check_like(xb, xf, "reverse x", "forward x")
    if xf.shape[:2] != xb.shape[:2]:
        raise ValueError(f"forward and reverse x must share (B, T), got {tuple(xf.shape)} and {tuple(xb.shape)}")
    for k, name in ((2, "bias"), (3, "w_proj")):
        if (wf[k] is None) != (wb[k] is None):  # autograd sees a Tensor?[] holding a None as no tensor
            raise ValueError(f"{name} must be given for both directions or for neither")
    cell = _check_clip(cell_clip, "cell_clip")
    proj = _check_clip(proj_clip, "proj_clip")
    pairs = [[wf[k], wb[k]] for k in range(6)]  # w_ih, w_hh, bias, w_proj, h0, c0
    save = _needs_grad(xf, xb, *(v for pair in pairs for v in pair if v is not None))
    out, h_n, c_n, _ = torch.ops.elmo_fast.lstm_bidirectional([xf, xb], lengths, *pairs, cell, proj, save)
    return list(out), list(h_n), list(c_n)
