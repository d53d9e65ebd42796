"""Write random ELMo options.json + hdf5 files in the real bilm-tf layout (spec §1, §2), for tests and benches.

Shape letters: d char_dim, w_i / m_i width and count of filter group i, F = sum m_i,
P projection_dim, n dim (LSTM cells), L n_layers.
"""
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import h5py
import numpy as np

__all__ = ["PUBLISHED_FILTERS", "published_options", "write_elmo_files"]

PUBLISHED_FILTERS = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024))

# name -> (lstm.dim, lstm.projection_dim, char_cnn.n_highway), spec §1 table.
_PUBLISHED = {
    "small": (1024, 128, 1),
    "medium": (2048, 256, 1),
    "original": (4096, 512, 2),
    "original_5.5B": (4096, 512, 2),
}

# Default weight scales (std of N(0, std) draws, before weight_scale). Chosen so that at the default
# sizes the char-CNN, highway and projection give O(1) activations and the LSTM's cell clip and
# projection clip (3.0 each) bite on a few percent of values, so clipping is exercised by tests.
_BIAS_STD = 0.1
_CARRY_BIAS = -2.0     # trained b_carry stays near its init of -2: the highway mostly passes x through
_LSTM_GAIN = 1.5       # W_0 std = _LSTM_GAIN / sqrt(2P): saturating gates let c build up past 3
_PROJ_GAIN = 3.5       # W_P_0 std = _PROJ_GAIN / sqrt(n): |h| before the clip sometimes exceeds 3


def _options(filters: Sequence[Tuple[int, int]], char_dim: int, n_highway: int, dim: int, projection_dim: int,
             n_layers: int, cell_clip: Any, proj_clip: Any, activation: str) -> Dict[str, Any]:
    # Key set of a published options file, plus the training-only "bidirectional" that real files carry.
    return {
        "bidirectional": True,
        "char_cnn": {
            "activation": activation,
            "embedding": {"dim": char_dim},
            "filters": [[w, m] for w, m in filters],
            "max_characters_per_token": 50,
            "n_characters": 262,
            "n_highway": n_highway,
        },
        "lstm": {
            "cell_clip": cell_clip,
            "dim": dim,
            "n_layers": n_layers,
            "proj_clip": proj_clip,
            "projection_dim": projection_dim,
            "use_skip_connections": True,
        },
    }


def published_options(name: str) -> Dict[str, Any]:
    """A fresh options dict of a published model: "small" | "medium" | "original" (| "original_5.5B")."""
    if name not in _PUBLISHED:
        raise ValueError(f"name must be one of {sorted(_PUBLISHED)}, got {name!r}")
    dim, projection_dim, n_highway = _PUBLISHED[name]
    return _options(PUBLISHED_FILTERS, 16, n_highway, dim, projection_dim, 2, 3, 3, "relu")


def _check_args(filters, char_dim, n_highway, dim, projection_dim, n_layers, activation, char_rows):
    def positive(value, name, minimum=1):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    if len(filters) == 0:
        raise ValueError("filters must be a non-empty sequence of (width, num_filters) pairs")
    for i, pair in enumerate(filters):
        if len(pair) != 2:
            raise ValueError(f"filters[{i}] must be a (width, num_filters) pair, got {pair!r}")
        positive(pair[0], f"filters[{i}] width")
        positive(pair[1], f"filters[{i}] num_filters")
        if pair[0] > 50:
            raise ValueError(f"filters[{i}] width must be <= 50 (characters per token), got {pair[0]}")
    for value, name in ((char_dim, "char_dim"), (dim, "dim"), (projection_dim, "projection_dim"),
                        (n_layers, "n_layers")):
        positive(value, name)
    positive(n_highway, "n_highway", 0)
    if activation not in ("relu", "tanh"):
        raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
    if char_rows not in (261, 262):
        raise ValueError(f"char_rows must be 261 (training layout) or 262, got {char_rows!r}")


