"""The CPU GEMM layer (csrc/cpu/gemm.h): forced paths agree, packed weights follow weight updates,
never leak out of the layer, and the op stays opcheck/torch.compile clean."""
import copy
import gc
import io
import json
import os
import pickle
import subprocess
import sys
import threading

import pytest
import torch

import elmo_fast
from elmo_fast import functional as F
from conftest import DEVICES  # noqa: F401  (CPU-only file: the layer is CPU-only)
from util import assert_close_verbose

OPS = torch.ops.elmo_fast


def info():
    return json.loads(OPS._cpu_gemm_info())


ONEDNN = info()["onednn_fp32"]


@pytest.fixture
def gemm_mode():
    """set(mode) forces a path and empties the cache; the previous mode is restored afterwards."""
    before = info()["mode"]

    def set_mode(mode):
        OPS._set_cpu_gemm(mode)
        OPS._cpu_gemm_reset()

    yield set_mode
    OPS._set_cpu_gemm(before)
    OPS._cpu_gemm_reset()


def assert_rel_close(a, b, name="", rel=2e-5):
    """max |a - b| <= rel * max |b|: fp32 GEMMs summing in different orders agree to ~1e-5 relative."""
    assert a.shape == b.shape and a.dtype == b.dtype, name
    if b.numel() == 0:
        return
    err, scale = (a.double() - b.double()).abs().max().item(), b.double().abs().max().item()
    assert err <= rel * scale + 1e-6, f"{name}: max |diff| {err:.3e} vs max |ref| {scale:.3e}"


def highway_case(n, f, layers, gen, dtype=torch.float32):
    x = torch.randn(n, f, generator=gen, dtype=dtype)
    ws = [torch.randn(2 * f, f, generator=gen, dtype=dtype) / f**0.5 for _ in range(layers)]
    bs = [torch.randn(2 * f, generator=gen, dtype=dtype) for _ in range(layers)]
    return x, ws, bs


def highway_fwd_bwd(x, ws, bs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in [x, *ws, *bs]]
    k = len(ws)
    y = F.highway(leaves[0], leaves[1:1 + k], leaves[1 + k:])
    return [y.detach(), *torch.autograd.grad(y, leaves, grad)]


@pytest.mark.parametrize("seed", range(6))
def test_forced_paths_agree_through_highway(gemm_mode, seed):
    gen = torch.Generator().manual_seed(seed)
    # Random shapes incl. N = 0 and 1 and sizes off the vector width.
    n = [0, 1, 2, 37, 300, 1000][seed]
    f = int(torch.randint(1, 160, (1,), generator=gen))
    x, ws, bs = highway_case(n, f, 1 + seed % 3, gen)
    grad = torch.randn(n, f, generator=gen)
    results = {}
    for mode in ["mm", "onednn"]:
        gemm_mode(mode)
        results[mode] = highway_fwd_bwd(x, ws, bs, grad)
        if mode == "onednn" and ONEDNN and n > 0:
            assert info()["onednn_calls"] > 0 and info()["mm_calls"] == 0
    for i, (a, b) in enumerate(zip(results["onednn"], results["mm"])):
        assert_rel_close(a, b, f"output {i}")


# (300, 8, 16384): several row blocks of the oneDNN path plus a remainder (Note [row blocks], gemm.cpp).
@pytest.mark.parametrize("m,k,n", [(1, 512, 1000), (0, 8, 4), (5, 0, 3), (3, 4, 0), (16, 513, 257), (300, 64, 96),
                                   (300, 8, 16384)])
@pytest.mark.parametrize("bias", [True, False])
def test_direct_gemms_agree(gemm_mode, m, k, n, bias):
    gen = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, 2 * k, generator=gen)[:, ::2]  # non-contiguous activations
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    c, a, bt = torch.randn(m, n, generator=gen), torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    got = {}
    for mode in ["mm", "onednn"]:
        gemm_mode(mode)
        got[mode] = (OPS._cpu_gemm_linear(x, w, b), OPS._cpu_gemm_add_matmul(c, a, bt))
    want_lin = x @ w.t() + (b if bias else 0)
    for mode in got:
        assert_rel_close(got[mode][0], want_lin, f"linear {mode}")
        assert_rel_close(got[mode][1], c + a @ bt, f"add_matmul {mode}")


