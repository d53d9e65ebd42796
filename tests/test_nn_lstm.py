"""elmo_fast.nn.LSTM against torch.nn.LSTM (same state_dict), and LstmCellWithProjection against the reference."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import elmo_fast
from elmo_fast import reference as R

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = dict(rtol=1e-9, atol=1e-10)  # float64 throughout


def pair(device, **kw):
    ref = torch.nn.LSTM(**kw).to(device=device, dtype=torch.float64)
    ours = elmo_fast.nn.LSTM(**kw).to(device=device, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


GRID = list(itertools.product([1, 2], [False, True], [False, True], [0, 3], [True, False]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers,bidirectional,batch_first,proj,bias", GRID)
def test_nn_lstm_matches_torch(device, layers, bidirectional, batch_first, proj, bias):
    dtype = torch.float64 if device == "cpu" else torch.float32
    if device == "cuda":
        pytest.skip("cuDNN vs float32 parity is covered by the op tests")
    kw = dict(input_size=4, hidden_size=5, num_layers=layers, bias=bias, batch_first=batch_first,
              bidirectional=bidirectional, proj_size=proj)
    ours, ref = pair(device, **kw)
    B, T = 3, 6
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), dtype=dtype, device=device, requires_grad=True)
    D, P = 2 if bidirectional else 1, proj or 5
    h0 = torch.randn(layers * D, B, P, dtype=dtype, device=device)
    c0 = torch.randn(layers * D, B, 5, dtype=dtype, device=device)
    out, (h, c) = ours(x, (h0, c0))
    out_r, (h_r, c_r) = ref(x, (h0, c0))
    for a, b in ((out, out_r), (h, h_r), (c, c_r)):
        torch.testing.assert_close(a, b, **TOL)
    ups = [torch.randn_like(t) for t in (out, h, c)]
    g = torch.autograd.grad((out, h, c), [x, *ours.parameters()], ups)
    g_r = torch.autograd.grad((out_r, h_r, c_r), [x, *ref.parameters()], ups)
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    assert names[1:] == [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g, g_r):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("bidirectional,proj,enforce_sorted", [(False, 0, True), (True, 2, False), (True, 0, False)])
def test_nn_lstm_packed_sequence(bidirectional, proj, enforce_sorted):
    ours, ref = pair("cpu", input_size=3, hidden_size=4, num_layers=2, bidirectional=bidirectional, proj_size=proj,
                     batch_first=True)
    lengths = torch.tensor([5, 5, 3, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 5])
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    out, (h, c) = ours(packed)
    out_r, (h_r, c_r) = ref(packed)
    assert torch.equal(out.batch_sizes, out_r.batch_sizes)
    for a, b in ((out.data, out_r.data), (h, h_r), (c, c_r)):
        torch.testing.assert_close(a, b, **TOL)
    if out_r.sorted_indices is not None:
        assert torch.equal(out.sorted_indices, out_r.sorted_indices)
    ups = [torch.randn_like(t) for t in (out.data, h, c)]
    g = torch.autograd.grad((out.data, h, c), [x, *ours.parameters()], ups, retain_graph=True)  # packed is shared
    g_r = torch.autograd.grad((out_r.data, h_r, c_r), [x, *ref.parameters()], ups)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, **TOL)


def test_nn_lstm_unbatched_default_state_and_dropout_eval():
    ours, ref = pair("cpu", input_size=3, hidden_size=4, num_layers=2, dropout=0.5)
    ours.eval(), ref.eval()
    x = torch.randn(7, 3, dtype=torch.float64)
    out, (h, c) = ours(x)
    out_r, (h_r, c_r) = ref(x)
    for a, b in ((out, out_r), (h, h_r), (c, c_r)):
        torch.testing.assert_close(a, b, **TOL)


def test_nn_lstm_clips_and_bad_input():
    m = elmo_fast.nn.LSTM(3, 4, proj_size=2, cell_clip=0.1, proj_clip=0.05).double()
    out, _ = m(torch.randn(5, 2, 3, dtype=torch.float64) * 10)
    assert out.abs().max() <= 0.05
    with pytest.raises(ValueError, match="input_size"):
        m(torch.randn(5, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="h_0"):
        m(torch.randn(5, 2, 3, dtype=torch.float64), (torch.zeros(1, 3, 2, dtype=torch.float64),
                                                       torch.zeros(1, 2, 4, dtype=torch.float64)))


@pytest.mark.parametrize("go_forward", [True, False])
def test_lstm_cell_with_projection_matches_reference(go_forward):
    cell = elmo_fast.nn.LstmCellWithProjection(3, 2, 5, go_forward=go_forward, memory_cell_clip_value=0.7,
                                               state_projection_clip_value=0.4).double()
    assert set(cell.state_dict()) == {"input_linearity.weight", "state_linearity.weight", "state_linearity.bias",
                                      "state_projection.weight"}
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    lengths = [4, 2, 1]
    h0, c0 = torch.randn(1, 3, 2, dtype=torch.float64), torch.randn(1, 3, 5, dtype=torch.float64)
    out, (h, c) = cell(x, lengths, (h0, c0))
    want = R.lstm_projection(x, torch.tensor(lengths), cell.input_linearity.weight, cell.state_linearity.weight,
                             cell.state_linearity.bias, cell.state_projection.weight, h0[0], c0[0], 0.7, 0.4,
                             not go_forward)
    for a, b in ((out, want[0]), (h[0], want[1]), (c[0], want[2])):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("packed", [False, True])
def test_nn_lstm_directions_side_by_side_match_torch(packed):
    """Bidirectional layers run both directions in one op; forced side by side on 2 threads, the
    results and every gradient still match torch.nn.LSTM."""
    ours, ref = pair("cpu", input_size=3, hidden_size=6, num_layers=2, bidirectional=True, proj_size=2,
                     batch_first=True)
    lengths = torch.tensor([2, 5, 1, 5])
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    inp = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False) if packed else x
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        torch.ops.elmo_fast._set_cpu_directions("concurrent")
        out, (h, c) = ours(inp)
        data = out.data if packed else out
        g = torch.autograd.grad((data, h, c), [x, *ours.parameters()], [torch.ones_like(t) for t in (data, h, c)],
                                retain_graph=True)
    finally:
        torch.ops.elmo_fast._set_cpu_directions("auto")
        torch.set_num_threads(threads)
    out_r, (h_r, c_r) = ref(inp)
    data_r = out_r.data if packed else out_r
    for a, b in ((data, data_r), (h, h_r), (c, c_r)):
        torch.testing.assert_close(a, b, **TOL)
    g_r = torch.autograd.grad((data_r, h_r, c_r), [x, *ref.parameters()], [torch.ones_like(t) for t in (data, h, c)])
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("packed", [False, True])
def test_nn_lstm_under_torch_compile(packed):
    """A model that holds the drop-in and is torch.compile'd: outputs, final states and every gradient
    match eager torch.nn.LSTM (padded input in one graph; PackedSequence with graph breaks allowed)."""
    torch._dynamo.reset()
    ours, ref = pair("cpu", input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2,
                     batch_first=True)
    x = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = torch.randn(4, 4, 2, dtype=torch.float64), torch.randn(4, 4, 5, dtype=torch.float64)
    if packed:
        inp = pack_padded_sequence(x, torch.tensor([2, 6, 1, 4]), batch_first=True, enforce_sorted=False)
    else:
        inp = x
    compiled = torch.compile(ours, fullgraph=not packed)  # pad_packed_sequence is on dynamo's skip list
    out, (h, c) = compiled(inp, (h0, c0))
    out_r, (h_r, c_r) = ref(inp, (h0, c0))
    data, data_r = (out.data, out_r.data) if packed else (out, out_r)
    for a, b in ((data, data_r), (h, h_r), (c, c_r)):
        torch.testing.assert_close(a, b, **TOL)
    ups = [torch.randn_like(t) for t in (data, h, c)]
    g = torch.autograd.grad((data, h, c), [x, *ours.parameters()], ups, retain_graph=True)
    g_r = torch.autograd.grad((data_r, h_r, c_r), [x, *ref.parameters()], ups)
    for name, a, b in zip(["x"] + [n for n, _ in ours.named_parameters()], g, g_r):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad {name}: {m}")
