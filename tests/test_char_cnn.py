"""torch.ops.elmo_fast.char_cnn (via elmo_fast.functional.char_cnn) against elmo_fast.reference."""
import pytest
import torch

import elmo_fast.functional as F
import elmo_fast.reference as R

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}
# Gradients sum many (token, filter) terms per entry (the embedding rows most of all): a looser
# float32 atol, scaled by the sums' magnitude (~10-100 here).
GRAD_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}
PUBLISHED = [(1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024)]
SMALL = [(1, 4), (2, 8), (3, 16), (4, 8), (7, 5)]
BOW, EOW, PAD = 259, 260, 261


@pytest.fixture(autouse=True)
def _no_tf32():
    # The reference's cuDNN conv1d would use TF32 on Ampere+ (10-bit mantissa) and miss the float32
    # tolerances; the fused kernels accumulate in full float32.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_close_verbose(actual, expected, **tol):
    diff = (actual.double() - expected.double()).abs()
    top, mean = (diff.max().item(), diff.mean().item()) if diff.numel() else (0.0, 0.0)
    info = f"max |diff| {top:.3g}, mean {mean:.3g}"
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{m}\n{info}")


def make_ids(g, n, c=50):
    """Tokens in the §3.1 layout: random words of 0..c-2 bytes, plus the special kinds the shortcut
    must get right: empty words, full-length words (no pad char), whole padding tokens (zeros),
    tokens whose trailing run is an unusual id, and all-one-id tokens."""
    ids = torch.full((n, c), PAD, dtype=torch.long)
    for i in range(n):
        kind = i % 8
        if kind == 0:
            length = c - 2                                           # 48+ bytes at c = 50: no pad char
        elif kind == 1:
            length = 0                                               # empty word: BOW, EOW, pads
        else:
            length = int(torch.randint(0, min(12, c - 2) + 1, (1,), generator=g))
        ids[i, 0] = BOW
        ids[i, 1:1 + length] = torch.randint(1, 257, (length,), generator=g)
        ids[i, 1 + length] = EOW
        if kind == 5:
            ids[i] = 0                                               # whole padding token
        elif kind == 6:
            ids[i, 1 + length:] = int(torch.randint(1, 257, (1,), generator=g))  # trailing run of a byte id
        elif kind == 7 and i % 16 == 7:
            ids[i] = int(torch.randint(1, 262, (1,), generator=g))   # one id in every slot
    return ids


def make_params(g, d, filters, dtype, device="cpu", scale=0.3):
    emb = torch.randn(262, d, generator=g, dtype=torch.float64)     # row 0 non-zero on purpose
    weights = [torch.randn(m, d, w, generator=g, dtype=torch.float64) * scale for w, m in filters]
    biases = [torch.randn(m, generator=g, dtype=torch.float64) * 0.5 for _, m in filters]
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(emb), [cast(w) for w in weights], [cast(b) for b in biases]


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def forward_backward(fn, ids, emb, weights, biases, activation, grad_out=None):
    emb, weights, biases = leaf(emb), [leaf(w) for w in weights], [leaf(b) for b in biases]
    out = fn(ids, emb, weights, biases, activation)
    if grad_out is None:
        return out, None
    out.backward(grad_out)
    return out, (emb.grad, [w.grad for w in weights], [b.grad for b in biases])


