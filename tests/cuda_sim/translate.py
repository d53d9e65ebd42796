"""Rewrites a .cu file of csrc/cuda into C++ for the CPU simulator (cuda_sim.h): the few constructs g++
cannot parse become calls into the simulator, and nothing else changes, so the kernels that run are the
kernels in the file."""
import re

_DROPPED_INCLUDES = ("<mma.h>", "<cooperative_groups.h>", "<math_constants.h>")

# extern __shared__ [__align__(n)] TYPE NAME[];
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
# __shared__ TYPE NAME[DIM];
_STATIC_SHARED = re.compile(r"(?<!extern )__shared__\s+([\w:\s]+?)\s+(\w+)\s*\[([^\]]+)\]\s*;")


def _matching(text, i, open_ch, close_ch, step):
    """Index of the bracket matching text[i] (scanning forward with step 1, backward with -1)."""
    depth = 0
    while 0 <= i < len(text):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError(f"unbalanced {open_ch}{close_ch}")


def _rewrite_launches(text):
    """NAME[<targs>] <<<CONFIG>>>(ARGS); -> ef_sim::launch(ef_sim::LaunchConfig(CONFIG), [&] { NAME(ARGS); });"""
    out = []
    pos = 0
    while (start := text.find("<<<", pos)) != -1:
        # The kernel expression before <<<: an identifier, maybe with template arguments.
        j = start - 1
        while text[j].isspace():
            j -= 1
        if text[j] == ">":
            j = _matching(text, j, ">", "<", -1) - 1
        while j >= 0 and (text[j].isalnum() or text[j] in "_:"):
            j -= 1
        name_start = j + 1
        name = text[name_start:start].strip()
        config_end = text.index(">>>", start)
        config = text[start + 3:config_end]
        k = config_end + 3
        while text[k].isspace():
            k += 1
        if text[k] != "(":
            raise ValueError(f"launch of {name}: expected '(' after >>>")
        args_end = _matching(text, k, "(", ")", 1)
        args = text[k + 1:args_end]
        semi = text.index(";", args_end)
        out.append(text[pos:name_start])
        out.append(f"::ef_sim::launch(::ef_sim::LaunchConfig({config}), [&] {{ {name}({args}); }});")
        pos = semi + 1
    out.append(text[pos:])
    return "".join(out)


def translate(source, filename=None):
    dropped = tuple(f"#include {inc}" for inc in _DROPPED_INCLUDES)
    lines = ["" if line.strip().startswith(dropped) else line for line in source.splitlines()]  # keeps numbering
    line = f'#line 1 "{filename}"\n' if filename else ""  # diagnostics point into the .cu file
    text = '#include "cuda_sim.h"\n' + line + "\n".join(lines) + "\n"
    text = _DYNAMIC_SHARED.sub(lambda m: f"{m[1].strip()}* {m[2]} = ::ef_sim::dynamic_shared<{m[1].strip()}>();", text)
    text = _STATIC_SHARED.sub(
        lambda m: f"{m[1].strip()}* {m[2]} = ::ef_sim::block_static<{m[1].strip()}>(__LINE__, {m[3]});", text)
    text = _rewrite_launches(text)
    text = text.replace("cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(",
                        "::ef_sim::launch_cooperative((")
    if "__shared__" in text or "<<<" in text:
        raise ValueError("cuda_sim.translate: a construct it does not know is left")
    return text
