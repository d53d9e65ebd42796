"""ElmoLstm's layers as a pipeline over chunks of time (Note [wavefront], elmo_fast/wavefront.py) against
the reference stack, the switch and its measured choice, and the _lstm_chains op under it."""
import pytest
import torch

import elmo_fast
from elmo_fast import reference as R
from elmo_fast import wavefront
from elmo_fast.elmo import ElmoLstm
from util import TOL, assert_close_verbose


@pytest.fixture
def wavefront_mode():
    """Sets the wavefront mode for one test; restores auto, forgets decisions and the thread count."""
    threads = torch.get_num_threads()
    yield wavefront.set_mode
    wavefront.set_mode("auto")
    wavefront.reset()
    torch.set_num_threads(threads)


def make_lstm(gen, I, P, n, L, clip=True, dtype=torch.float64, scale=0.6):
    lstm = ElmoLstm(I, P, n, L, memory_cell_clip_value=0.7 if clip else None,
                    state_projection_clip_value=0.5 if clip else None, stateful=False)
    with torch.no_grad():
        for p in lstm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return lstm.to(dtype)


def reference_stack(lstm, x, lengths, h0, c0):
    state = {f"_elmo_lstm.{k}": v for k, v in lstm.state_dict().items()}
    options = dict(lstm=dict(n_layers=lstm.num_layers, dim=lstm.cell_size, projection_dim=lstm.hidden_size,
                             cell_clip=lstm.cell_clip_value, proj_clip=lstm.proj_clip_value))
    outputs, h_n, c_n = R.elmo_lstm(x, lengths, state, options, h0, c0)
    return torch.stack(outputs), h_n, c_n


def inputs_for(gen, lstm, lengths, T, dtype=torch.float64):
    B, L = len(lengths), lstm.num_layers
    lengths = torch.tensor(lengths, dtype=torch.int64)
    mask = torch.arange(T)[None] < lengths[:, None]
    x = torch.randn(B, T, lstm.input_size, generator=gen, dtype=torch.float64) * mask[..., None]
    h0 = torch.randn(L, B, 2 * lstm.hidden_size, generator=gen, dtype=torch.float64)
    c0 = torch.randn(L, B, 2 * lstm.cell_size, generator=gen, dtype=torch.float64)
    return x.to(dtype), lengths, mask, h0.to(dtype), c0.to(dtype)


# (I, P, n, layers, lengths, T, clip): batch 1, length 1, ragged with rows of length 0, three layers,
# a row-length pattern where whole chunks are padding, no clips.
CASES = [
    (5, 4, 7, 2, [1], 1, True),
    (6, 5, 9, 2, [11, 3, 0, 7], 11, True),
    (3, 4, 6, 3, [9, 9, 2, 5, 1], 9, True),
    (4, 3, 5, 1, [6, 0, 4], 6, False),
    (4, 3, 5, 2, [2, 1, 0], 13, True),
]


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 7, 50])
@pytest.mark.parametrize("case", CASES)
def test_wavefront_matches_reference(case, chunks):
    I, P, n, L, lengths, T, clip = case
    gen = torch.Generator().manual_seed(hash((I, P, n, L, T)) % 1000)
    lstm = make_lstm(gen, I, P, n, L, clip)
    x, lens, _, h0, c0 = inputs_for(gen, lstm, lengths, T)
    with torch.no_grad():
        got = wavefront.run_stack(lstm, x, lens, h0, c0, chunks=chunks)
    want = reference_stack(lstm, x, lens, h0, c0)
    for g, w, name in zip(got, want, ("outputs", "h_n", "c_n")):
        assert_close_verbose(g, w, name, **TOL[torch.float64])


