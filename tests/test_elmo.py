"""elmo_fast.elmo (Elmo, ElmoBiLm, ElmoCharacterEncoder, ElmoLstm, ScalarMix) against spec §4-§7.

The main oracle here is a second, independent computation written from the raw hdf5 arrays with the
TF formulas of spec §5.1 (numpy, bilm-tf style): TF gate order [i, j, f, o] with the +1 forget bias
at run time, TF-form highway (W_carry gates the relu branch), conv from W_cnn_i in TF layout,
tf.reverse_sequence for the backward direction and bilm-tf's per-row state variables. It shares no
code with elmo_fast. reference.py is used for the layers above the biLM (scalar mix, boundaries).
Weight files are written by each test with elmo_fast.synthetic (no downloads).
"""
import json
import time

import h5py
import numpy as np
import pytest
import torch

from elmo_fast import reference as R
from elmo_fast.chars import batch_to_ids
from elmo_fast.elmo import Elmo, ElmoBiLm, ElmoCharacterEncoder, ElmoLstm, ScalarMix, _ElmoBiLm
from elmo_fast.synthetic import PUBLISHED_FILTERS, write_elmo_files
from elmo_fast.weights import ElmoWeightsError, load_weights

# max |diff| against the TF-formula computation. float32: both sides in float32, values O(1..6),
# sequences of a few steps through tanh/sigmoid; the observed error is ~1e-6.
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}
NP_DTYPE = {torch.float64: np.float64, torch.float32: np.float32}

SENTENCES = [
    ["The", "cat", "sat", "."],
    ["Second"],
    [],
    ["x" * 60, "ünïcödé", "<S>", "a"],
    ["one", "two", "three", "four", "five", "six"],
]


def exact_forget_bias(files):
    """Put every LSTM bias B on a 2^-20 grid, so that B + 1 is exact in float32.

    The loader folds TF's run-time forget bias into the float32 bias (as AllenNLP does), which rounds
    B + 1 to float32; the TF formulas add 1.0 in the compute dtype. On this grid both agree exactly,
    so float64 comparisons can be tight (the rounding is ~6e-8 relative otherwise).
    """
    with h5py.File(files[1], "r+") as f:
        for name in [n for n in _dataset_names(f) if n.endswith("/B")]:
            f[name][...] = np.round(f[name][()] * 2.0 ** 20) / 2.0 ** 20
    return files


