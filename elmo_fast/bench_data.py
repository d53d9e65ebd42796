"""Inputs for the benchmarks: English sentences from Python's own docstrings, and random-weight
ELMo files of the published sizes (written once per process to a temporary directory).

Real text matters: the char-CNN's padding shortcut and token dedup pay off on real word lengths
and repetitions, and random strings would hide both.
"""
import atexit
import functools
import importlib
import random
import re
import shutil
import tempfile
import warnings
from typing import Dict, List, Tuple

# Stdlib modules with long prose docstrings; a fixed list keeps the text identical across runs.
_MODULES = ["argparse", "collections", "functools", "inspect", "json", "logging", "os", "pathlib", "random",
            "re", "subprocess", "threading", "typing", "unittest", "urllib.parse", "zipfile", "tarfile",
            "email.message", "http.client", "asyncio", "decimal", "fractions", "statistics", "textwrap"]
_TOKEN = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|[0-9]+|[.,;:!?()\"'-]")


@functools.lru_cache(maxsize=1)
def english_tokens() -> Tuple[str, ...]:
    """Tokens (words and punctuation) of the docstrings of a fixed set of stdlib modules, in order."""
    tokens: List[str] = []
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [module.__doc__ or ""]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr, None)
            with warnings.catch_warnings():  # typing.io and typing.re warn when their __doc__ is read
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and getattr(obj, "__module__", None) == module.__name__:
                docs.append(doc)
        for doc in docs:
            tokens.extend(_TOKEN.findall(doc))
    return tuple(tokens)


def english_sentences(batch: int, words: int, seed: int = 0) -> List[List[str]]:
    """`batch` sentences of exactly `words` consecutive tokens each, from a seeded offset."""
    tokens = english_tokens()
    rng = random.Random(seed)
    start = rng.randrange(0, max(1, len(tokens) - batch * words))
    return [list(tokens[start + b * words:start + (b + 1) * words]) for b in range(batch)]


def random_sentences(batch: int, words: int, seed: int = 0) -> List[List[str]]:
    """Sentences of distinct random lowercase words with English-like lengths (2-10 letters)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(words)]
            for _ in range(batch)]


def published_model_options(model: str) -> Dict:
    """synthetic.write_elmo_files keyword arguments for a published model size."""
    from elmo_fast.synthetic import PUBLISHED_FILTERS, published_options

    options = published_options(model)
    return dict(filters=PUBLISHED_FILTERS, char_dim=16, n_highway=options["char_cnn"]["n_highway"],
                dim=options["lstm"]["dim"], projection_dim=options["lstm"]["projection_dim"], n_layers=2)


@functools.lru_cache(maxsize=None)
def model_files(model: str) -> Tuple[str, str]:
    """(options_file, weight_file) of a published model size with random weights."""
    from elmo_fast.synthetic import write_elmo_files

    directory = tempfile.mkdtemp(prefix=f"elmo_fast_bench_{model}_")
    # The original size is 358 MB of random weights: gone with the process, not left in /tmp.
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return write_elmo_files(directory, name=model, **published_model_options(model))


@functools.lru_cache(maxsize=None)
def model_state(model: str) -> Tuple[Dict, Dict]:
    """(options, state dict in AllenNLP `_ElmoBiLm` layout) of a published model size, random weights."""
    from elmo_fast.weights import load_weights

    return load_weights(*model_files(model))