@pytest.mark.parametrize("threads", [1, 2, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wavefront_in_low_precision_matches_layers(dtype, threads, wavefront_mode):
    """Thread teams of every size the chains get (threads > cores is fine here); the input GEMM runs per
    chunk, so results equal the layer-by-layer ones up to rounding."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(2)
    lstm = make_lstm(gen, 32, 16, 48, 2, dtype=dtype, scale=0.3)
    x, lens, mask, h0, c0 = inputs_for(gen, lstm, [13, 5, 0, 13, 9, 1], 13, dtype)
    with torch.no_grad():
        got = wavefront.run_stack(lstm, x, lens, h0, c0)
        want = lstm._run_stack(x, lens, h0, c0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want):
        assert_close_verbose(g.float(), w.float(), **tol)


def test_on_runs_the_wavefront_in_the_module_and_carries_state(wavefront_mode, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    lstms = [make_lstm(gen, 6, 5, 9, 2) for _ in range(2)]
    lstms[1].load_state_dict(lstms[0].state_dict())
    for lstm in lstms:
        lstm.stateful = True
    x, _, mask, _, _ = inputs_for(gen, lstms[0], [7, 2, 5], 7)
    real, calls = wavefront.run_stack, []
    monkeypatch.setattr(wavefront, "run_stack", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        for mode, lstm in zip(("off", "on"), lstms):
            wavefront_mode(mode)
            first, second = lstm(x, mask), lstm(x.flip(0), mask.flip(0))  # the second starts from the carried state
            if mode == "off":
                want = (first, second, lstm._states)
    assert len(calls) == 2
    for g, w in zip((first, second, *lstms[1]._states), (want[0], want[1], *want[2])):
        assert_close_verbose(g, w, **TOL[torch.float64])


def test_training_never_takes_the_wavefront(wavefront_mode):
    """_lstm_chains has no autograd formula: with gradients wanted the layers run one by one, even when on."""
    wavefront_mode("on")
    gen = torch.Generator().manual_seed(4)
    lstm = make_lstm(gen, 4, 3, 5, 2)
    lstm.requires_grad_(True)
    x, lens, mask, _, _ = inputs_for(gen, lstm, [5, 3], 5)
    out = lstm(x, mask)
    out.sum().backward()
    assert all(p.grad is not None for p in lstm.parameters())


def test_auto_needs_a_team_per_chain_then_measures(wavefront_mode):
    wavefront_mode("auto")
    gen = torch.Generator().manual_seed(5)
    lstm = make_lstm(gen, 8, 6, 10, 2, dtype=torch.float32)
    x, _, mask, _, _ = inputs_for(gen, lstm, [9, 4, 9], 9, torch.float32)
    with torch.no_grad():
        torch.set_num_threads(3)  # fewer threads than the 4 chains of a 2-layer stack: never considered
        want = lstm(x, mask)
        assert wavefront.info()["decisions"] == {}
        torch.set_num_threads(4)
        for _ in range(7):  # 3 warm-up calls, then 2 timed calls each way
            assert_close_verbose(lstm(x, mask), want, rtol=1e-5, atol=1e-5)
    (key, decision), = wavefront.info()["decisions"].items()
    assert key.startswith("ElmoLstm torch.float32 8 6 10 2") and key.endswith("threads=4"), key
    assert decision["choice"] in ("layers", "wavefront") and decision["layers_ms"] > 0 < decision["wavefront_ms"]


@pytest.mark.parametrize("proj_size,batch_first,packed,hx", [(0, False, False, False), (3, True, False, True),
                                                              (3, False, True, True), (0, True, True, False)])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_nn_lstm_wavefront_matches_torch(num_layers, proj_size, batch_first, packed, hx, wavefront_mode, monkeypatch):
    """elmo_fast.nn.LSTM with several layers in one direction: the pipeline gives torch.nn.LSTM's results."""
    wavefront_mode("on")
    torch.manual_seed(num_layers * 10 + proj_size)
    ref = torch.nn.LSTM(5, 7, num_layers=num_layers, proj_size=proj_size, batch_first=batch_first).double()
    ours = elmo_fast.nn.LSTM(5, 7, num_layers=num_layers, proj_size=proj_size, batch_first=batch_first).double()
    ours.load_state_dict(ref.state_dict())
    lengths = torch.tensor([9, 4, 1, 7])
    x = torch.randn(4, 9, 5, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    args = [torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
            if packed else x]
    if hx:
        args.append((torch.randn(num_layers, 4, proj_size or 7, dtype=torch.float64),
                     torch.randn(num_layers, 4, 7, dtype=torch.float64)))
    real, calls = wavefront.pipeline, []
    monkeypatch.setattr(wavefront, "pipeline", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got, (h_n, c_n) = ours(*args)
        want, (h_want, c_want) = ref(*args)
    assert calls == [1]
    if packed:
        got, want = got.data, want.data
    for g, w in ((got, want), (h_n, h_want), (c_n, c_want)):
        assert_close_verbose(g, w, **TOL[torch.float64])


def test_nn_lstm_gradient_of_c0_alone_steps_layer_by_layer(wavefront_mode, monkeypatch):
    """Only the initial cell state wants a gradient: still no wavefront (no autograd formula), and c0's
    gradient is torch.nn.LSTM's."""
    wavefront_mode("on")
    torch.manual_seed(2)
    ref = torch.nn.LSTM(4, 6, num_layers=2).double()
    ours = elmo_fast.nn.LSTM(4, 6, num_layers=2).double()
    ours.load_state_dict(ref.state_dict())
    ours.requires_grad_(False)
    monkeypatch.setattr(wavefront, "pipeline", lambda *a, **k: pytest.fail("took the wavefront"))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    h0 = torch.randn(2, 3, 6, dtype=torch.float64)
    c0 = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(ours(x, (h0, c0))[0].sum(), c0)[0]
    want = torch.autograd.grad(ref(x, (h0, c0))[0].sum(), c0)[0]
    assert_close_verbose(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("how", ["bidirectional", "one layer", "dropout while training", "gradients"])
def test_nn_lstm_without_a_pipeline_steps_layer_by_layer(how, wavefront_mode, monkeypatch):
    wavefront_mode("on")
    torch.manual_seed(1)
    lstm = elmo_fast.nn.LSTM(4, 6, num_layers=1 if how == "one layer" else 2, bidirectional=how == "bidirectional",
                             dropout=0.5 if how == "dropout while training" else 0.0).double()
    lstm.train(how == "dropout while training")
    monkeypatch.setattr(wavefront, "pipeline", lambda *a, **k: pytest.fail("took the wavefront"))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with torch.set_grad_enabled(how == "gradients"):
        out, _ = lstm(x)
    if how == "gradients":
        out.sum().backward()


def test_bad_mode_rejected(wavefront_mode, monkeypatch):
    with pytest.raises(ValueError, match="wavefront mode must be one of auto, on, off"):
        wavefront_mode("sometimes")
    monkeypatch.setattr(wavefront, "_mode", None)
    monkeypatch.setenv("ELMO_FAST_CPU_WAVEFRONT", "always")
    with pytest.raises(ValueError, match="ELMO_FAST_CPU_WAVEFRONT must be one of"):
        wavefront.mode()


def _chain_args(gen, reverse=(False, True, False)):
    xs, lens, w_ih, w_hh, bias, w_proj, h0, c0 = [], [], [], [], [], [], [], []
    for i, rev in enumerate(reverse):
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64) * 0.5  # noqa: E731
        xs.append(r(3, 4 + i, 5))
        lens.append(torch.tensor([4 + i, 0, 2]))
        w_ih.append(r(24, 5))
        w_hh.append(r(24, 3))
        bias.append(r(24) if i != 1 else None)
        w_proj.append(r(3, 6))
        h0.append(r(3, 3))
        c0.append(r(3, 6))
    return xs, lens, w_ih, w_hh, bias, w_proj, h0, c0, list(reverse), 0.5, 0.4


def test_lstm_chains_is_each_chain_alone():
    args = _chain_args(torch.Generator().manual_seed(6))
    got = torch.ops.elmo_fast._lstm_chains(*args)
    xs, lens, w_ih, w_hh, bias, w_proj, h0, c0, reverse, cc, pc = args
    for i in range(len(xs)):
        want = R.lstm_projection(xs[i], lens[i], w_ih[i], w_hh[i], bias[i], w_proj[i], h0[i], c0[i], cc, pc, reverse[i])
        for k in range(3):
            assert_close_verbose(got[k][i], want[k], f"chain {i} output {k}", **TOL[torch.float64])


def test_lstm_chains_opcheck():
    torch.library.opcheck(torch.ops.elmo_fast._lstm_chains.default, _chain_args(torch.Generator().manual_seed(7)))


def test_lstm_chains_bad_inputs():
    args = list(_chain_args(torch.Generator().manual_seed(8)))
    args[8] = args[8][:2]
    with pytest.raises(RuntimeError, match="reverse must hold one entry per chain"):
        torch.ops.elmo_fast._lstm_chains(*args)
    args = list(_chain_args(torch.Generator().manual_seed(8)))
    args[3] = [args[3][0], torch.zeros(20, 3, dtype=torch.float64), args[3][2]]
    with pytest.raises(RuntimeError, match="w_hh"):
        torch.ops.elmo_fast._lstm_chains(*args)
