"""Load bilm-tf ``options.json`` + ``*_weights.hdf5`` into AllenNLP ``_ElmoBiLm`` tensors (spec §1, §2).

Shape letters: d char embedding width, w_i / m_i width and count of filter group i, F = sum m_i,
P projection_dim, n lstm.dim (cells), L n_layers, H n_highway.

Note [TF -> AllenNLP LSTM layout]: TF's LSTMCell keeps W_0 (P + P, 4n) with column blocks
[i, j, f, o] and adds the forget bias 1.0 at run time; AllenNLP keeps (4n, in) row blocks
[i, f, j, o] with the +1 folded into state_linearity.bias. So: transpose, add 1 to the TF f block of
B, swap blocks 1 and 2, split columns into input (first P) and state (last P) parts.
"""
import json
import math
import os
import re
from typing import Any, Dict, List, Tuple, Union

import h5py
import numpy as np
import torch

__all__ = ["ElmoWeightsError", "ElmoWeightsFileNotFoundError", "load_options", "load_weights"]

PathLike = Union[str, "os.PathLike[str]"]

_REQUIRED_POSITIVE_INTS = ("char_cnn.embedding.dim", "lstm.dim", "lstm.projection_dim", "lstm.n_layers")
_CLIPS = ("lstm.cell_clip", "lstm.proj_clip")
_ACTIVATIONS = ("relu", "tanh")
# Datasets of these families must all be ones the options imply: an extra highway layer, LSTM layer
# or filter group means the options and the weights describe different models.
_INDEXED_DATASET = re.compile(r"^(CNN/[Wb]_cnn_\d+|CNN_high_\d+/.*|RNN_\d+/.*)$")


class ElmoWeightsError(ValueError):
    """An options or weight file that cannot be loaded; the message names the file and the key/dataset."""


class ElmoWeightsFileNotFoundError(ElmoWeightsError, FileNotFoundError):
    """A missing options or weight file (also a FileNotFoundError)."""


def _fspath(path: PathLike, argument: str) -> str:
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{argument} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


def _lookup(options: Dict[str, Any], dotted: str, path: str) -> Any:
    node: Any = options
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ElmoWeightsError(f"options file {path!r}: missing key {dotted!r}")
        node = node[part]
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_filters(filters: Any, path: str) -> None:
    if not isinstance(filters, list) or not filters:
        raise ElmoWeightsError(f"options file {path!r}: key 'char_cnn.filters' must be a non-empty list of "
                               f"[width, num_filters] pairs, found {filters!r}")
    for i, pair in enumerate(filters):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_int(v) and v > 0 for v in pair)
        # A filter wider than the 50 chars of a token has no valid position to take the max over.
        if not ok or pair[0] > 50:
            raise ElmoWeightsError(f"options file {path!r}: key 'char_cnn.filters[{i}]' must be "
                                   f"[width (1..50), num_filters (>0)], found {pair!r}")


