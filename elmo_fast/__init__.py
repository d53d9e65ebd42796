"""elmo_fast: a fast, faithful ELMo (Peters et al. 2018) on fused C++/CUDA torch custom ops."""
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


__all__ = ["__version__", "build_info", "functional", "nn", "batch_to_ids", "Elmo", "ElmoBiLm",
           "ElmoCharacterEncoder", "ElmoLstm", "ElmoEmbedder", "ScalarMix"]
