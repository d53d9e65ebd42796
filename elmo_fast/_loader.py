"""Loads the compiled extension elmo_fast._C and checks it was built against the running torch."""
import os

import torch

REBUILD_HINT = (
    "Rebuild elmo_fast against the installed torch, from the source tree:\n"
    "    pip install --no-build-isolation -e .        (or: python setup.py build_ext --inplace)"
)


def check_torch_version(built: str, running: str) -> None:
    """Raise ImportError when _C was built for another torch (its C++ ABI is not stable).

    ELMO_FAST_ALLOW_TORCH_MISMATCH=1 turns the error into nothing, for experts who know better.
    """
    if built == running or os.environ.get("ELMO_FAST_ALLOW_TORCH_MISMATCH") == "1":
        return
    raise ImportError(
        f"elmo_fast._C was built against torch {built}, but torch {running} is installed. {REBUILD_HINT}"
    )


def load_extension():
    """Import elmo_fast._C (registering torch.ops.elmo_fast.*) and return it."""
    try:
        from elmo_fast import _C
    except ImportError as error:
        raise explain_import_error(error) from error
    check_torch_version(_C.build_info()["torch"], torch.__version__)
    return _C


def explain_import_error(error: ImportError) -> ImportError:
    """Turn the loader's failure into an error that says what to do."""
    text = str(error)
    if "undefined symbol" in text or "cannot open shared object" in text:
        return ImportError(
            f"elmo_fast._C cannot be loaded with torch {torch.__version__} ({text}). It was most likely "
            f"built against another torch. {REBUILD_HINT}"
        )
    if "No module named" in text and "_C" in text:
        return ImportError(f"elmo_fast._C is not built. {REBUILD_HINT}")
    return error
