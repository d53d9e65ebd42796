"""elmo_fast.weights against the raw bilm-tf arrays written by elmo_fast.synthetic (spec §1, §2)."""
import json
import pathlib
import re

import h5py
import numpy as np
import pytest
import torch

from elmo_fast import synthetic, weights
from elmo_fast.weights import ElmoWeightsError

N, P, F = 16, 8, 28          # synthetic defaults: dim, projection_dim, sum of filter counts (4 + 8 + 16)
FILTERS = ((1, 4), (2, 8), (3, 16))
LSTM = "RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell"


@pytest.fixture
def files(tmp_path):
    """(options_path, weight_path) of a 2-highway, 2-layer synthetic model."""
    return synthetic.write_elmo_files(tmp_path, n_highway=2)


def raw(weight_path):
    with h5py.File(weight_path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def t(array):
    return torch.from_numpy(np.asarray(array))


def edit_options(path, edit):
    with open(path) as f:
        options = json.load(f)
    edit(options)
    with open(path, "w") as f:
        json.dump(options, f)


def error_for(path, *names):
    """A regex that requires the file path and each name, in any order."""
    return "".join(f"(?=.*{re.escape(str(x))})" for x in (path, *names))


# ----------------------------------------------------------------------------------------------- layout


def test_keys_and_shapes(files):
    options, state = weights.load_weights(*files)
    expected = {"_token_embedder._char_embedding_weights": (262, 4),
                "_token_embedder._projection.weight": (P, F), "_token_embedder._projection.bias": (P,)}
    for i, (w, m) in enumerate(FILTERS):
        expected[f"_token_embedder.char_conv_{i}.weight"] = (m, 4, w)
        expected[f"_token_embedder.char_conv_{i}.bias"] = (m,)
    for k in range(2):
        expected[f"_token_embedder._highways._layers.{k}.weight"] = (2 * F, F)
        expected[f"_token_embedder._highways._layers.{k}.bias"] = (2 * F,)
    for d in ("forward", "backward"):
        for l in range(2):
            key = f"_elmo_lstm.{d}_layer_{l}"
            expected.update({f"{key}.input_linearity.weight": (4 * N, P), f"{key}.state_linearity.weight": (4 * N, P),
                             f"{key}.state_linearity.bias": (4 * N,), f"{key}.state_projection.weight": (P, N)})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())
    assert options["lstm"]["dim"] == N and options["char_cnn"]["n_highway"] == 2


def test_char_embedding_261_rows_gets_zero_row(files):
    _, state = weights.load_weights(*files)
    emb = state["_token_embedder._char_embedding_weights"]
    assert torch.equal(emb[0], torch.zeros(4))
    assert torch.equal(emb[1:], t(raw(files[1])["char_embed"]))


def test_char_embedding_262_rows_used_as_stored(tmp_path):
    files = synthetic.write_elmo_files(tmp_path, char_rows=262)
    table = raw(files[1])["char_embed"]
    assert table.shape == (262, 4) and np.abs(table[0]).sum() > 0
    _, state = weights.load_weights(*files)
    assert torch.equal(state["_token_embedder._char_embedding_weights"], t(table))


