"""Which GPUs a build's CUDA code runs on, from its TORCH_CUDA_ARCH_LIST: used by setup.py (to add the
visible GPUs' archs to the default list) and before the first op on a CUDA device (so that a GPU the
build has no code for is a clear error naming the fix, not CUDA's "no kernel image is available").

Kept free of elmo_fast imports: setup.py loads this file by path before the package is built.

The rules are CUDA's: a cubin (SASS) for sm_XY runs on compute capability X.Z for Z >= Y (same major);
an arch-specific one ("9.0a") only on X.Y itself; a family one ("10.0f") on X.Z for Z >= Y; PTX
("9.0+PTX") is compiled by the driver for any capability >= X.Y.
"""
import re
from typing import List, Optional, Tuple

# (major, minor, what): what is "sass", "arch" (an "a" cubin), "family" (an "f" cubin) or "ptx".
Target = Tuple[int, int, str]


def parse_arch_list(text: str) -> Optional[List[Target]]:
    """TORCH_CUDA_ARCH_LIST's targets ("8.0;9.0+PTX", spaces also separate), or None when an entry is
    not a number (torch's names such as "Ampere" included: nothing is then claimed about which GPUs the
    build runs on, and CUDA's own error stands)."""
    targets: List[Target] = []
    for entry in text.replace(" ", ";").split(";"):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if match is None:
            return None
        major, minor, suffix, ptx = int(match[1]), int(match[2]), match[3], match[4]
        targets.append((major, minor, {"": "sass", "a": "arch", "f": "family"}[suffix]))
        if ptx:
            targets.append((major, minor, "ptx"))
    return targets or None


def runs_on(targets: List[Target], capability: Tuple[int, int]) -> bool:
    """Whether code built for targets runs on a GPU of this compute capability."""
    major, minor = capability
    for t_major, t_minor, what in targets:
        if what == "ptx" and (t_major, t_minor) <= (major, minor):
            return True
        if what in ("sass", "family") and t_major == major and t_minor <= minor:
            return True
        if what == "arch" and (t_major, t_minor) == (major, minor):
            return True
    return False


def arch_list_runs_on(arch_list: str, capability: Tuple[int, int]) -> Optional[bool]:
    """Whether code built for TORCH_CUDA_ARCH_LIST=arch_list runs on this capability; None when the
    list is not understood."""
    targets = parse_arch_list(arch_list)
    return None if targets is None else runs_on(targets, capability)


def archs_with_visible_gpus(default: str, capabilities: List[Tuple[int, int]]) -> str:
    """The default arch list plus each visible GPU's capability that it does not run on (a T4's 7.5
    beside the default 8.0;9.0+PTX), so that `pip install` on a machine with a GPU builds for it."""
    extra = [f"{major}.{minor}" for major, minor in sorted(set(capabilities))
             if arch_list_runs_on(default, (major, minor)) is False]
    return ";".join([default] + extra)


def unsupported_gpu_message(name: str, arch_list: str, capability: Tuple[int, int], gpu: str) -> Optional[str]:
    """Why tensor name's GPU cannot run this build's kernels, or None when it can (or when the build's
    arch list is not understood: CUDA's own error then stands)."""
    if arch_list_runs_on(arch_list, capability) is not False:
        return None
    cap = f"{capability[0]}.{capability[1]}"
    return (f"{name} is on {gpu} (compute capability {cap}), but elmo_fast's CUDA kernels were built for "
            f"TORCH_CUDA_ARCH_LIST={arch_list!r}, which has no code for it. Rebuild for this GPU, from the "
            f"source tree: TORCH_CUDA_ARCH_LIST=\"{arch_list};{cap}\" pip install --no-build-isolation -e .")
