"""elmo_fast: a fast, faithful ELMo (Peters et al. 2018) on fused C++/CUDA torch custom ops."""
import json

import torch

from elmo_fast._version import __version__
from elmo_fast import _ops  # noqa: F401  (loads _C: registers torch.ops.elmo_fast.*)
from elmo_fast import functional, nn  # noqa: F401
from elmo_fast.chars import batch_to_ids
from elmo_fast.elmo import Elmo, ElmoBiLm, ElmoCharacterEncoder, ElmoLstm, ScalarMix
from elmo_fast.embedder import ElmoEmbedder


def build_info() -> dict:
    """What the installed extension was built with.

    Keys: version (package), torch (the torch it was compiled against), cuda (bool), cuda_arch
    (list of TORCH_CUDA_ARCH_LIST entries), openmp (bool: our kernels' loops run on torch's OpenMP threads), compiler, cplusplus.
    """
    info = dict(_ops._C.build_info())
    info["cuda_arch"] = [a for a in info.get("cuda_arch", "").replace(" ", ";").split(";") if a]
    return {"version": __version__, **info}


def set_kernel(family: str, mode: str) -> None:
    """Chooses the CUDA kernel of an op family for this process, as the environment variable would.

    family "char_cnn" (ELMO_FAST_CHAR_CNN_KERNEL): "auto" (default), "simt" or "tensor_core";
    "cuda_directions" (ELMO_FAST_CUDA_DIRECTIONS): "serial" or "streams"; "cuda_graphs"
    (ELMO_FAST_CUDA_GRAPHS): "off" or "on"; "lstm" (ELMO_FAST_LSTM_KERNEL): "stepwise" or "persistent".
    "auto" takes a fast kernel only once it has passed the CUDA tests on a real GPU
    (kernel_info()[family]["validated"]); a kernel asked for by name runs or raises, never falls back.
    """
    if not isinstance(family, str) or not isinstance(mode, str):
        raise TypeError(f"set_kernel takes two strings, got {type(family).__name__} and {type(mode).__name__}")
    torch.ops.elmo_fast._set_kernel(family, mode)


def kernel_info() -> dict:
    """Per op family: the environment variable, the current mode, the choices and the validated kernels."""
    return json.loads(torch.ops.elmo_fast._kernel_info())


__all__ = ["__version__", "build_info", "set_kernel", "kernel_info", "functional", "nn", "batch_to_ids", "Elmo",
           "ElmoBiLm", "ElmoCharacterEncoder", "ElmoLstm", "ElmoEmbedder", "ScalarMix"]
