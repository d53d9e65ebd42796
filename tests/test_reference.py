"""reference.py (the oracle) against second, independently written transcriptions of the spec:
AllenNLP's sorted, shrinking-batch LSTM loop (spec §5.2) and an explicit-sum char-CNN (spec §4.2)."""
import pytest
import torch

from elmo_fast import reference as R

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def allennlp_lstm(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell_clip, proj_clip, reverse):
    """AllenNLP 0.9 `LstmCellWithProjection.forward` on a length-sorted batch: the active rows are a
    prefix that shrinks (forward) or grows (backward) with the time index; rows restored at the end."""
    order = torch.argsort(lengths, descending=True, stable=True)
    x, lens = x[order], lengths[order].tolist()
    h, c = h0[order].clone(), c0[order].clone()
    batch, steps, _ = x.shape
    n = c0.shape[1]
    out = x.new_zeros(batch, steps, h0.shape[1])
    for timestep in range(steps):
        index = steps - timestep - 1 if reverse else timestep
        active = sum(1 for length in lens if length > index)     # rows sorted: a prefix
        if active == 0:
            continue
        z = x[:active, index] @ w_ih.t() + h[:active] @ w_hh.t() + bias
        i, f, j, o = (z[:, k * n:(k + 1) * n] for k in range(4))
        mem = torch.sigmoid(i) * torch.tanh(j) + torch.sigmoid(f) * c[:active]
        if cell_clip:
            mem = torch.clamp(mem, -cell_clip, cell_clip)
        hid = (torch.sigmoid(o) * torch.tanh(mem)) @ w_proj.t()
        if proj_clip:
            hid = torch.clamp(hid, -proj_clip, proj_clip)
        h, c = h.clone(), c.clone()
        h[:active], c[:active] = hid, mem
        out[:active, index] = hid
    restore = torch.argsort(order)
    return out[restore], h[restore], c[restore]


def make_lstm_case(seed, dtype, batch, steps, inputs=5, cells=7, proj=3, zero_lengths=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    lengths = torch.randint(0, steps + 1, (batch,), generator=g) if steps else torch.zeros(batch, dtype=torch.long)
    if not zero_lengths and batch:
        lengths[0] = steps
    return (rnd(batch, steps, inputs), lengths, rnd(4 * cells, inputs, scale=0.8), rnd(4 * cells, proj, scale=0.8),
            rnd(4 * cells, scale=0.3), rnd(proj, cells, scale=1.5), rnd(batch, proj), rnd(batch, cells))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("seed,batch,steps", [(0, 1, 1), (1, 4, 6), (2, 7, 9), (3, 3, 1), (4, 5, 4)])
def test_lstm_projection_matches_allennlp_loop(dtype, reverse, seed, batch, steps):
    case = make_lstm_case(seed, dtype, batch, steps, zero_lengths=seed == 4)
    for cell_clip, proj_clip in ((None, None), (0.7, 0.5)):
        got = R.lstm_projection(*case, cell_clip=cell_clip, proj_clip=proj_clip, reverse=reverse)
        want = allennlp_lstm(*case, cell_clip, proj_clip, reverse)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL[dtype])
        x, lengths = case[0], case[1]
        for b in range(batch):      # zeros past each row's length
            assert torch.all(got[0][b, int(lengths[b]):] == 0)


def test_lstm_projection_reverse_is_within_row_length():
    # Reverse of a row = forward over that row's own positions, flipped (spec §5.2, bilm-tf reverse_sequence).
    x, lengths, *rest = make_lstm_case(5, torch.float64, 4, 6)
    lengths = torch.tensor([6, 3, 1, 0])
    out, h, c = R.lstm_projection(x, lengths, *rest, cell_clip=1.0, proj_clip=1.0, reverse=True)
    for b in range(4):
        n = int(lengths[b])
        flipped = x[b:b + 1, :n].flip(1)
        o1, h1, c1 = R.lstm_projection(flipped, lengths[b:b + 1], rest[0], rest[1], rest[2], rest[3],
                                       rest[4][b:b + 1], rest[5][b:b + 1], cell_clip=1.0, proj_clip=1.0)
        torch.testing.assert_close(out[b, :n], o1[0].flip(0))
        torch.testing.assert_close(h[b], h1[0])
        torch.testing.assert_close(c[b], c1[0])


def test_lstm_projection_empty_and_zero_lengths():
    x, lengths, *rest = make_lstm_case(6, torch.float64, 3, 4)
    lengths = torch.zeros(3, dtype=torch.long)
    out, h, c = R.lstm_projection(x, lengths, *rest)
    assert torch.all(out == 0) and torch.equal(h, rest[4]) and torch.equal(c, rest[5])
    # T = 0
    out, h, c = R.lstm_projection(x[:, :0], lengths, *rest)
    assert out.shape == (3, 0, 3) and torch.equal(h, rest[4])
    # B = 0
    out, h, c = R.lstm_projection(x[:0], lengths[:0], rest[0], rest[1], rest[2], rest[3], rest[4][:0], rest[5][:0])
    assert out.shape == (0, 4, 3) and h.shape == (0, 3) and c.shape == (0, 7)


def test_lstm_projection_without_projection_is_torch_lstm():
    # w_proj None: a plain LSTM; torch.nn.LSTM has gate order [i, f, g, o], the same as ours.
    g = torch.Generator().manual_seed(0)
    lstm = torch.nn.LSTM(5, 6, batch_first=True).double()
    x = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    want, (h_n, c_n) = lstm(x)
    out, h, c = R.lstm_projection(x, torch.tensor([4, 4]), lstm.weight_ih_l0, lstm.weight_hh_l0,
                                  lstm.bias_ih_l0 + lstm.bias_hh_l0, None, x.new_zeros(2, 6), x.new_zeros(2, 6))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(h, h_n[0])
    torch.testing.assert_close(c, c_n[0])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_char_cnn_matches_explicit_sums(activation):
    g = torch.Generator().manual_seed(1)
    d, filters = 3, [(1, 2), (2, 3), (4, 2)]
    ids = torch.randint(0, 262, (5, 9), generator=g)
    ids[0] = 0                                           # a whole padding token
    emb = torch.randn(262, d, generator=g, dtype=torch.float64)
    weights = [torch.randn(m, d, w, generator=g, dtype=torch.float64) for w, m in filters]
    biases = [torch.randn(m, generator=g, dtype=torch.float64) for _, m in filters]
    got = R.char_cnn(ids, emb, weights, biases, activation)
    act = torch.relu if activation == "relu" else torch.tanh
    want = torch.zeros(5, sum(m for _, m in filters), dtype=torch.float64)
    for token in range(5):
        col = 0
        for (w, m), weight, bias in zip(filters, weights, biases):
            for f in range(m):
                best = max(sum(emb[ids[token, t + k], c] * weight[f, c, k] for k in range(w) for c in range(d))
                           + bias[f] for t in range(9 - w + 1))
                want[token, col] = act(best)
                col += 1
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="activation"):
        R.char_cnn(ids, emb, weights, biases, "sigmoid")