def test_conv_axes(files):
    arrays = raw(files[1])
    _, state = weights.load_weights(*files)
    for i, (w, m) in enumerate(FILTERS):
        tf_kernel = arrays[f"CNN/W_cnn_{i}"]                      # (1, w, d, m)
        conv = state[f"_token_embedder.char_conv_{i}.weight"]      # (m, d, w)
        for f, c, k in [(0, 0, 0), (m - 1, 3, w - 1), (m // 2, 1, w // 2)]:
            assert conv[f, c, k].item() == tf_kernel[0, k, c, f]
        assert torch.equal(conv, t(tf_kernel[0].transpose(2, 1, 0)))
        assert torch.equal(state[f"_token_embedder.char_conv_{i}.bias"], t(arrays[f"CNN/b_cnn_{i}"]))


def test_highway_sign_flip_and_equivalence(files):
    arrays = raw(files[1])
    _, state = weights.load_weights(*files, dtype=torch.float64)
    x = torch.randn(5, F, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k in range(2):
        w_c, b_c = t(arrays[f"CNN_high_{k}/W_carry"]).double(), t(arrays[f"CNN_high_{k}/b_carry"]).double()
        w_t, b_t = t(arrays[f"CNN_high_{k}/W_transform"]).double(), t(arrays[f"CNN_high_{k}/b_transform"]).double()
        weight = state[f"_token_embedder._highways._layers.{k}.weight"]
        bias = state[f"_token_embedder._highways._layers.{k}.bias"]
        assert torch.equal(weight[:F], w_t.T) and torch.equal(weight[F:], -w_c.T)
        assert torch.equal(bias[:F], b_t) and torch.equal(bias[F:], -b_c)
        # bilm-tf form (spec §4.2.4) == AllenNLP form with the loaded weights.
        gate_tf = torch.sigmoid(x @ w_c + b_c)
        tf = gate_tf * torch.relu(x @ w_t + b_t) + (1 - gate_tf) * x
        proj = x @ weight.T + bias
        g = torch.sigmoid(proj[:, F:])
        torch.testing.assert_close(g * x + (1 - g) * torch.relu(proj[:, :F]), tf, rtol=1e-12, atol=1e-12)


def test_projection(files):
    arrays = raw(files[1])
    _, state = weights.load_weights(*files)
    assert torch.equal(state["_token_embedder._projection.weight"], t(arrays["CNN_proj/W_proj"].T))
    assert torch.equal(state["_token_embedder._projection.bias"], t(arrays["CNN_proj/b_proj"]))


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("direction", [0, 1])
def test_lstm_gate_swap_and_forget_bias(files, direction, layer):
    arrays = raw(files[1])
    _, state = weights.load_weights(*files)
    prefix = LSTM.format(d=direction, l=layer)
    w0, b, wp = arrays[f"{prefix}/W_0"], arrays[f"{prefix}/B"], arrays[f"{prefix}/W_P_0"]
    key = f"_elmo_lstm.{('forward', 'backward')[direction]}_layer_{layer}"
    w_in, w_st = state[f"{key}.input_linearity.weight"], state[f"{key}.state_linearity.weight"]
    bias = state[f"{key}.state_linearity.bias"]
    tf_block = {0: slice(0, N), 1: slice(2 * N, 3 * N), 2: slice(N, 2 * N), 3: slice(3 * N, 4 * N)}  # [i,f,j,o] <- TF
    for g in range(4):
        rows = slice(g * N, (g + 1) * N)
        assert torch.equal(w_in[rows], t(w0[:P, tf_block[g]].T))
        assert torch.equal(w_st[rows], t(w0[P:, tf_block[g]].T))
        assert torch.equal(bias[rows], t(b[tf_block[g]] + (1.0 if g == 1 else 0.0)))
    assert torch.equal(state[f"{key}.state_projection.weight"], t(wp.T))
    assert f"{key}.input_linearity.bias" not in state


def test_lstm_step_matches_tf_cell(files):
    """One LSTM step from the raw TF arrays (spec §5.1) equals the AllenNLP step on the loaded state."""
    arrays = raw(files[1])
    _, state = weights.load_weights(*files, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x, h, c = (torch.randn(3, size, dtype=torch.float64, generator=gen) for size in (P, P, N))
    prefix, key = LSTM.format(d=1, l=1), "_elmo_lstm.backward_layer_1"
    z = torch.cat([x, h], 1) @ t(arrays[f"{prefix}/W_0"]).double() + t(arrays[f"{prefix}/B"]).double()
    i, j, f, o = z.split(N, 1)
    c_tf = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(j)
    h_tf = (torch.sigmoid(o) * torch.tanh(c_tf)) @ t(arrays[f"{prefix}/W_P_0"]).double()
    z = (x @ state[f"{key}.input_linearity.weight"].T + h @ state[f"{key}.state_linearity.weight"].T
         + state[f"{key}.state_linearity.bias"])
    i, f, j, o = z.split(N, 1)
    c_an = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(j)
    h_an = (torch.sigmoid(o) * torch.tanh(c_an)) @ state[f"{key}.state_projection.weight"].T
    torch.testing.assert_close(c_an, c_tf, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_an, h_tf, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ dtype, paths, options


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtype(files, dtype):
    _, ref = weights.load_weights(*files)
    _, state = weights.load_weights(*files, dtype=dtype)
    assert state.keys() == ref.keys()
    for k in ref:
        assert state[k].dtype == dtype and state[k].is_contiguous()
        if dtype == torch.float64:   # transformed in float64: only B + 1 differs from the float32 load
            torch.testing.assert_close(state[k], ref[k].double(), rtol=1e-7, atol=0), k
        else:                        # transformed in float32, then rounded once
            assert torch.equal(state[k], ref[k].to(dtype)), k
    if dtype == torch.float64:
        b = t(raw(files[1])[LSTM.format(d=0, l=0) + "/B"]).double()
        assert torch.equal(state["_elmo_lstm.forward_layer_0.state_linearity.bias"][N:2 * N], b[2 * N:3 * N] + 1.0)


@pytest.mark.parametrize("dtype", [torch.int64, "float32", None])
def test_bad_dtype(files, dtype):
    with pytest.raises(TypeError, match="dtype"):
        weights.load_weights(*files, dtype=dtype)


def test_pathlike_and_str(files):
    _, a = weights.load_weights(*files)
    _, b = weights.load_weights(*(pathlib.Path(p) for p in files))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="options_file"):
        weights.load_options(3)
    with pytest.raises(TypeError, match="weight_file"):
        weights.load_weights(files[0], None)


def test_load_options_fills_defaults(tmp_path):
    options_path, weight_path = synthetic.write_elmo_files(tmp_path, n_highway=0)
    edit_options(options_path,
                 lambda o: (o["char_cnn"].pop("n_highway"), o["char_cnn"].pop("max_characters_per_token")))
    options = weights.load_options(options_path)
    assert options["char_cnn"]["n_highway"] == 0 and options["char_cnn"]["max_characters_per_token"] == 50
    _, state = weights.load_weights(options_path, weight_path)
    assert not any("_highways" in k for k in state)


def test_null_clips_accepted(files):
    edit_options(files[0], lambda o: o["lstm"].update(cell_clip=None, proj_clip=0))
    assert weights.load_options(files[0])["lstm"]["cell_clip"] is None


# ----------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name, millions", [("small", 13.59), ("medium", 28.03), ("original", 93.60),
                                            ("original_5.5B", 93.60)])
def test_published_options_parameter_counts(name, millions):
    o = synthetic.published_options(name)
    filters, d = o["char_cnn"]["filters"], o["char_cnn"]["embedding"]["dim"]
    n, p, h = o["lstm"]["dim"], o["lstm"]["projection_dim"], o["char_cnn"]["n_highway"]
    f = sum(m for _, m in filters)
    count = (261 * d + sum(w * d * m + m for w, m in filters) + h * 2 * (f * f + f) + f * p + p
             + 2 * 2 * (2 * p * 4 * n + 4 * n + n * p))
    assert round(count / 1e6, 2) == millions
    assert o["lstm"]["use_skip_connections"] is True and o["char_cnn"]["n_characters"] == 262
    assert f == 2048 and o["lstm"]["n_layers"] == 2
    with pytest.raises(ValueError, match="name"):
        synthetic.published_options("large")


def test_synthetic_layout_and_determinism(tmp_path):
    o1, w1 = synthetic.write_elmo_files(tmp_path / "a", seed=3)
    _, w2 = synthetic.write_elmo_files(tmp_path / "b", seed=3)
    _, w3 = synthetic.write_elmo_files(tmp_path / "c", seed=3, weight_scale=0.5)
    a, b, c = raw(w1), raw(w2), raw(w3)
    assert all(v.dtype == np.float32 for v in a.values())
    assert a["CNN/W_cnn_2"].shape == (1, 3, 4, 16)
    assert a[LSTM.format(d=1, l=1) + "/W_0"].shape == (2 * P, 4 * N)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.allclose(c[k], 0.5 * a[k]) for k in a)           # weight_scale multiplies every array
    assert -2.5 < a["CNN_high_0/b_carry"].mean() < -1.5
    with open(o1) as f:
        options = json.load(f)
    assert options["bidirectional"] is True and options["char_cnn"]["max_characters_per_token"] == 50


def test_synthetic_options_follow_arguments(tmp_path):
    options_path, weight_path = synthetic.write_elmo_files(tmp_path, activation="tanh", cell_clip=None, n_layers=1,
                                                           filters=[(2, 3)], name="tiny")
    assert options_path.endswith("tiny_options.json") and weight_path.endswith("tiny_weights.hdf5")
    options, state = weights.load_weights(options_path, weight_path)
    assert options["char_cnn"]["activation"] == "tanh" and options["lstm"]["cell_clip"] is None
    assert state["_token_embedder._projection.weight"].shape == (P, 3)


@pytest.mark.parametrize("kwargs", [dict(filters=()), dict(filters=[(0, 4)]), dict(filters=[(51, 4)]),
                                    dict(dim=0), dict(n_highway=-1), dict(activation="gelu"), dict(char_rows=260)])
def test_synthetic_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        synthetic.write_elmo_files(tmp_path, **kwargs)


def test_original_size_writes_and_loads(tmp_path):
    o = synthetic.published_options("original")
    files = synthetic.write_elmo_files(tmp_path, filters=o["char_cnn"]["filters"], char_dim=16, n_highway=2,
                                       dim=4096, projection_dim=512)
    options, state = weights.load_weights(*files)
    assert sum(v.numel() for v in state.values()) == 93_600_864   # 93.6 M incl. the zero row 0
    assert options["lstm"]["dim"] == 4096


# ---------------------------------------------------------------------------------------------- errors


def test_missing_options_file(tmp_path, files):
    missing = tmp_path / "nope_options.json"
    with pytest.raises(ElmoWeightsError, match=error_for(missing)) as info:
        weights.load_weights(missing, files[1])
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_missing_weight_file(tmp_path, files):
    missing = tmp_path / "nope.hdf5"
    with pytest.raises(FileNotFoundError, match=error_for(missing)):
        weights.load_weights(files[0], missing)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]"])