def load_options(options_file: PathLike) -> Dict[str, Any]:
    """Read and validate a bilm-tf options.json (spec §1).

    Returns the parsed dict with two defaults filled in (as bilm-tf reads them):
    char_cnn.n_highway = 0 when absent, char_cnn.max_characters_per_token = 50 when absent.
    Raises ElmoWeightsError (ElmoWeightsFileNotFoundError if missing) naming the file and the key.
    """
    path = _fspath(options_file, "options_file")
    if not os.path.isfile(path):
        raise ElmoWeightsFileNotFoundError(f"options file {path!r} does not exist or is not a file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            options = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ElmoWeightsError(f"options file {path!r} is not valid JSON: {e}") from e
    if not isinstance(options, dict):
        raise ElmoWeightsError(f"options file {path!r}: expected a JSON object, found {type(options).__name__}")

    for key in _REQUIRED_POSITIVE_INTS:
        value = _lookup(options, key, path)
        if not _is_int(value) or value <= 0:
            raise ElmoWeightsError(f"options file {path!r}: key {key!r} must be a positive integer, found {value!r}")
    _check_filters(_lookup(options, "char_cnn.filters", path), path)
    activation = _lookup(options, "char_cnn.activation", path)
    if activation not in _ACTIVATIONS:
        raise ElmoWeightsError(f"options file {path!r}: key 'char_cnn.activation' must be one of "
                               f"{_ACTIVATIONS}, found {activation!r}")
    for key in _CLIPS:
        # null or <= 0 means "no clip" downstream; anything else must be a real number.
        value = _lookup(options, key, path)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or math.isnan(value)):
            raise ElmoWeightsError(f"options file {path!r}: key {key!r} must be a number or null, found {value!r}")
    if _lookup(options, "lstm", path).get("use_skip_connections") is not True:
        # AllenNLP refuses these too: "We only support pretrained biLMs with residual connections".
        raise ElmoWeightsError(f"options file {path!r}: key 'lstm.use_skip_connections' must be true "
                               f"(only biLMs with residual connections are supported), found "
                               f"{options['lstm'].get('use_skip_connections', '<missing>')!r}")

    cnn = options["char_cnn"]
    n_highway = cnn.setdefault("n_highway", 0)
    if n_highway is None:  # bilm-tf treats a falsy n_highway as "no highway"
        n_highway = cnn["n_highway"] = 0
    if not _is_int(n_highway) or n_highway < 0:
        raise ElmoWeightsError(f"options file {path!r}: key 'char_cnn.n_highway' must be an integer >= 0, "
                               f"found {n_highway!r}")
    # 50 is hard-coded in the char-id mapping (chars.MAX_CHARS); the option only reshapes.
    max_chars = cnn.setdefault("max_characters_per_token", 50)
    if max_chars != 50 or not _is_int(max_chars):
        raise ElmoWeightsError(f"options file {path!r}: key 'char_cnn.max_characters_per_token' must be 50, "
                               f"found {max_chars!r}")
    return options


def _expected_shapes(options: Dict[str, Any]) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """dataset name -> (shape, the option keys it follows from), except char_embed (261 or 262 rows)."""
    cnn, lstm = options["char_cnn"], options["lstm"]
    d, filters = cnn["embedding"]["dim"], [tuple(p) for p in cnn["filters"]]
    n_filters = sum(m for _, m in filters)
    n, p = lstm["dim"], lstm["projection_dim"]
    shapes: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for i, (w, m) in enumerate(filters):
        why = f"char_cnn.filters[{i}] = [{w}, {m}], char_cnn.embedding.dim = {d}"
        shapes[f"CNN/W_cnn_{i}"] = ((1, w, d, m), why)
        shapes[f"CNN/b_cnn_{i}"] = ((m,), why)
    why_f = f"F = sum of char_cnn.filters counts = {n_filters}"
    for k in range(cnn["n_highway"]):
        for part in ("carry", "transform"):
            shapes[f"CNN_high_{k}/W_{part}"] = ((n_filters, n_filters), why_f)
            shapes[f"CNN_high_{k}/b_{part}"] = ((n_filters,), why_f)
    shapes["CNN_proj/W_proj"] = ((n_filters, p), f"{why_f}, lstm.projection_dim = {p}")
    shapes["CNN_proj/b_proj"] = ((p,), f"lstm.projection_dim = {p}")
    why_l = f"lstm.projection_dim = {p}, lstm.dim = {n}"
    for direction in range(2):
        for layer in range(lstm["n_layers"]):
            prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
            shapes[f"{prefix}/W_0"] = ((2 * p, 4 * n), why_l)
            shapes[f"{prefix}/B"] = ((4 * n,), why_l)
            shapes[f"{prefix}/W_P_0"] = ((n, p), why_l)
    return shapes