@pytest.mark.skipif(not info()["onednn_bf16"], reason="this CPU/torch has no oneDNN bfloat16")
def test_bfloat16_paths_agree(gemm_mode):
    gen = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(33, 300, generator=gen), torch.randn(200, 300, generator=gen), torch.randn(200, generator=gen)
    exact = x.bfloat16().double() @ w.bfloat16().double().t() + b.bfloat16().double()
    for mode in ["mm", "onednn"]:
        gemm_mode(mode)
        out = OPS._cpu_gemm_linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
        assert out.dtype == torch.bfloat16 and info()["last_path"] == ("onednn" if mode == "onednn" else "mm")
        # fp32 accumulation, one bf16 rounding of the output: 2^-8 relative
        assert ((out.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-2).all()


def train_steps(module, x, steps, load=None):
    """A few SGD steps; returns per-step (output, grads). `load` swaps in a state_dict at step 1."""
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    record = []
    for step in range(steps):
        if load is not None and step == 1:
            module.load_state_dict(load)
        opt.zero_grad()
        y = module(x)
        (y * y).mean().backward()
        record.append([y.detach().clone()] + [p.grad.clone() for p in module.parameters()])
        opt.step()
    return record


@pytest.mark.parametrize("load", [False, True])
def test_packed_weights_follow_optimizer_steps_and_load_state_dict(gemm_mode, load):
    torch.manual_seed(3)
    base = elmo_fast.nn.Highway(48, num_layers=2)
    other = elmo_fast.nn.Highway(48, num_layers=2).state_dict() if load else None
    x = torch.randn(300, 48)  # M >= pack-now rows: auto would pack too
    runs = {}
    for mode in ["mm", "onednn"]:
        gemm_mode(mode)
        runs[mode] = train_steps(copy.deepcopy(base), x, 3, load=copy.deepcopy(other) if load else None)
    if ONEDNN:
        assert info()["refreshes"] >= 4  # every step changed both weights
    for step, (a, b) in enumerate(zip(runs["onednn"], runs["mm"])):
        for i, (u, v) in enumerate(zip(a, b)):
            assert_rel_close(u, v, f"step {step} tensor {i}", rel=1e-4)  # 3 SGD steps compound rounding


def test_data_assignment_and_inplace_no_grad_write_refresh(gemm_mode):
    gemm_mode("onednn")
    module = elmo_fast.nn.Highway(16, num_layers=1)
    x = torch.randn(9, 16)
    module(x)
    module._layers[0].weight.data = torch.randn(32, 16)  # new storage, same TensorImpl
    want = torch.ops.elmo_fast.highway(x.double(), [module._layers[0].weight.double()],
                                       [module._layers[0].bias.double()], False)[0].float()
    assert_rel_close(module(x), want, "after .data =", rel=1e-5)
    with torch.no_grad():
        module._layers[0].weight.mul_(0.5)  # bumps _version
    want = torch.ops.elmo_fast.highway(x.double(), [module._layers[0].weight.double()],
                                       [module._layers[0].bias.double()], False)[0].float()
    assert_rel_close(module(x), want, "after mul_", rel=1e-5)


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN: nothing is cached")
def test_freed_weight_entry_is_purged(gemm_mode):
    gemm_mode("onednn")
    w = torch.randn(64, 32)
    OPS._cpu_gemm_linear(torch.randn(4, 32), w, None)
    assert info()["entries"] == 1 and info()["packed"] == 1
    del w
    gc.collect()
    stats = info()  # reporting purges dead entries
    assert stats["entries"] == 0 and stats["purged"] == 1


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN: the auto policy is mm throughout")
def test_auto_policy(gemm_mode):
    gemm_mode("auto")
    OPS._cpu_gemm_linear(torch.randn(2, 8), torch.randn(8, 8), None)  # tiny: mm, nothing cached
    assert info()["last_path"] == "mm" and info()["entries"] == 0
    w, small = torch.randn(512, 512), torch.randn(16, 512)  # M*N*K = 4M: above min_work
    OPS._cpu_gemm_linear(small, w, None)  # first use, small M: mm, remembered
    assert info()["last_path"] == "mm" and info()["packs"] == 0
    OPS._cpu_gemm_linear(small, w, None)  # second use of the same version: pack
    assert info()["last_path"] == "onednn" and info()["packs"] == 1
    OPS._cpu_gemm_linear(small, w, None)
    assert info()["hits"] == 1
    OPS._cpu_gemm_linear(torch.randn(info()["pack_now_rows"], 256), torch.randn(512, 256), None)
    assert info()["last_path"] == "onednn" and info()["packs"] == 2  # large M: packs at first use


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN: the auto policy is mm throughout")
def test_auto_measures_each_shape_class(gemm_mode):
    """Note [measured path]: after the warm-up, the calls of a shape class alternate between the two
    paths, timed; then the faster one runs. Results agree whichever path ran."""
    gemm_mode("auto")
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(512, 512, generator=gen), torch.randn(16, 512, generator=gen)
    expected = x @ w.t()
    paths = []
    for _ in range(12):
        assert_rel_close(OPS._cpu_gemm_linear(x, w, None), expected)
        paths.append(info()["last_path"])
    # first sight (mm), 3 more warm-up calls (packed), 3 timed trials of each path, then the choice
    assert paths[:4] == ["mm", "onednn", "onednn", "onednn"]
    assert paths[4:10] == ["onednn", "mm"] * 3
    (key, decision), = info()["decisions"].items()
    assert key.startswith("Float") and key.endswith(f"M>=16 N=512 K=512 threads={torch.get_num_threads()}")
    assert decision["choice"] in ("mm", "onednn") and decision["mm_us"] > 0 and decision["onednn_us"] > 0
    faster = "onednn" if decision["onednn_us"] <= decision["mm_us"] else "mm"
    assert decision["choice"] == faster and paths[10:] == [faster, faster]
    # Rows 16..31 share the class (and its decision); 32 rows are a new class, bf16 another.
    assert_rel_close(OPS._cpu_gemm_linear(x[:13].repeat(2, 1), w, None), expected[:13].repeat(2, 1))
    assert info()["last_path"] == faster and len(info()["decisions"]) == 1
    OPS._cpu_gemm_linear(x.repeat(2, 1), w, None)
    OPS._cpu_gemm_linear(x.bfloat16(), w.bfloat16(), None)
    assert len(info()["decisions"]) == (3 if info()["onednn_bf16"] else 2)


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN: the auto policy is mm throughout")
def test_auto_without_measuring_takes_onednn(gemm_mode):
    gemm_mode("auto")
    OPS._cpu_gemm_measure(False)
    try:
        w, x = torch.randn(512, 512), torch.randn(16, 512)
        paths = []
        for _ in range(12):
            OPS._cpu_gemm_linear(x, w, None)
            paths.append(info()["last_path"])
        assert paths == ["mm"] + ["onednn"] * 11 and info()["decisions"] == {} and not info()["measure"]
    finally:
        OPS._cpu_gemm_measure(True)


def test_inference_tensors_take_mm(gemm_mode):
    gemm_mode("onednn")
    with torch.inference_mode():
        w, x = torch.randn(40, 30), torch.randn(5, 30)
        out = OPS._cpu_gemm_linear(x, w, None)
    assert info()["last_path"] == "mm" and info()["entries"] == 0
    assert_rel_close(out, x @ w.t())


def all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_tensors(v)
    elif isinstance(obj, torch.nn.Module):
        yield from obj.state_dict().values()
        yield from obj.parameters()
        yield from obj.buffers()
        for v in vars(obj).values():
            if isinstance(v, torch.Tensor):
                yield v


def test_packed_tensors_never_leave_the_layer(gemm_mode):
    gemm_mode("onednn")
    module = elmo_fast.nn.Highway(24, num_layers=2)
    x = torch.randn(7, 24)
    y = module(x)
    y.sum().backward()
    assert all(t.layout == torch.strided for t in all_tensors(module))
    clone = copy.deepcopy(module)
    pickled = pickle.loads(pickle.dumps(module))
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert all(t.layout == torch.strided for t in all_tensors(state))
    fresh = elmo_fast.nn.Highway(24, num_layers=2)
    fresh.load_state_dict(state)
    for m in [clone, pickled, fresh]:
        assert all(t.layout == torch.strided for t in all_tensors(m))
        assert_close_verbose(m(x), y.detach(), rtol=1e-6, atol=1e-6)
    as64 = module.to(torch.float64)  # float64 leaves the oneDNN layer
    assert_rel_close(as64(x.double()), y.detach().double(), rel=1e-5)
    del clone, pickled, fresh, m
    gc.collect()
    assert info()["packed"] == 0  # the converted weights' stale packed copies were dropped


def test_mkldnn_disabled_falls_back_to_mm(gemm_mode):
    # What a torch without oneDNN does: same results, mm path, nothing cached.
    gemm_mode("onednn")
    x, ws, bs = highway_case(300, 40, 2, torch.Generator().manual_seed(9))
    grad = torch.randn(300, 40)
    with torch.backends.mkldnn.flags(enabled=False):
        OPS._cpu_gemm_reset()
        off = highway_fwd_bwd(x, ws, bs, grad)
        assert info()["onednn_calls"] == 0 and info()["entries"] == 0 and not info()["onednn_fp32"]
    gemm_mode("mm")
    for i, (a, b) in enumerate(zip(off, highway_fwd_bwd(x, ws, bs, grad))):
        assert torch.equal(a, b), f"output {i}"


@pytest.mark.parametrize("mode", ["mm", "onednn"])
def test_opcheck_and_compile_with_forced_path(gemm_mode, mode):
    gemm_mode(mode)
    gen = torch.Generator().manual_seed(11)
    for n, f, k, grad in [(3, 4, 2, True), (0, 4, 1, True), (300, 16, 1, False)]:
        x, ws, bs = highway_case(n, f, k, gen)
        for t in [x, *ws, *bs]:
            t.requires_grad_(grad)
        torch.library.opcheck(OPS.highway.default, (x, ws, bs, grad))
    x, ws, bs = highway_case(20, 8, 2, gen)
    compiled = torch.compile(F.highway, fullgraph=True)
    assert_rel_close(compiled(x, ws, bs), F.highway(x, ws, bs), "compiled", rel=1e-6)
    packs = info()["packs"]
    compiled(x, ws, bs)
    assert info()["packs"] == packs  # compiled graphs pass the same weight tensors: cache hits


def test_concurrent_calls_agree(gemm_mode):
    gemm_mode("onednn")
    gen = torch.Generator().manual_seed(5)
    x, ws, bs = highway_case(64, 96, 2, gen)
    want = F.highway(x, ws, bs)
    errors = []

    def work():
        for _ in range(5):
            OPS._cpu_gemm_reset()  # races packing against dropping the cache on purpose
            if not torch.allclose(F.highway(x, ws, bs), want, rtol=1e-5, atol=1e-5):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def run_with_env(value, code):
    env = dict(os.environ, ELMO_FAST_CPU_GEMM=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_selects_and_rejects():
    code = ("import json, torch, elmo_fast; w = torch.randn(8, 8); "
            "torch.ops.elmo_fast._cpu_gemm_linear(torch.randn(2, 8), w, None); "
            "print(json.loads(torch.ops.elmo_fast._cpu_gemm_info())['mode'])")
    ok = run_with_env("mm", code)
    assert ok.returncode == 0 and ok.stdout.strip() == "mm", ok.stderr
    bad = run_with_env("fastest", code)
    assert bad.returncode != 0 and "ELMO_FAST_CPU_GEMM must be auto, mm or onednn, got 'fastest'" in bad.stderr