def test_options_not_json_object(files, text):
    with open(files[0], "w") as f:
        f.write(text)
    with pytest.raises(ElmoWeightsError, match=error_for(files[0])):
        weights.load_options(files[0])


@pytest.mark.parametrize("key", ["char_cnn.embedding.dim", "char_cnn.filters", "char_cnn.activation", "lstm.dim",
                                 "lstm.projection_dim", "lstm.n_layers", "lstm.cell_clip", "lstm.proj_clip",
                                 "lstm.use_skip_connections", "char_cnn.embedding", "lstm"])
def test_options_missing_key(files, key):
    *parents, last = key.split(".")

    def drop(options):
        node = options
        for part in parents:
            node = node[part]
        del node[last]
    edit_options(files[0], drop)
    with pytest.raises(ElmoWeightsError, match=error_for(files[0], "lstm" if key == "lstm" else key)):
        weights.load_weights(*files)


@pytest.mark.parametrize("section, key, value", [
    ("lstm", "use_skip_connections", False),
    ("lstm", "use_skip_connections", 1),
    ("char_cnn", "activation", "sigmoid"),
    ("char_cnn", "max_characters_per_token", 49),
    ("char_cnn", "filters", [[0, 4]]),
    ("char_cnn", "filters", [[51, 4]]),
    ("char_cnn", "filters", []),
    ("char_cnn", "filters", "1x4"),
    ("char_cnn", "n_highway", -1),
    ("char_cnn", "n_highway", 1.5),
    ("lstm", "dim", "16"),
    ("lstm", "projection_dim", 0),
    ("lstm", "n_layers", True),
    ("lstm", "cell_clip", "3"),
])
def test_options_bad_values(files, section, key, value):
    edit_options(files[0], lambda o: o[section].__setitem__(key, value))
    with pytest.raises(ElmoWeightsError, match=error_for(files[0], f"{section}.{key}")):
        weights.load_options(files[0])


