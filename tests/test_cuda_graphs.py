"""ElmoLstm's inference forward replayed from CUDA graphs (ELMO_FAST_CUDA_GRAPHS, elmo_fast/cuda_graphs.py)."""
import copy
import pickle

import pytest
import torch

import elmo_fast
from elmo_fast import cuda_graphs
from elmo_fast.elmo import ElmoLstm

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture
def graphs():
    yield lambda mode: elmo_fast.set_kernel("cuda_graphs", mode)
    elmo_fast.set_kernel("cuda_graphs", "auto")


def test_switch_defaults_to_off_until_validated(graphs):
    info = elmo_fast.kernel_info()["cuda_graphs"]
    assert info["env"] == "ELMO_FAST_CUDA_GRAPHS" and info["choices"] == ["off", "on"]
    assert cuda_graphs.enabled() == ("on" in info["validated"])
    graphs("on")
    assert cuda_graphs.enabled()
    graphs("off")
    assert not cuda_graphs.enabled()


def test_cache_capacity_is_checked():
    with pytest.raises(ValueError, match="capacity"):
        cuda_graphs.GraphCache(capacity=0)


def test_cpu_forward_never_uses_graphs(graphs):
    graphs("on")
    lstm = ElmoLstm(6, 4, 8, 2, memory_cell_clip_value=3.0, state_projection_clip_value=3.0)
    x, mask = torch.randn(3, 5, 6), torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        out = lstm(x, mask)
    assert out.shape == (2, 3, 5, 8) and lstm._graphs is None


def test_captured_graphs_are_not_copied():
    lstm = ElmoLstm(6, 4, 8, 1)
    lstm._graphs = cuda_graphs.GraphCache()
    assert copy.deepcopy(lstm)._graphs is None
    assert pickle.loads(pickle.dumps(lstm))._graphs is None
    assert lstm._graphs is not None


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_matches_eager(graphs, dtype):
    torch.manual_seed(0)
    make = lambda: ElmoLstm(32, 16, 48, 2, memory_cell_clip_value=3.0,  # noqa: E731
                            state_projection_clip_value=3.0).to("cuda", dtype)
    eager, replayed = make(), make()
    replayed.load_state_dict(eager.state_dict())
    batches = []
    for lengths in ([9, 4, 0, 9], [9, 4, 0, 9], [2, 9, 9, 1], [9, 4, 0, 9]):  # a key seen again, a new one
        x = torch.randn(4, 9, 32, device="cuda", dtype=dtype)
        batches.append((x, torch.arange(9, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]))
    with torch.no_grad():
        graphs("off")
        want = [eager(x, m) for x, m in batches]
        graphs("on")
        got = [replayed(x, m) for x, m in batches]
    assert replayed._graphs.captures == 2 and len(replayed._graphs) == 2
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # the same kernels, replayed: the same bits
    for sa, sb in zip(replayed._states, eager._states):  # stateful: the carried states agree too
        assert torch.equal(sa, sb)
    got[0].add_(1)  # outputs are copies: a later replay does not overwrite an earlier result
    assert not torch.equal(got[0], got[1])


@needs_cuda
def test_graphs_are_evicted_and_skipped_with_grad(graphs):
    graphs("on")
    lstm = ElmoLstm(8, 4, 8, 1).cuda()
    lstm._graphs = cuda_graphs.GraphCache(capacity=2)
    x = torch.randn(2, 5, 8, device="cuda")
    with torch.no_grad():
        for n in (5, 4, 3, 5):
            lstm(x, torch.arange(5, device="cuda")[None, :].expand(2, 5) < n)
    assert len(lstm._graphs) == 2 and lstm._graphs.captures == 4  # 5 was evicted by 3, then captured again
    lstm.requires_grad_(True)
    out = lstm(x, torch.ones(2, 5, dtype=torch.bool, device="cuda"))  # training: eager, with grad
    assert out.requires_grad and lstm._graphs.captures == 4