class _Reader:
    """Reads datasets from one open hdf5 file, each once, with errors naming file and dataset."""

    def __init__(self, handle: h5py.File, path: str):
        self.handle, self.path = handle, path

    def fail(self, name: str, message: str) -> ElmoWeightsError:
        return ElmoWeightsError(f"weight file {self.path!r}: dataset {name!r} {message}")

    def dataset(self, name: str) -> h5py.Dataset:
        obj = self.handle.get(name)
        if obj is None:
            raise self.fail(name, "is missing")
        if not isinstance(obj, h5py.Dataset):
            raise self.fail(name, "is not a dataset")
        if obj.dtype.kind != "f":
            raise self.fail(name, f"has dtype {obj.dtype}, expected floating point (float32)")
        return obj

    def read(self, name: str, shape: Tuple[int, ...], why: str) -> np.ndarray:
        ds = self.dataset(name)
        if ds.shape != shape:
            raise self.fail(name, f"has shape {ds.shape}, expected {shape} (from options: {why})")
        return self.load(name, ds)

    def load(self, name: str, ds: h5py.Dataset) -> np.ndarray:
        try:
            return ds[()]
        except (OSError, ValueError, RuntimeError) as e:  # a truncated or corrupt file fails here
            raise self.fail(name, f"cannot be read (damaged or truncated file?): {e}") from e