def compare(ids, emb, weights, biases, activation, seed=0):
    dtype = emb.dtype
    out, _ = forward_backward(F.char_cnn, ids, emb, weights, biases, activation)
    ref, _ = forward_backward(R.char_cnn, ids, emb, weights, biases, activation)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close_verbose(out, ref, **TOL[dtype])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(out.device)
    _, grads = forward_backward(F.char_cnn, ids, emb, weights, biases, activation, grad_out)
    _, ref_grads = forward_backward(R.char_cnn, ids, emb, weights, biases, activation, grad_out)
    assert_close_verbose(grads[0], ref_grads[0], **GRAD_TOL[dtype])
    for a, b in zip(grads[1] + grads[2], ref_grads[1] + ref_grads[2]):
        assert_close_verbose(a, b, **GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("seed", range(3))
def test_char_cnn_matches_reference(device, dtype, activation, seed):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("CUDA supports float32/float16/bfloat16")
    g = torch.Generator().manual_seed(seed)
    n = [1, 37, 129][seed]
    ids = make_ids(g, n).to(device)
    emb, weights, biases = make_params(g, 16, SMALL, dtype, device)
    compare(ids, emb, weights, biases, activation, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_char_cnn_published_filters(device):
    g = torch.Generator().manual_seed(10)
    ids = make_ids(g, 24).to(device)
    emb, weights, biases = make_params(g, 16, PUBLISHED, torch.float32, device, scale=0.1)
    compare(ids, emb, weights, biases, "relu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", [3, 8, 17])
def test_char_cnn_non_elmo_filters_short_tokens(dtype, c):
    g = torch.Generator().manual_seed(c)
    ids = make_ids(g, 33, c)
    emb, weights, biases = make_params(g, 5, [(1, 4), (3, 4)], dtype)
    compare(ids, emb, weights, biases, "tanh")


def test_char_cnn_slots_equal_widest_filter():
    g = torch.Generator().manual_seed(3)
    ids = make_ids(g, 20, 7)
    emb, weights, biases = make_params(g, 16, SMALL, torch.float64)
    compare(ids, emb, weights, biases, "relu")


@pytest.mark.parametrize("n", [0, 1])
def test_char_cnn_tiny_batches(n):
    g = torch.Generator().manual_seed(4)
    ids = make_ids(g, n)
    emb, weights, biases = make_params(g, 16, SMALL, torch.float64)
    out = F.char_cnn(ids, emb, weights, biases)
    assert out.shape == (n, sum(m for _, m in SMALL))
    compare(ids, emb, weights, biases, "relu")
    compare(ids.int(), emb, weights, biases, "tanh")  # any integer dtype of ids


def test_char_cnn_padding_tokens_use_row_zero():
    # Whole padding tokens look up embedding row 0, whatever it holds (zeros in ELMo's table).
    g = torch.Generator().manual_seed(5)
    emb, weights, biases = make_params(g, 16, SMALL, torch.float64)
    ids = torch.zeros(4, 50, dtype=torch.long)
    compare(ids, emb, weights, biases, "relu")
    emb[0] = 0
    compare(ids, emb, weights, biases, "tanh")


def test_char_cnn_ties_between_repeated_chars():
    # "aaaa...": windows of equal content tie; the output and every gradient are the same
    # whichever tied window wins.
    g = torch.Generator().manual_seed(6)
    emb, weights, biases = make_params(g, 16, SMALL, torch.float64)
    ids = torch.full((3, 50), PAD, dtype=torch.long)
    ids[:, 0] = BOW
    ids[0, 1:30] = 98
    ids[1, 1:49] = 98
    ids[1, 49] = EOW
    ids[2, 1:] = 98
    compare(ids, emb, weights, biases, "relu")


def nan_case(g, n, c=50):
    """Ids where char 258 (unused by make_ids) sits inside a word of token 2, past the first windows
    (so that an earlier, finite window is the running max when it comes), and is the trailing run
    of token 10 (the constant window); embedding[258] is made NaN by the caller."""
    ids = make_ids(g, n, c)
    for row, word in [(2, 12), (10, 11)]:
        ids[row] = PAD
        ids[row, 0] = BOW
        ids[row, 1:1 + word] = torch.randint(1, 257, (word,), generator=g)
        ids[row, 1 + word] = EOW
    ids[2, 9] = 258
    ids[10, 12:] = 258
    return ids, [2, 10]


def assert_nan_rows(out, ref, nan_rows):
    """torch.max and torch.relu let a NaN through: the rows that see it are NaN in every filter, the
    others equal the reference."""
    nan = torch.isnan(out)
    assert torch.equal(nan, torch.isnan(ref))
    assert nan[nan_rows].all()
    keep = [i for i in range(out.shape[0]) if i not in nan_rows]
    assert not nan[keep].any()
    return keep


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_char_cnn_propagates_nan(device, activation):
    g = torch.Generator().manual_seed(11)
    dtype = torch.float64 if device == "cpu" else torch.float32
    emb, weights, biases = make_params(g, 16, SMALL, dtype, device)
    emb[258] = float("nan")
    ids, nan_rows = nan_case(g, 24)
    ids = ids.to(device)
    out = F.char_cnn(ids, emb, weights, biases, activation)
    ref = R.char_cnn(ids, emb, weights, biases, activation)
    keep = assert_nan_rows(out, ref, nan_rows)
    assert_close_verbose(out[keep], ref[keep], **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_char_cnn_inf_in_char_table(device, activation):
    """An inf channel in a char's row reaches only the windows that hold the char, as in the reference's
    conv (Note [char-CNN non-finite chars]: the packed GEMM also reads the chars past a narrower filter's
    width, against zero weights, and inf * 0 is NaN). Char 258 sits inside token 2's word and is token
    10's trailing run (the constant window). Forward only: the reference's conv backward multiplies the
    inf by the zero gradients of the windows that lost the max, which the max-routed backward never does."""
    g = torch.Generator().manual_seed(12)
    dtype = torch.float64 if device == "cpu" else torch.float32
    emb, weights, biases = make_params(g, 16, SMALL, dtype, device)
    emb[258, 3] = float("inf")
    ids, inf_rows = nan_case(g, 24)
    ids = ids.to(device)
    out = F.char_cnn(ids, emb, weights, biases, activation)
    ref = R.char_cnn(ids, emb, weights, biases, activation)
    assert torch.isinf(ref[2]).any() or activation == "tanh"  # the case is as described
    assert not torch.isnan(ref[2]).any()
    assert_close_verbose(out, ref, **TOL[dtype], equal_nan=True)


def test_char_cnn_noncontiguous_inputs():
    g = torch.Generator().manual_seed(7)
    ids = make_ids(g, 30, 50)
    wide = torch.zeros(30, 100, dtype=torch.long)
    wide[:, ::2] = ids
    emb, weights, biases = make_params(g, 16, SMALL, torch.float64)
    emb_t = emb.t().contiguous().t()
    weights = [w.transpose(0, 2).contiguous().transpose(0, 2) for w in weights]
    compare(wide[:, ::2], emb_t, weights, biases, "relu")


def test_char_cnn_backward_is_deterministic_across_threads():
    g = torch.Generator().manual_seed(8)
    ids = make_ids(g, 200)
    emb, weights, biases = make_params(g, 16, SMALL, torch.float32)
    grad_out = torch.randn(200, sum(m for _, m in SMALL), generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            out, grads = forward_backward(F.char_cnn, ids, emb, weights, biases, "relu", grad_out)
            results.append([out, grads[0], *grads[1], *grads[2]])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_char_cnn_gradcheck(activation):
    g = torch.Generator().manual_seed(9)
    ids = make_ids(g, 6, 9)
    emb, weights, biases = make_params(g, 3, [(1, 2), (2, 3), (4, 2)], torch.float64)
    leaves = [leaf(emb)] + [leaf(w) for w in weights] + [leaf(b) for b in biases]

    def fn(e, w0, w1, w2, b0, b1, b2):
        return F.char_cnn(ids, e, [w0, w1, w2], [b0, b1, b2], activation)

    assert torch.autograd.gradcheck(fn, leaves)


def test_char_cnn_opcheck():
    g = torch.Generator().manual_seed(11)
    ids = make_ids(g, 9, 10)
    emb, weights, biases = make_params(g, 4, [(1, 3), (3, 2)], torch.float64)
    op = torch.ops.elmo_fast.char_cnn.default
    for grad in (False, True):
        e, w, b = (leaf(emb), [leaf(t) for t in weights], [leaf(t) for t in biases]) if grad else (emb, weights, biases)
        for activation in ("relu", "tanh"):
            torch.library.opcheck(op, (ids, e, w, b, activation, grad))
    torch.library.opcheck(op, (ids[:0], emb, weights, biases, "relu", True))
    out, win = op(ids, emb, weights, biases, "tanh", True)
    torch.library.opcheck(torch.ops.elmo_fast.char_cnn_backward.default,
                          (torch.randn_like(out), ids, emb, weights, out, win, "tanh"))


def test_char_cnn_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(12)
    ids = make_ids(g, 16)
    emb, weights, biases = make_params(g, 16, SMALL, torch.float32)

    def fn(i, e, w, b):
        return F.char_cnn(i, e, w, b, "relu").sum(-1) * 2

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(ids, emb, weights, biases), fn(ids, emb, weights, biases))
    # ... and backward through the compiled graph.
    e1, e2 = leaf(emb), leaf(emb)
    compiled(ids, e1, weights, biases).sum().backward()
    fn(ids, e2, weights, biases).sum().backward()
    torch.testing.assert_close(e1.grad, e2.grad)


def _bad_cases():
    g = torch.Generator().manual_seed(13)
    ids = make_ids(g, 4)
    emb, weights, biases = make_params(g, 16, SMALL, torch.float32)
    ok = dict(char_ids=ids, embedding=emb, weights=weights, biases=biases, activation="relu")
    out_of_range = ids.clone()
    out_of_range[1, 3] = 262
    negative = ids.clone()
    negative[0, 0] = -1
    return [
        (dict(ok, char_ids=ids.float()), TypeError, "char_ids"),
        (dict(ok, char_ids=ids[0]), ValueError, "char_ids"),
        (dict(ok, char_ids=out_of_range), ValueError, "char_ids"),
        (dict(ok, char_ids=negative), ValueError, "char_ids"),
        (dict(ok, char_ids=ids[:, :5]), ValueError, "char_ids"),       # fewer slots than the widest filter (7)
        (dict(ok, embedding=emb.long()), TypeError, "embedding"),
        (dict(ok, embedding=emb[None]), ValueError, "embedding"),
        (dict(ok, weights=weights[:-1]), ValueError, "weights"),
        (dict(ok, weights=[weights[0][:, :3]] + weights[1:]), ValueError, r"weights\[0\]"),
        (dict(ok, weights=[weights[0][0]] + weights[1:]), ValueError, r"weights\[0\]"),
        (dict(ok, weights=[weights[0].double()] + weights[1:]), TypeError, r"weights\[0\]"),
        (dict(ok, biases=[biases[0][:2]] + biases[1:]), ValueError, r"biases\[0\]"),
        (dict(ok, biases=[biases[0].double()] + biases[1:]), TypeError, r"biases\[0\]"),
        (dict(ok, weights=weights[0]), TypeError, "weights"),
        (dict(ok, activation="gelu"), ValueError, "activation"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_char_cnn_bad_inputs(case):
    kwargs, error, match = _bad_cases()[case]
    with pytest.raises(error, match=match):
        F.char_cnn(**kwargs)


def test_char_cnn_op_checks_ids_in_cpp():
    # The last line of defence behind functional: the op itself refuses ids outside the table.
    g = torch.Generator().manual_seed(14)
    emb, weights, biases = make_params(g, 4, [(2, 3)], torch.float32)
    ids = torch.full((2, 6), 300, dtype=torch.long)
    with pytest.raises(RuntimeError, match="char_ids"):
        torch.ops.elmo_fast.char_cnn(ids, emb, weights, biases, "relu", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_char_cnn_cuda_low_precision(dtype):
    # flash-attention's rule: the kernel's error against float64 at most ~2x (+ slack) that of the
    # reference run in the same low precision.
    g = torch.Generator().manual_seed(15)
    ids = make_ids(g, 64).cuda()
    emb, weights, biases = make_params(g, 16, PUBLISHED, torch.float64, "cuda", scale=0.1)
    exact = R.char_cnn(ids, emb, weights, biases, "relu")
    low = lambda t: t.to(dtype)  # noqa: E731
    out = F.char_cnn(ids, low(emb), [low(w) for w in weights], [low(b) for b in biases], "relu")
    ref = R.char_cnn(ids, low(emb), [low(w) for w in weights], [low(b) for b in biases], "relu")
    err, ref_err = (out.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


def test_nn_char_cnn_module_names_and_forward():
    from elmo_fast.nn import CharCNN

    torch.manual_seed(16)
    module = CharCNN(16, SMALL, activation="tanh").double()
    keys = set(module.state_dict())
    assert keys == {"_char_embedding_weights"} | {f"char_conv_{i}.{p}" for i in range(len(SMALL))
                                                  for p in ("weight", "bias")}
    assert module.output_dim == sum(m for _, m in SMALL)
    ids = make_ids(torch.Generator().manual_seed(16), 12).reshape(3, 4, 50)
    out = module(ids)
    convs = [getattr(module, f"char_conv_{i}") for i in range(len(SMALL))]
    ref = R.char_cnn(ids.reshape(12, 50), module._char_embedding_weights, [c.weight for c in convs],
                     [c.bias for c in convs], "tanh").reshape(3, 4, -1)
    assert_close_verbose(out, ref, **TOL[torch.float64])
    out.sum().backward()
    assert module._char_embedding_weights.grad is not None and convs[-1].weight.grad is not None
    with pytest.raises(ValueError, match="activation"):
        CharCNN(16, SMALL, activation="gelu")
    with pytest.raises(ValueError, match="filters"):
        CharCNN(16, [(0, 3)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_char_cnn_cuda_graph_uses_current_stream():
    # A default-stream launch or a missing device guard shows up as wrong results under graph replay.
    g = torch.Generator().manual_seed(17)
    ids = make_ids(g, 32).cuda()
    emb, weights, biases = make_params(g, 16, SMALL, torch.float32, "cuda")
    expected = R.char_cnn(ids, emb, weights, biases, "relu")
    op = torch.ops.elmo_fast.char_cnn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(ids, emb, weights, biases, "relu", False)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = op(ids, emb, weights, biases, "relu", False)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_verbose(out, expected, **TOL[torch.float32])