def _dataset_names(handle):
    names = []
    handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small default config: filters (1,4),(2,8),(3,16); d 4; 1 highway; n 16; P 8; 2 layers; clips 3."""
    return exact_forget_bias(write_elmo_files(tmp_path_factory.mktemp("elmo_small")))


@pytest.fixture(scope="module")
def files_alt(tmp_path_factory):
    """Other choices: tanh CNN, 2 highways, 262-row char table, 3 layers, odd sizes."""
    return exact_forget_bias(write_elmo_files(
        tmp_path_factory.mktemp("elmo_alt"), filters=((1, 3), (2, 5), (5, 7)), char_dim=3, n_highway=2, dim=11,
        projection_dim=6, n_layers=3, activation="tanh", char_rows=262, seed=3))


@pytest.fixture(autouse=True)
def one_thread():
    """These tests are made of many tiny ops; they run faster, and steadier on a busy machine, on
    one thread (two threads contend on small convolutions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_elmo(files, dtype=torch.float64, **kwargs):
    kwargs.setdefault("dropout", 0.0)
    return Elmo(*files, kwargs.pop("num_output_representations", 1), **kwargs).to(dtype)


# --- the independent TF-formula biLM (numpy) -----------------------------------------------------

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _reverse_sequence(x, lengths):
    """tf.reverse_sequence(x, lengths, seq_axis=1, batch_axis=0)."""
    out = x.copy()
    for b, n in enumerate(lengths):
        out[b, :n] = x[b, :n][::-1]
    return out


class TfBilm:
    """bilm-tf's BidirectionalLanguageModel from the raw hdf5 arrays (spec §2, §4, §5), with its
    non-trainable per-row state variables (max_batch_size rows, first B rows overwritten per run)."""

    BOS = [259, 257, 260] + [261] * 47
    EOS = [259, 258, 260] + [261] * 47

    def __init__(self, options_file, weight_file, dtype, max_batch_size=16):
        with open(options_file) as f:
            self.opt = json.load(f)
        with h5py.File(weight_file, "r") as f:
            self.w = {}
            f.visititems(lambda name, obj: self.w.__setitem__(name, obj[()].astype(dtype))
                         if isinstance(obj, h5py.Dataset) else None)
        self.dtype = dtype
        emb = self.w["char_embed"]
        if emb.shape[0] == 261:   # prediction table: ids shifted +1, zero row 0
            emb = np.concatenate([np.zeros((1, emb.shape[1]), dtype), emb])
        self.char_embed = emb
        lstm = self.opt["lstm"]
        self.n, self.p, self.layers = lstm["dim"], lstm["projection_dim"], lstm["n_layers"]
        self.state = {(d, l): [np.zeros((max_batch_size, self.p), dtype), np.zeros((max_batch_size, self.n), dtype)]
                      for d in range(2) for l in range(self.layers)}

    def batch(self, char_ids):
        """AllenNLP-style ids (B, T, 50) -> bilm-tf Batcher ids (B, T + 2, 50) and lengths incl. boundaries."""
        ids = char_ids.numpy()
        batch, steps, _ = ids.shape
        lengths = (ids > 0).any(-1).sum(-1)
        out = np.zeros((batch, steps + 2, 50), dtype=np.int64)
        for b in range(batch):
            out[b, 0] = self.BOS
            out[b, 1:lengths[b] + 1] = ids[b, :lengths[b]]
            out[b, lengths[b] + 1] = self.EOS
        return out, lengths + 2

    def token_embeddings(self, ids):
        cnn = self.opt["char_cnn"]
        act = {"relu": lambda v: np.maximum(v, 0), "tanh": np.tanh}[cnn["activation"]]
        e = self.char_embed[ids]                                       # (B, T2, 50, d)
        pooled = []
        for i, (width, _num) in enumerate(cnn["filters"]):
            kernel = self.w[f"CNN/W_cnn_{i}"][0]                         # (w, d, m): TF conv2d, height 1
            positions = 50 - width + 1
            conv = sum(e[:, :, k:k + positions, :] @ kernel[k] for k in range(width)) + self.w[f"CNN/b_cnn_{i}"]
            pooled.append(act(conv.max(axis=2)))                         # max_pool over all positions, then act
        x = np.concatenate(pooled, axis=-1)
        for k in range(cnn.get("n_highway") or 0):
            hw = lambda name: self.w[f"CNN_high_{k}/{name}"]  # noqa: E731
            carry = _sigmoid(x @ hw("W_carry") + hw("b_carry"))
            transform = np.maximum(x @ hw("W_transform") + hw("b_transform"), 0)
            x = carry * transform + (1 - carry) * x
        return x @ self.w["CNN_proj/W_proj"] + self.w["CNN_proj/b_proj"]

    def _dynamic_rnn(self, x, lengths, direction, layer):
        """tf.nn.dynamic_rnn(LSTMCell(num_proj, cell_clip, proj_clip), sequence_length) from the state vars."""
        prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
        w0, bias, wp = self.w[f"{prefix}/W_0"], self.w[f"{prefix}/B"], self.w[f"{prefix}/W_P_0"]
        clip_c, clip_p = self.opt["lstm"]["cell_clip"], self.opt["lstm"]["proj_clip"]
        batch, steps, _ = x.shape
        h = self.state[direction, layer][0][:batch].copy()
        c = self.state[direction, layer][1][:batch].copy()
        out = np.zeros((batch, steps, self.p), self.dtype)
        n = self.n
        for t in range(steps):
            z = np.concatenate([x[:, t], h], axis=1) @ w0 + bias
            i, j, f, o = z[:, :n], z[:, n:2 * n], z[:, 2 * n:3 * n], z[:, 3 * n:]    # TF order
            c_new = np.clip(_sigmoid(f + 1.0) * c + _sigmoid(i) * np.tanh(j), -clip_c, clip_c)
            h_new = np.clip((_sigmoid(o) * np.tanh(c_new)) @ wp, -clip_p, clip_p)
            live = (t < lengths)[:, None]
            h, c = np.where(live, h_new, h), np.where(live, c_new, c)   # state copied through past len
            out[:, t] = np.where(live, h_new, 0)
        self.state[direction, layer][0][:batch] = h
        self.state[direction, layer][1][:batch] = c
        return out

    def __call__(self, char_ids):
        """-> (layers [L + 1] each (B, T + 2, 2P) with layer 0 masked as AllenNLP does, mask (B, T + 2))."""
        ids, lengths = self.batch(char_ids)
        tok = self.token_embeddings(ids)
        mask = (ids > 0).any(-1)
        layers = [np.concatenate([tok, tok], -1) * mask[..., None]]
        in_f = in_b = tok
        for layer in range(self.layers):
            o_f = self._dynamic_rnn(in_f, lengths, 0, layer)
            o_b = _reverse_sequence(self._dynamic_rnn(_reverse_sequence(in_b, lengths), lengths, 1, layer), lengths)
            if layer > 0:   # ResidualWrapper: the output only
                o_f, o_b = o_f + in_f, o_b + in_b
            layers.append(np.concatenate([o_f, o_b], -1))
            in_f, in_b = o_f, o_b
        return layers, mask


def max_diff(ours, theirs):
    return max(float(np.abs(a.detach().numpy() - b).max()) if a.numel() else 0.0 for a, b in zip(ours, theirs))


# --- biLM vs TF formulas --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("which", ["files", "files_alt"])
def test_bilm_matches_tf_formulas(request, which, dtype):
    files = request.getfixturevalue(which)
    ids = batch_to_ids(SENTENCES)
    bilm = ElmoBiLm(*files).to(dtype)
    out = bilm(ids)
    tf_layers, tf_mask = TfBilm(*files, NP_DTYPE[dtype])(ids)
    assert out["mask"].dtype == torch.bool
    assert np.array_equal(out["mask"].numpy(), tf_mask)
    assert len(out["activations"]) == bilm.num_layers == len(tf_layers)
    diff = max_diff(out["activations"], tf_layers)
    print(f"\n{which} {dtype}: max |elmo_fast - TF formulas| = {diff:.3e}")
    assert diff < TOL[dtype]
    # The config must exercise the clips: some LSTM values sit at +-3 (proj clip).
    if which == "files":
        assert any(bool((a.abs() == 3.0).any()) for a in out["activations"][1:2])


def test_bilm_matches_reference_module_free(files):
    ids = batch_to_ids(SENTENCES)
    options, state = load_weights(*files, dtype=torch.float64)
    acts, mask, _, _ = R.elmo_bilm(ids, state, options)
    out = ElmoBiLm(*files, stateful=False).double()(ids)
    assert torch.equal(out["mask"], mask)
    for a, b in zip(out["activations"], acts):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # An empty batch: the oracle too gives (0, T + 2, 2P) activations.
    empty = torch.zeros(0, 3, 50, dtype=torch.long)
    acts, mask, _, _ = R.elmo_bilm(empty, state, options)
    out = ElmoBiLm(*files, stateful=False).double()(empty)
    assert mask.shape == out["mask"].shape == (0, 5)
    assert [a.shape for a in acts] == [a.shape for a in out["activations"]] == [(0, 5, 16)] * len(acts)


# --- state (spec §5.5) ----------------------------------------------------------------------------

def test_stateful_carry_over_matches_bilm_tf(files):
    g = np.random.default_rng(0)
    words = ["a", "bb", "ccc", "dddd", "the", "of", "Zebra", "!", "42"]
    batches = [[[words[k] for k in g.integers(0, len(words), g.integers(1, 6))] for _ in range(size)]
               for size in (3, 5, 2, 3)]
    bilm = ElmoBiLm(*files).double()                    # stateful=True is the default
    tf = TfBilm(*files, np.float64)
    saved = []
    for step, sentences in enumerate(batches[:3]):
        ids = batch_to_ids(sentences)
        out = bilm(ids)
        tf_layers, _ = tf(ids)
        diff = max_diff(out["activations"], tf_layers)
        assert diff < 1e-10, (step, diff)
        h, c = bilm._elmo_lstm._states              # AllenNLP shapes: (L, rows, 2P), (L, rows, 2n)
        assert h.shape == (2, (3, 5, 5)[step], 16) and c.shape == (2, h.shape[1], 32)
        assert not h.requires_grad and not c.requires_grad
        saved.append((h.clone(), c.clone()))
    # The batch of 2 updated rows 0-1 only; rows 2-4 keep the state the batch of 5 left.
    for before, after in zip(saved[1], saved[2]):
        assert torch.equal(after[:, 2:], before[:, 2:]) and not torch.equal(after[:, :2], before[:, :2])
    np.testing.assert_allclose(h[0, :, :8].numpy(), tf.state[0, 0][0][:5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(c[1, :, 16:].numpy(), tf.state[1, 1][1][:5], rtol=0, atol=1e-12)
    # Later batches depend on the carried state (spec §5.5): a fresh model differs.
    fresh = ElmoBiLm(*files, stateful=False).double()(batch_to_ids(batches[2]))
    assert max_diff(fresh["activations"][1:], [a.numpy() for a in out["activations"][1:]]) > 1e-3
    # reset_states(): the next batch starts from zeros again.
    bilm.reset_states()
    assert bilm._elmo_lstm._states is None
    again = bilm(batch_to_ids(batches[3]))
    want = ElmoBiLm(*files, stateful=False).double()(batch_to_ids(batches[3]))
    for a, b in zip(again["activations"], want["activations"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Elmo.reset_states() reaches the biLM; the state is not in the state_dict.
    elmo = make_elmo(files)
    elmo(batch_to_ids(batches[0]))
    assert elmo._elmo_lstm._elmo_lstm._states is not None
    assert not any("state" in k and "linearity" not in k and "projection" not in k for k in elmo.state_dict())
    elmo.reset_states()
    assert elmo._elmo_lstm._elmo_lstm._states is None


def test_stateless_is_deterministic_and_order_independent(files):
    elmo = make_elmo(files, stateful=False, num_output_representations=2)
    ids = batch_to_ids(SENTENCES)
    first = elmo(ids)["elmo_representations"][0]
    elmo(batch_to_ids([["something", "else"]] * 7))             # any call in between changes nothing
    second = elmo(ids)["elmo_representations"][0]
    assert torch.equal(first, second)
    perm = [3, 0, 4, 2, 1]
    permuted = elmo(ids[perm])["elmo_representations"][0]
    torch.testing.assert_close(permuted, first[perm], rtol=0, atol=1e-12)
    # One sentence alone (shorter padding) gives its row of the batch.
    alone = elmo(batch_to_ids([SENTENCES[0]]))["elmo_representations"][0]
    torch.testing.assert_close(alone[0], first[0, :4], rtol=0, atol=1e-12)
    assert elmo._elmo_lstm._elmo_lstm._states is None


# --- Elmo outputs: boundaries, masks, mixes ---------------------------------------------------------

def expected_elmo(files, ids, mix, gamma=1.0, do_layer_norm=False, keep=False):
    options, state = load_weights(*files, dtype=torch.float64)
    acts, mask, _, _ = R.elmo_bilm(ids, state, options)
    rep = R.scalar_mix(acts, mask, mix, gamma, do_layer_norm)
    return (rep, mask) if keep else R.remove_sentence_boundaries(rep, mask)


def test_boundary_removal_and_masks(files):
    ids = batch_to_ids(SENTENCES)
    elmo = make_elmo(files)
    out = elmo(ids)
    rep, mask = out["elmo_representations"][0], out["mask"]
    want_rep, want_mask = expected_elmo(files, ids, [0.0] * 3)
    assert mask.dtype == torch.bool and rep.shape == (5, 6, 16)
    assert mask.tolist() == [[i < len(s) for i in range(6)] for s in SENTENCES]
    torch.testing.assert_close(rep, want_rep, rtol=1e-10, atol=1e-12)
    assert torch.equal(mask, want_mask)
    assert torch.all(rep[~mask] == 0)                           # padding and the empty sentence are zero
    assert torch.all(rep[2] == 0)


def test_keep_sentence_boundaries(files):
    ids = batch_to_ids(SENTENCES)
    out = make_elmo(files, keep_sentence_boundaries=True)(ids)
    rep, mask = out["elmo_representations"][0], out["mask"]
    want_rep, want_mask = expected_elmo(files, ids, [0.0] * 3, keep=True)
    assert rep.shape == (5, 8, 16) and mask.tolist() == [[i < len(s) + 2 for i in range(8)] for s in SENTENCES]
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(rep, want_rep, rtol=1e-10, atol=1e-12)


def test_layer_norm(files):
    ids = batch_to_ids(SENTENCES)
    out = make_elmo(files, do_layer_norm=True)(ids)
    rep = out["elmo_representations"][0]
    torch.testing.assert_close(rep, expected_elmo(files, ids, [0.0] * 3, do_layer_norm=True)[0],
                               rtol=1e-10, atol=1e-12)
    # Independently: statistics over the unmasked elements (BOS/EOS included), padding normalised too.
    bilm = ElmoBiLm(*files).double()(ids)
    m = bilm["mask"].numpy()
    total = 0
    for a in bilm["activations"]:
        a = a.numpy()
        sel = a[m]                                               # (tokens, 2P) with boundaries
        total = total + (a - sel.mean()) / np.sqrt(sel.var() + 1e-12) / 3
    want, _ = R.remove_sentence_boundaries(torch.from_numpy(total), bilm["mask"])
    torch.testing.assert_close(rep, want, rtol=1e-9, atol=1e-10)


def test_scalar_mix_parameters_and_multiple_representations(files):
    ids = batch_to_ids(SENTENCES[:2])
    elmo = make_elmo(files, num_output_representations=3, scalar_mix_parameters=[1.0, -2.0, 0.5])
    reps = elmo(ids)["elmo_representations"]
    want = expected_elmo(files, ids, [1.0, -2.0, 0.5])[0]
    assert len(reps) == 3
    for r in reps:
        torch.testing.assert_close(r, want, rtol=1e-10, atol=1e-12)
    for k in range(3):
        mix = getattr(elmo, f"scalar_mix_{k}")
        assert [float(p) for p in mix.scalar_parameters] == [1.0, -2.0, 0.5]
        assert all(not p.requires_grad for p in mix.parameters())         # given parameters are frozen
    trainable = make_elmo(files, num_output_representations=2)
    for k in range(2):
        mix = getattr(trainable, f"scalar_mix_{k}")
        assert mix.gamma.tolist() == [1.0] and [p.item() for p in mix.scalar_parameters] == [0.0] * 3
        assert all(p.requires_grad for p in mix.parameters())
    # A ScalarMix on its own, with gamma.
    tensors = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(3)]
    mix = ScalarMix(3, initial_scalar_parameters=[0.1, 0.2, 0.3]).double()
    with torch.no_grad():
        mix.gamma.fill_(2.0)
    torch.testing.assert_close(mix(tensors), R.scalar_mix(tensors, torch.ones(2, 3), [0.1, 0.2, 0.3], 2.0))
    with pytest.raises(ValueError, match="mixture_size"):
        mix(tensors[:2])
    with pytest.raises(ValueError, match="initial_scalar_parameters"):
        ScalarMix(3, initial_scalar_parameters=[0.0])


def test_vocab_to_cache(files):
    vocab = ["@@PADDING@@", "The", "cat", "sat", ".", "Second", "x" * 60]
    # float32: the cache is computed at construction, in the dtype the weights are loaded in (float32).
    elmo = make_elmo(files, torch.float32, vocab_to_cache=vocab, stateful=False)
    assert elmo._elmo_lstm._word_embedding.weight.shape == (7, 8)
    assert "_elmo_lstm._word_embedding.weight" in elmo.state_dict()
    sentences = [["The", "cat", "sat", "."], ["Second"], [], ["x" * 60, "cat"]]
    ids = batch_to_ids(sentences)
    word_ids = torch.tensor([[vocab.index(w) for w in s] + [0] * (4 - len(s)) for s in sentences])
    by_chars = elmo(ids)
    by_words = elmo(ids, word_ids)
    assert torch.equal(by_words["mask"], by_chars["mask"])
    torch.testing.assert_close(by_words["elmo_representations"][0], by_chars["elmo_representations"][0],
                               rtol=1e-5, atol=1e-6)
    # Ids outside the cache: back off to the char-CNN, as AllenNLP does.
    with pytest.warns(UserWarning, match="outside the cached vocabulary"):
        backoff = elmo(ids, word_ids + 100 * (word_ids > 0))
    torch.testing.assert_close(backoff["elmo_representations"][0], by_chars["elmo_representations"][0])
    # Word inputs without a cache are ignored with a warning.
    with pytest.warns(UserWarning, match="cached vocab"):
        make_elmo(files)(ids, word_ids)
    # > 2-dim word inputs are reshaped like the char inputs.
    out = elmo(ids.view(2, 2, 4, 50), word_ids.view(2, 2, 4))
    torch.testing.assert_close(out["elmo_representations"][0].reshape(4, 4, 16),
                               by_chars["elmo_representations"][0], rtol=1e-5, atol=1e-6)


def test_more_than_three_dims(files):
    ids = batch_to_ids(SENTENCES[:4] + [["more"], ["and", "more"]])       # (6, 4, 50)
    elmo = make_elmo(files, stateful=False, num_output_representations=2)
    flat = elmo(ids)
    out = elmo(ids.view(2, 3, 4, 50))
    assert out["mask"].shape == (2, 3, 4) and torch.equal(out["mask"].reshape(6, 4), flat["mask"])
    for r, f in zip(out["elmo_representations"], flat["elmo_representations"]):
        assert r.shape == (2, 3, 4, 16)
        torch.testing.assert_close(r.reshape(6, 4, 16), f, rtol=0, atol=1e-12)
    kept = make_elmo(files, stateful=False, keep_sentence_boundaries=True)(ids.view(3, 2, 4, 50))
    assert kept["elmo_representations"][0].shape == (3, 2, 6, 16) and kept["mask"].shape == (3, 2, 6)


def test_dropout_only_in_training(files):
    ids = batch_to_ids(SENTENCES[:2])
    elmo = Elmo(*files, 1, stateful=False).double()               # default dropout 0.5
    assert elmo._dropout.p == 0.5
    elmo.eval()
    a = elmo(ids)["elmo_representations"][0]
    assert torch.equal(a, elmo(ids)["elmo_representations"][0])
    elmo.train()
    torch.manual_seed(0)
    b = elmo(ids)["elmo_representations"][0]
    nz = a != 0
    assert (b[nz] == 0).any() and torch.allclose(b[nz & (b != 0)], 2 * a[nz & (b != 0)])
    # The biLM itself has no dropout (spec §5.4).
    no_drop = make_elmo(files, stateful=False).train()
    torch.testing.assert_close(no_drop(ids)["elmo_representations"][0], a, rtol=0, atol=0)


# --- gradients ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_elmo_files(tmp_path_factory.mktemp("elmo_tiny"), filters=((1, 2), (2, 2)), char_dim=2,
                            n_highway=1, dim=3, projection_dim=2, n_layers=2, seed=5)


@pytest.mark.parametrize("do_layer_norm", [False, True])
def test_gradcheck_through_elmo(tiny_files, do_layer_norm):
    """gradcheck (float64) of Elmo's output w.r.t. every parameter (fast mode: random projections) and,
    in full mode, w.r.t. a sample of parameters from each part (char table rows, CNN, highway,
    projection, both LSTM directions and layers, scalar mix)."""
    elmo = make_elmo(tiny_files, requires_grad=True, stateful=False, do_layer_norm=do_layer_norm)
    ids = batch_to_ids([["ab", "c"], ["d"]])
    used = torch.unique(torch.cat([ids.flatten(), torch.tensor(R.BOS_CHAR_IDS + R.EOS_CHAR_IDS)]))
    params = {n: p.detach().clone() for n, p in elmo.named_parameters()}
    table_name = "_elmo_lstm._token_embedder._char_embedding_weights"

    def check(names, fast_mode):
        def run(*values):
            p = dict(params, **dict(zip(names, values)))
            if table_name in names:   # the table enters through its used rows (the others get no gradient)
                p[table_name] = params[table_name].index_put((used,), p[table_name])
            return torch.func.functional_call(elmo, p, (ids,))["elmo_representations"][0]

        inputs = tuple((params[n][used] if n == table_name else params[n]).clone().requires_grad_() for n in names)
        assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast_mode)

    check(list(params), fast_mode=True)
    check([table_name, "_elmo_lstm._token_embedder.char_conv_1.weight",
           "_elmo_lstm._token_embedder._highways._layers.0.bias", "_elmo_lstm._token_embedder._projection.weight",
           "_elmo_lstm._elmo_lstm.forward_layer_1.state_linearity.bias",
           "_elmo_lstm._elmo_lstm.backward_layer_0.input_linearity.weight",
           "_elmo_lstm._elmo_lstm.backward_layer_1.state_projection.weight",
           "scalar_mix_0.scalar_parameters.1", "scalar_mix_0.gamma"], fast_mode=False)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_requires_grad(files, requires_grad):
    elmo = make_elmo(files, requires_grad=requires_grad, stateful=False)
    bilm_params = list(elmo._elmo_lstm.parameters())
    assert len(bilm_params) == 27 and all(p.requires_grad == requires_grad for p in bilm_params)
    out = elmo(batch_to_ids(SENTENCES))["elmo_representations"][0]
    out.pow(2).sum().backward()
    for name, p in elmo.named_parameters():
        if name.startswith("scalar_mix"):
            assert p.grad is not None and torch.isfinite(p.grad).all()
        elif requires_grad:
            assert p.grad is not None, name
            if "_char_embedding_weights" not in name:
                assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    if requires_grad:   # only rows of ids that occur get gradient; row 0 (no token) gets none
        g = elmo._elmo_lstm._token_embedder._char_embedding_weights.grad
        assert g[0].abs().sum() == 0 and g[262 - 1].abs().sum() > 0


# --- torch.compile ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stateful", [False, True])
def test_compile_fullgraph(files, stateful):
    elmo = make_elmo(files, dtype=torch.float32, stateful=stateful)
    ids = batch_to_ids([["The", "cat"], ["sat"], []])
    eager = make_elmo(files, dtype=torch.float32, stateful=stateful)
    compiled = torch.compile(elmo, fullgraph=True, backend="aot_eager")
    for _ in range(2 if stateful else 1):    # stateful: the second call reads the carried state
        want = eager(ids)
        got = compiled(ids)
        torch.testing.assert_close(got["elmo_representations"][0], want["elmo_representations"][0],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(got["mask"], want["mask"])
    if stateful:
        for a, b in zip(elmo._elmo_lstm._elmo_lstm._states, eager._elmo_lstm._elmo_lstm._states):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- state_dict ---------------------------------------------------------------------------------

ALLENNLP_KEYS_2_LAYERS_1_HIGHWAY_3_FILTERS = [
    "_elmo_lstm._token_embedder._char_embedding_weights",
    "_elmo_lstm._token_embedder.char_conv_0.weight",
    "_elmo_lstm._token_embedder.char_conv_0.bias",
    "_elmo_lstm._token_embedder.char_conv_1.weight",
    "_elmo_lstm._token_embedder.char_conv_1.bias",
    "_elmo_lstm._token_embedder.char_conv_2.weight",
    "_elmo_lstm._token_embedder.char_conv_2.bias",
    "_elmo_lstm._token_embedder._highways._layers.0.weight",
    "_elmo_lstm._token_embedder._highways._layers.0.bias",
    "_elmo_lstm._token_embedder._projection.weight",
    "_elmo_lstm._token_embedder._projection.bias",
    "_elmo_lstm._elmo_lstm.forward_layer_0.input_linearity.weight",
    "_elmo_lstm._elmo_lstm.forward_layer_0.state_linearity.weight",
    "_elmo_lstm._elmo_lstm.forward_layer_0.state_linearity.bias",
    "_elmo_lstm._elmo_lstm.forward_layer_0.state_projection.weight",
    "_elmo_lstm._elmo_lstm.backward_layer_0.input_linearity.weight",
    "_elmo_lstm._elmo_lstm.backward_layer_0.state_linearity.weight",
    "_elmo_lstm._elmo_lstm.backward_layer_0.state_linearity.bias",
    "_elmo_lstm._elmo_lstm.backward_layer_0.state_projection.weight",
    "_elmo_lstm._elmo_lstm.forward_layer_1.input_linearity.weight",
    "_elmo_lstm._elmo_lstm.forward_layer_1.state_linearity.weight",
    "_elmo_lstm._elmo_lstm.forward_layer_1.state_linearity.bias",
    "_elmo_lstm._elmo_lstm.forward_layer_1.state_projection.weight",
    "_elmo_lstm._elmo_lstm.backward_layer_1.input_linearity.weight",
    "_elmo_lstm._elmo_lstm.backward_layer_1.state_linearity.weight",
    "_elmo_lstm._elmo_lstm.backward_layer_1.state_linearity.bias",
    "_elmo_lstm._elmo_lstm.backward_layer_1.state_projection.weight",
    "scalar_mix_0.gamma",
    "scalar_mix_0.scalar_parameters.0",
    "scalar_mix_0.scalar_parameters.1",
    "scalar_mix_0.scalar_parameters.2",
    "scalar_mix_1.gamma",
    "scalar_mix_1.scalar_parameters.0",
    "scalar_mix_1.scalar_parameters.1",
    "scalar_mix_1.scalar_parameters.2",
]


def test_state_dict_keys_and_round_trip(files, tmp_path):
    elmo = Elmo(*files, 2, dropout=0.0, stateful=False)
    state = elmo.state_dict()
    assert set(state) == set(ALLENNLP_KEYS_2_LAYERS_1_HIGHWAY_3_FILTERS)
    assert len(state) == len(ALLENNLP_KEYS_2_LAYERS_1_HIGHWAY_3_FILTERS)       # no buffers
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["_elmo_lstm._token_embedder._char_embedding_weights"] == (262, 4)
    assert shapes["_elmo_lstm._token_embedder.char_conv_2.weight"] == (16, 4, 3)
    assert shapes["_elmo_lstm._token_embedder._highways._layers.0.weight"] == (56, 28)
    assert shapes["_elmo_lstm._elmo_lstm.forward_layer_1.input_linearity.weight"] == (64, 8)
    assert shapes["_elmo_lstm._elmo_lstm.forward_layer_1.state_projection.weight"] == (8, 16)
    assert shapes["scalar_mix_0.scalar_parameters.0"] == (1,) and shapes["scalar_mix_1.gamma"] == (1,)
    # The biLM's own keys are what weights.load_weights produces (strict).
    _, bilm_state = load_weights(*files)
    assert set(ElmoBiLm(*files).state_dict()) == set(bilm_state)
    # Round trip into a model loaded from other weights: identical outputs after load_state_dict(strict=True).
    other = Elmo(*write_elmo_files(tmp_path, seed=11), 2, dropout=0.0, stateful=False)
    ids = batch_to_ids(SENTENCES)
    assert not torch.allclose(other(ids)["elmo_representations"][0], elmo(ids)["elmo_representations"][0])
    with torch.no_grad():
        getattr(elmo, "scalar_mix_1").gamma.fill_(0.5)
    other.load_state_dict(elmo.state_dict(), strict=True)
    for a, b in zip(other(ids)["elmo_representations"], elmo(ids)["elmo_representations"]):
        assert torch.equal(a, b)
    assert _ElmoBiLm is ElmoBiLm


def test_char_encoder_and_lstm_standalone(files):
    ids = batch_to_ids(SENTENCES)
    enc = ElmoCharacterEncoder(*files).double()
    out = enc(ids)
    options, state = load_weights(*files, dtype=torch.float64)
    want_ids, want_mask = R.add_sentence_boundaries(ids)
    assert torch.equal(out["mask"], want_mask) and enc.get_output_dim() == 8
    torch.testing.assert_close(out["token_embedding"], R.char_encoder(want_ids, state, options))
    # ElmoLstm built alone (random init), stateful: a row of length 0 keeps its carried state.
    lstm = ElmoLstm(8, 8, 16, 2, memory_cell_clip_value=3.0, state_projection_clip_value=3.0).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]).bool()
    y = lstm(x, mask)
    assert y.shape == (2, 3, 5, 16) and torch.all(y[:, 1, 2:] == 0)
    h_before = lstm._states[0].clone()
    mask[1] = False
    lstm(x, mask)
    assert torch.equal(lstm._states[0][:, 1], h_before[:, 1])
    assert not torch.equal(lstm._states[0][:, 0], h_before[:, 0])


# --- bad input ----------------------------------------------------------------------------------

def test_bad_inputs(files, tmp_path):
    elmo = make_elmo(files)
    ids = batch_to_ids(SENTENCES[:2])
    with pytest.raises(TypeError, match="inputs.*integer"):
        elmo(ids.float())
    with pytest.raises(ValueError, match="inputs.*50"):
        elmo(ids[..., :49])
    with pytest.raises(ValueError, match="inputs.*0..261"):
        elmo(ids.masked_fill(ids == 261, 262))
    with pytest.raises(ValueError, match="inputs.*0..261"):
        elmo(ids - 1)
    with pytest.raises(ValueError, match="inputs.*3 dims"):
        elmo(ids[0])
    with pytest.raises(TypeError, match="inputs"):
        elmo(ids.tolist())
    with pytest.raises(ValueError, match="inputs"):
        ElmoBiLm(*files)(ids[None])
    missing = str(tmp_path / "nope_weights.hdf5")
    with pytest.raises(FileNotFoundError, match="nope_weights.hdf5"):
        Elmo(files[0], missing, 1)
    with pytest.raises(FileNotFoundError, match="nope_options.json"):
        Elmo(str(tmp_path / "nope_options.json"), files[1], 1)
    # Options and weights of different models.
    other_options, other_weights = write_elmo_files(tmp_path, dim=12, name="other")
    with pytest.raises(ElmoWeightsError, match="W_0|W_P_0|shape"):
        Elmo(other_options, files[1], 1)
    deeper_options, _ = write_elmo_files(tmp_path, n_layers=3, name="deeper")
    with pytest.raises(ElmoWeightsError):
        Elmo(deeper_options, files[1], 1)
    with pytest.raises(ValueError, match="module"):
        Elmo(files[0], files[1], 1, module=ElmoBiLm(*files))


# --- edge cases ---------------------------------------------------------------------------------

def test_empty_batch_and_empty_sentences(files):
    elmo = make_elmo(files, num_output_representations=2)
    for ids in (batch_to_ids([]), torch.zeros(0, 3, 50, dtype=torch.long)):
        out = elmo(ids)
        steps = ids.shape[1]
        assert out["mask"].shape == (0, steps) and out["mask"].dtype == torch.bool
        assert all(r.shape == (0, steps, 16) for r in out["elmo_representations"])
    bilm_out = ElmoBiLm(*files)(batch_to_ids([]))
    assert [a.shape for a in bilm_out["activations"]] == [(0, 2, 16)] * 3
    # Only empty sentences: (B, 0) outputs.
    out = elmo(batch_to_ids([[], []]))
    assert out["elmo_representations"][0].shape == (2, 0, 16) and out["mask"].shape == (2, 0)
    # An empty sentence among others: zeros, mask False; its biLM row still holds <S> </S>.
    out = elmo(batch_to_ids([["a", "b"], []]))
    assert torch.all(out["elmo_representations"][0][1] == 0) and not out["mask"][1].any()


def test_one_word_and_long_words(files):
    elmo = make_elmo(files, stateful=False)
    out = elmo(batch_to_ids([["Hello"], ["w"]]))
    assert out["elmo_representations"][0].shape == (2, 1, 16) and out["mask"].all()
    assert torch.all(out["elmo_representations"][0] != 0)
    # Words are cut to 48 bytes: a 60-char word and its 48-char prefix give the same vectors.
    long_word = "abcdefghij" * 6
    a = elmo(batch_to_ids([["the", long_word]]))["elmo_representations"][0]
    b = elmo(batch_to_ids([["the", long_word[:48]]]))["elmo_representations"][0]
    assert torch.equal(a, b)
    c = elmo(batch_to_ids([["the", long_word[:47]]]))["elmo_representations"][0]
    assert not torch.equal(a, c)


def test_float32_and_float64(files):
    ids = batch_to_ids(SENTENCES)
    r64 = make_elmo(files, torch.float64, stateful=False)(ids)["elmo_representations"][0]
    r32 = make_elmo(files, torch.float32, stateful=False)(ids)["elmo_representations"][0]
    assert r64.dtype == torch.float64 and r32.dtype == torch.float32
    torch.testing.assert_close(r32.double(), r64, rtol=1e-4, atol=5e-5)


def test_original_shape_forward(tmp_path):
    """Published "original" sizes (n 4096, P 512, 2048 filters, 2 highways), 2 sentences x 3 words."""
    files = write_elmo_files(tmp_path, filters=PUBLISHED_FILTERS, char_dim=16, n_highway=2, dim=4096,
                             projection_dim=512)
    elmo = Elmo(*files, 2, dropout=0.0)
    assert elmo.get_output_dim() == 1024 and elmo.num_layers == 3
    start = time.perf_counter()
    with torch.no_grad():
        out = elmo(batch_to_ids([["The", "cat", "sat"], ["A", "dog", "barked"]]))
    seconds = time.perf_counter() - start
    print(f"\noriginal-size forward 2 x 3 words: {seconds:.2f} s")
    assert out["mask"].shape == (2, 3) and out["mask"].all()
    assert [tuple(r.shape) for r in out["elmo_representations"]] == [(2, 3, 1024)] * 2
    assert all(torch.isfinite(r).all() for r in out["elmo_representations"])