def test_not_hdf5(files):
    with open(files[1], "wb") as f:
        f.write(b"this is not an hdf5 file\n" * 100)
    with pytest.raises(ElmoWeightsError, match=error_for(files[1], "not an HDF5")):
        weights.load_weights(*files)


@pytest.mark.parametrize("keep", [lambda size: 0, lambda size: 7, lambda size: size // 100, lambda size: size // 2,
                                  lambda size: size - 1], ids=["empty", "7 bytes", "1%", "half", "all but 1"])
def test_truncated_file(files, keep):
    path = pathlib.Path(files[1])
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    with pytest.raises(ElmoWeightsError, match=error_for(files[1]) + "(?=.*(truncated|not an HDF5))"):
        weights.load_weights(*files)


def test_corrupted_bytes_give_only_weights_errors(files):
    # Overwrite bytes in the metadata-heavy start of the file: loading either succeeds (a value changed)
    # or raises ElmoWeightsError, never a bare h5py/OSError/RuntimeError.
    data = pathlib.Path(files[1]).read_bytes()
    rng = np.random.default_rng(0)
    errors = 0
    for _ in range(60):
        damaged = bytearray(data)
        offset = int(rng.integers(0, 4096))
        damaged[offset:offset + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        pathlib.Path(files[1]).write_bytes(bytes(damaged))
        try:
            weights.load_weights(*files)
        except ElmoWeightsError as e:
            assert str(files[1]) in str(e)
            errors += 1
    assert errors > 0


@pytest.mark.parametrize("name", ["char_embed", "CNN/W_cnn_1", "CNN/b_cnn_2", "CNN_high_1/W_carry",
                                  "CNN_high_0/b_transform", "CNN_proj/W_proj", LSTM.format(d=1, l=1) + "/W_0",
                                  LSTM.format(d=0, l=0) + "/B", LSTM.format(d=1, l=0) + "/W_P_0"])
def test_missing_dataset(files, name):
    with h5py.File(files[1], "a") as f:
        del f[name]
    with pytest.raises(ElmoWeightsError, match=error_for(files[1], name, "missing")):
        weights.load_weights(*files)


@pytest.mark.parametrize("name, shape", [
    ("char_embed", (260, 4)),
    ("char_embed", (261, 5)),
    ("CNN/W_cnn_0", (1, 1, 4, 5)),
    ("CNN/W_cnn_1", (2, 4, 8)),
    ("CNN_high_0/W_carry", (F, F + 1)),
    ("CNN_proj/b_proj", (P + 1,)),
    (LSTM.format(d=0, l=1) + "/W_0", (P + P, 4 * N - 4)),
    (LSTM.format(d=1, l=0) + "/B", (4 * N, 1)),
    (LSTM.format(d=1, l=1) + "/W_P_0", (P, N)),
])
def test_wrong_shape(files, name, shape):
    with h5py.File(files[1], "a") as f:
        del f[name]
        f.create_dataset(name, data=np.zeros(shape, np.float32))
    with pytest.raises(ElmoWeightsError, match=error_for(files[1], name, str(shape), "expected")):
        weights.load_weights(*files)


def test_integer_dataset_and_group_in_place_of_dataset(files):
    with h5py.File(files[1], "a") as f:
        data = f["CNN/b_cnn_0"][()]
        del f["CNN/b_cnn_0"]
        f.create_dataset("CNN/b_cnn_0", data=data.astype(np.int32))
        del f["CNN_proj/b_proj"]
        f.create_group("CNN_proj/b_proj")
    with pytest.raises(ElmoWeightsError, match=error_for(files[1], "CNN/b_cnn_0", "dtype")):
        weights.load_weights(*files)
    with h5py.File(files[1], "a") as f:
        del f["CNN/b_cnn_0"]
        f.create_dataset("CNN/b_cnn_0", data=data)
    with pytest.raises(ElmoWeightsError, match=error_for(files[1], "CNN_proj/b_proj", "not a dataset")):
        weights.load_weights(*files)


@pytest.mark.parametrize("section, key, value, dataset", [
    ("lstm", "projection_dim", P + 1, "CNN_proj/W_proj"),
    ("lstm", "projection_dim", P - 1, "CNN_proj/W_proj"),
    ("lstm", "dim", N + 1, LSTM.format(d=0, l=0) + "/W_0"),
    ("char_cnn", "filters", [[1, 4], [2, 8], [3, 15]], "CNN/W_cnn_2"),
    ("char_cnn", "filters", [[1, 4], [2, 8], [4, 16]], "CNN/W_cnn_2"),
    ("char_cnn", "embedding", {"dim": 5}, "char_embed"),
    ("char_cnn", "n_highway", 3, "CNN_high_2/"),     # options want a layer the file lacks
    ("char_cnn", "n_highway", 1, "CNN_high_1/"),     # the file has a layer the options do not
    ("lstm", "n_layers", 1, "Cell1/"),
    ("lstm", "n_layers", 3, "Cell2/"),
    ("char_cnn", "filters", [[1, 4], [2, 8]], "CNN/"),
])
def test_options_disagree_with_weights(files, section, key, value, dataset):
    edit_options(files[0], lambda o: o[section].__setitem__(key, value))
    with pytest.raises(ElmoWeightsError, match=error_for(files[1], dataset)):
        weights.load_weights(*files)