def _widen(x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    # Transform in at least `work` (float32, or float64 for a float64 load) so the +1 forget bias is
    # exact for float64 and rounded once, like AllenNLP's float32 numpy add, otherwise.
    return x.to(torch.promote_types(x.dtype, work))


_TF_BLOCK_OF = (0, 2, 1, 3)   # AllenNLP gate block g [i, f, j, o] is TF block _TF_BLOCK_OF[g] of [i, j, f, o]


def _gates_tf_to_allennlp(x: torch.Tensor, n: int) -> torch.Tensor:
    """TF columns (rows, 4n) in [i, j, f, o] -> AllenNLP (4n, rows) in [i, f, j, o]; one copy."""
    out = x.new_empty(4 * n, *x.shape[:-1])
    for dst, src in enumerate(_TF_BLOCK_OF):
        out[dst * n:(dst + 1) * n].copy_(x[..., src * n:(src + 1) * n].t())
    return out


def _convert(read: _Reader, options: Dict[str, Any], shapes: Dict[str, Tuple[Tuple[int, ...], str]],
             char_embed: np.ndarray, work: torch.dtype) -> Dict[str, torch.Tensor]:
    """Raw TF arrays -> AllenNLP `_ElmoBiLm` state_dict tensors, computed in at least `work` precision."""

    def get(name: str) -> torch.Tensor:
        return _widen(torch.from_numpy(read.read(name, *shapes[name])), work)

    cnn, lstm = options["char_cnn"], options["lstm"]
    state: Dict[str, torch.Tensor] = {}
    emb = _widen(torch.from_numpy(char_embed), work)
    if emb.shape[0] == 261:  # training layout: ids are shifted +1 at prediction, row 0 = "no token"
        emb = torch.cat([emb.new_zeros(1, emb.shape[1]), emb])
    state["_token_embedder._char_embedding_weights"] = emb
    for i in range(len(cnn["filters"])):
        # TF conv2d kernel (1, w, d, m) -> Conv1d (m, d, w); both are cross-correlations.
        state[f"_token_embedder.char_conv_{i}.weight"] = get(f"CNN/W_cnn_{i}")[0].permute(2, 1, 0)
        state[f"_token_embedder.char_conv_{i}.bias"] = get(f"CNN/b_cnn_{i}")
    for k in range(cnn["n_highway"]):
        # TF's "carry" gate multiplies the relu branch; negating it gives AllenNLP's keep-x gate (spec §4.2.4).
        w_t, w_c = get(f"CNN_high_{k}/W_transform"), get(f"CNN_high_{k}/W_carry")
        b_t, b_c = get(f"CNN_high_{k}/b_transform"), get(f"CNN_high_{k}/b_carry")
        state[f"_token_embedder._highways._layers.{k}.weight"] = torch.cat([w_t.t(), -w_c.t()])
        state[f"_token_embedder._highways._layers.{k}.bias"] = torch.cat([b_t, -b_c])
    state["_token_embedder._projection.weight"] = get("CNN_proj/W_proj").t()
    state["_token_embedder._projection.bias"] = get("CNN_proj/b_proj")

    n, p = lstm["dim"], lstm["projection_dim"]
    for layer in range(lstm["n_layers"]):
        for direction, label in enumerate(("forward", "backward")):
            prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
            w = get(f"{prefix}/W_0")                                    # (P + P, 4n): rows [input ; h]
            bias = get(f"{prefix}/B")                                   # a fresh array: safe to edit
            bias[2 * n:3 * n] += 1.0                                    # TF forget block, before the swap
            key = f"_elmo_lstm.{label}_layer_{layer}"
            state[f"{key}.input_linearity.weight"] = _gates_tf_to_allennlp(w[:p], n)
            state[f"{key}.state_linearity.weight"] = _gates_tf_to_allennlp(w[p:], n)
            state[f"{key}.state_linearity.bias"] = _gates_tf_to_allennlp(bias, n)
            state[f"{key}.state_projection.weight"] = get(f"{prefix}/W_P_0").t()
    return state


def _read_state(read: _Reader, options: Dict[str, Any], options_path: str,
                dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    names: List[str] = []
    read.handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    shapes = _expected_shapes(options)
    # A damaged name may come back as bytes; it cannot be one we need, so only str names are checked.
    extra = sorted(name for name in names
                   if isinstance(name, str) and _INDEXED_DATASET.match(name) and name not in shapes)
    if extra:
        raise read.fail(extra[0], f"is not implied by options file {options_path!r} "
                        f"(char_cnn.filters, char_cnn.n_highway, lstm.n_layers); "
                        f"{len(extra)} such dataset(s) in all")
    d = options["char_cnn"]["embedding"]["dim"]
    ds = read.dataset("char_embed")
    if ds.shape not in ((261, d), (262, d)):
        raise read.fail("char_embed", f"has shape {ds.shape}, expected (261, {d}) or (262, {d}) "
                        f"(from options: char_cnn.embedding.dim = {d})")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return _convert(read, options, shapes, read.load("char_embed", ds), work)


def load_weights(options_file: PathLike, weight_file: PathLike, *,
                 dtype: torch.dtype = torch.float32) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Load and validate an ELMo model: (options, state) with AllenNLP `_ElmoBiLm` state_dict keys.

    state (contiguous tensors of `dtype`, CPU):
      _token_embedder._char_embedding_weights            (262, d)   zero row 0 prepended to a 261-row file
      _token_embedder.char_conv_{i}.weight / .bias       (m_i, d, w_i) / (m_i,)
      _token_embedder._highways._layers.{k}.weight/.bias (2F, F) / (2F,)   [W_transform^T ; -W_carry^T]
      _token_embedder._projection.weight / .bias         (P, F) / (P,)
      _elmo_lstm.{forward,backward}_layer_{l}.input_linearity.weight   (4n, P)  gates [i, f, j, o]
      _elmo_lstm.{forward,backward}_layer_{l}.state_linearity.weight   (4n, P)
      _elmo_lstm.{forward,backward}_layer_{l}.state_linearity.bias     (4n,)    +1 on the forget block
      _elmo_lstm.{forward,backward}_layer_{l}.state_projection.weight  (P, n)
    Raises ElmoWeightsError naming the file and the key or dataset (with expected vs found shape).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    options = load_options(options_file)
    options_path, path = _fspath(options_file, "options_file"), _fspath(weight_file, "weight_file")
    if not os.path.isfile(path):
        raise ElmoWeightsFileNotFoundError(f"weight file {path!r} does not exist or is not a file")
    if not h5py.is_hdf5(path):
        raise ElmoWeightsError(f"weight file {path!r} is not an HDF5 file")
    try:
        handle = h5py.File(path, "r")
    except OSError as e:  # the signature is there, so the file is damaged (e.g. truncated)
        raise ElmoWeightsError(f"weight file {path!r} cannot be opened (damaged or truncated HDF5?): {e}") from e

    with handle:
        try:
            state = _read_state(_Reader(handle, path), options, options_path, dtype)
        except ElmoWeightsError:
            raise
        except (OSError, RuntimeError, KeyError, UnicodeError) as e:  # h5py's errors for damaged metadata
            raise ElmoWeightsError(f"weight file {path!r} is damaged: {type(e).__name__}: {e}") from e
    return options, {k: v.to(dtype).contiguous() for k, v in state.items()}
