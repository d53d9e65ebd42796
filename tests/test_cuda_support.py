"""Which GPUs a build runs on (elmo_fast/_cuda_support.py), the build's default arch list, and the clear
error for a CUDA tensor the build cannot serve. Without a GPU, CUDA tensors are fake ones (FakeTensorMode)
and the device's capability is patched: the checks run before any kernel."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import elmo_fast
from elmo_fast import _cuda_support, functional

DEFAULT = "8.0;9.0+PTX"


def test_parse_arch_list():
    assert _cuda_support.parse_arch_list(DEFAULT) == [(8, 0, "sass"), (9, 0, "sass"), (9, 0, "ptx")]
    assert _cuda_support.parse_arch_list("7.5 9.0a 10.0f") == [(7, 5, "sass"), (9, 0, "arch"), (10, 0, "family")]
    # Names and the empty list claim nothing: CUDA's own error stands then.
    for text in ("Ampere", "8.0;Hopper", "", "sm_90", "9"):
        assert _cuda_support.parse_arch_list(text) is None, text


@pytest.mark.parametrize("archs, capability, runs", [
    (DEFAULT, (7, 5), False),  # T4: older than every target
    (DEFAULT, (8, 0), True),
    (DEFAULT, (8, 6), True),  # sm_80 cubins run on later 8.x
    (DEFAULT, (8, 9), True),
    (DEFAULT, (9, 0), True),
    (DEFAULT, (10, 0), True),  # through compute_90 PTX
    (DEFAULT, (12, 0), True),
    ("9.0", (8, 0), False),
    ("9.0", (10, 0), False),  # a cubin does not cross majors
    ("8.6", (8, 0), False),  # nor run on an earlier minor
    ("9.0a", (9, 0), True),
    ("10.0a", (10, 3), False),  # arch-specific: that capability only
    ("10.0f", (10, 3), True),  # family: later minors of the major
    ("10.0f", (12, 0), False),
    ("7.5+PTX", (12, 0), True),
])
def test_runs_on(archs, capability, runs):
    assert _cuda_support.runs_on(_cuda_support.parse_arch_list(archs), capability) is runs


def test_default_archs_add_visible_gpus_they_miss():
    assert _cuda_support.archs_with_visible_gpus(DEFAULT, []) == DEFAULT
    assert _cuda_support.archs_with_visible_gpus(DEFAULT, [(9, 0), (8, 6), (12, 0)]) == DEFAULT
    assert _cuda_support.archs_with_visible_gpus(DEFAULT, [(7, 5), (8, 6), (7, 5), (7, 0)]) == DEFAULT + ";7.0;7.5"
    assert _cuda_support.archs_with_visible_gpus("Ampere", [(7, 5)]) == "Ampere"


def test_unsupported_gpu_message():
    message = _cuda_support.unsupported_gpu_message("x", DEFAULT, (7, 5), "cuda:0 (Tesla T4)")
    assert "x is on cuda:0 (Tesla T4) (compute capability 7.5)" in message
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX;7.5" pip install --no-build-isolation -e .' in message
    assert _cuda_support.unsupported_gpu_message("x", DEFAULT, (9, 0), "cuda:0 (H100)") is None
    assert _cuda_support.unsupported_gpu_message("x", "Ampere", (7, 5), "cuda:0 (Tesla T4)") is None


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU of a chosen capability and build facts of a chosen kind, for functional's device check."""
    functional._cuda_device_ok.cache_clear()
    real_info = elmo_fast.build_info

    def choose(capability, cuda_build=True, archs=("8.0", "9.0+PTX")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
        monkeypatch.setattr(elmo_fast, "build_info",
                            lambda: dict(real_info(), cuda=cuda_build, cuda_arch=list(archs) if cuda_build else []))

    yield choose
    functional._cuda_device_ok.cache_clear()


def _highway_on_fake_cuda():
    with FakeTensorMode():
        x = torch.empty(3, 4, device="cuda")
        weights, biases = [torch.empty(8, 4, device="cuda")], [torch.empty(8, device="cuda")]
        return functional.highway(x, weights, biases)


def test_gpu_without_code_in_the_build_is_a_clear_error(fake_gpu):
    fake_gpu((7, 5))
    with pytest.raises(RuntimeError, match=r"x is on cuda:0 \(Fake GPU\) \(compute capability 7\.5\).*"
                                           r'TORCH_CUDA_ARCH_LIST="8\.0;9\.0\+PTX;7\.5"'):
        _highway_on_fake_cuda()


def test_cuda_tensor_on_a_cpu_only_build_is_a_clear_error(fake_gpu):
    fake_gpu((9, 0), cuda_build=False)
    with pytest.raises(RuntimeError, match=r"x is on cuda, but this elmo_fast was built without its CUDA kernels"
                                           r".*ELMO_FAST_CUDA=1 pip install --no-build-isolation"):
        _highway_on_fake_cuda()


def test_supported_gpu_passes_the_check(fake_gpu):
    """The check lets a GPU the build has code for through (the op itself then runs on fake tensors: its
    shapes come back; FakeTensorMode runs no kernel)."""
    if not elmo_fast.build_info()["cuda"]:
        pytest.skip("a CPU-only build registers no CUDA kernel for the fake op to find")
    fake_gpu((8, 6))
    assert _highway_on_fake_cuda().shape == (3, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_this_gpu_runs_this_build():
    functional._cuda_device_ok.cache_clear()
    index = torch.cuda.current_device()
    assert functional._cuda_device_problem(index, "x") is None


def test_cli_info_says_which_gpus_run_this_build(fake_gpu, monkeypatch, capsys):
    import json

    from elmo_fast import cli

    fake_gpu((7, 5))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    capabilities = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
    assert cli.main(["info"]) == 0
    devices = json.loads(capsys.readouterr().out)["devices"]
    assert devices == [{"name": "Fake GPU", "capability": "7.5", "runs_this_build": False},
                       {"name": "Fake GPU", "capability": "9.0", "runs_this_build": True}]