def write_elmo_files(directory: Union[str, "os.PathLike[str]"], *,
                     filters: Sequence[Tuple[int, int]] = ((1, 4), (2, 8), (3, 16)), char_dim: int = 4,
                     n_highway: int = 1, dim: int = 16, projection_dim: int = 8, n_layers: int = 2,
                     cell_clip: float = 3.0, proj_clip: float = 3.0, activation: str = "relu",
                     char_rows: int = 261, seed: int = 0, weight_scale: Optional[float] = None,
                     name: str = "elmo") -> Tuple[str, str]:
    """Write ``<name>_options.json`` and ``<name>_weights.hdf5`` into ``directory`` (created if needed).

    Datasets, all float32, TF layouts and TF gate order [i, j, f, o], no +1 forget bias (spec §2):
      char_embed (char_rows, d)          ~ N(0, 1); with char_rows=262 row 0 is random too, so a test
                                           can see that a 262-row table is used as stored
      CNN/W_cnn_{i} (1, w_i, d, m_i)     ~ N(0, 1/sqrt(w_i d));   CNN/b_cnn_{i} (m_i,) ~ N(0, 0.1)
      CNN_high_{k}/W_carry, W_transform (F, F) ~ N(0, 1/sqrt(F)); b_transform (F,) ~ N(0, 0.1);
      CNN_high_{k}/b_carry (F,)          ~ -2 + N(0, 0.1) (like trained models)
      CNN_proj/W_proj (F, P)             ~ N(0, 1/sqrt(F));       CNN_proj/b_proj (P,) ~ N(0, 0.1)
      RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/W_0 (2P, 4n) ~ N(0, 1.5/sqrt(2P)); .../B (4n,) ~ N(0, 0.1);
      .../W_P_0 (n, P)                   ~ N(0, 3.5/sqrt(n))
    weight_scale multiplies every array above, b_carry's -2 included (None = 1.0): the same seed with
    weight_scale s writes exactly s times the default file. At the default sizes and scale the LSTM
    cell clip and projection clip (3.0) are reached on a few percent of values.
    Deterministic in ``seed`` (numpy PCG64). Returns (options_path, weight_path) as str.
    """
    filters = [tuple(p) for p in filters]
    _check_args(filters, char_dim, n_highway, dim, projection_dim, n_layers, activation, char_rows)
    scale = 1.0 if weight_scale is None else float(weight_scale)
    rng = np.random.default_rng(seed)
    f_total, p, n = sum(m for _, m in filters), projection_dim, dim

    def normal(shape, std, mean=0.0):
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(std * scale)
        if mean:
            x += np.float32(mean * scale)
        return x

    # Drawn in this fixed order so a seed names one file.
    data = {"char_embed": normal((char_rows, char_dim), 1.0)}
    for i, (w, m) in enumerate(filters):
        data[f"CNN/W_cnn_{i}"] = normal((1, w, char_dim, m), 1.0 / np.sqrt(w * char_dim))
        data[f"CNN/b_cnn_{i}"] = normal((m,), _BIAS_STD)
    for k in range(n_highway):
        data[f"CNN_high_{k}/W_carry"] = normal((f_total, f_total), 1.0 / np.sqrt(f_total))
        data[f"CNN_high_{k}/b_carry"] = normal((f_total,), _BIAS_STD, _CARRY_BIAS)
        data[f"CNN_high_{k}/W_transform"] = normal((f_total, f_total), 1.0 / np.sqrt(f_total))
        data[f"CNN_high_{k}/b_transform"] = normal((f_total,), _BIAS_STD)
    data["CNN_proj/W_proj"] = normal((f_total, p), 1.0 / np.sqrt(f_total))
    data["CNN_proj/b_proj"] = normal((p,), _BIAS_STD)
    for direction in range(2):
        for layer in range(n_layers):
            prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
            data[f"{prefix}/W_0"] = normal((2 * p, 4 * n), _LSTM_GAIN / np.sqrt(2 * p))
            data[f"{prefix}/B"] = normal((4 * n,), _BIAS_STD)
            data[f"{prefix}/W_P_0"] = normal((n, p), _PROJ_GAIN / np.sqrt(n))

    directory = os.fsdecode(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    options_path = os.path.join(directory, f"{name}_options.json")
    weight_path = os.path.join(directory, f"{name}_weights.hdf5")
    with open(options_path, "w", encoding="utf-8") as f:
        json.dump(_options(filters, char_dim, n_highway, dim, projection_dim, n_layers, cell_clip, proj_clip,
                           activation), f, indent=1)
    with h5py.File(weight_path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)   # contiguous, uncompressed: fast to read back whole
    return options_path, weight_path
