"""Token -> 50 character ids, exactly as AllenNLP's ``ELMoCharacterMapper`` (spec §3.1).

Raw ids are bytes 0-255 plus five specials (256-260); every id handed to the model is raw + 1, so
that 0 can mean "no token" (a whole padding token is 50 zeros). Shape letters: B sentences,
T tokens (longest sentence), W = MAX_CHARS = 50 characters per token.
"""
import functools
from typing import List, Sequence

import numpy as np
import torch

__all__ = [
    "MAX_CHARS", "N_CHARACTERS", "BOS_TOKEN", "EOS_TOKEN",
    "BOS_CHAR", "EOS_CHAR", "BOW_CHAR", "EOW_CHAR", "PAD_CHAR",
    "BOS_CHARS", "EOS_CHARS", "token_to_ids", "batch_to_ids",
]

MAX_CHARS = 50             # W: ids per token, including the begin/end-of-word markers
N_CHARACTERS = 262         # rows of the char embedding at prediction: 0 (no token) + 261 raw ids
MAX_TOKEN_BYTES = MAX_CHARS - 2

BOS_TOKEN = "<S>"
EOS_TOKEN = "</S>"

# Raw ids (before the +1 shift), AllenNLP's ELMoCharacterMapper class attributes.
BOS_CHAR = 256             # beginning_of_sentence_character
EOS_CHAR = 257             # end_of_sentence_character
BOW_CHAR = 258             # beginning_of_word_character
EOW_CHAR = 259             # end_of_word_character
PAD_CHAR = 260             # padding_character (inside a token; it has a learned embedding)

# Cached ids are stored as int16 bytes so a batch is one b"".join + np.frombuffer, not N small arrays.
_ID_DTYPE = np.dtype("<i2")


def _shifted(raw: List[int]) -> List[int]:
    return [c + 1 for c in raw]


def _special(char: int) -> List[int]:
    raw = [PAD_CHAR] * MAX_CHARS
    raw[0], raw[1], raw[2] = BOW_CHAR, char, EOW_CHAR
    return _shifted(raw)


BOS_CHARS: List[int] = _special(BOS_CHAR)   # the +1-shifted ids of "<S>"
EOS_CHARS: List[int] = _special(EOS_CHAR)   # the +1-shifted ids of "</S>"


def _raw_ids(token: str) -> List[int]:
    if token == BOS_TOKEN:
        return [c - 1 for c in BOS_CHARS]
    if token == EOS_TOKEN:
        return [c - 1 for c in EOS_CHARS]
    # "ignore" drops lone surrogates; the cut is in bytes and may split a multi-byte character,
    # exactly as AllenNLP and bilm-tf do.
    encoded = token.encode("utf-8", "ignore")[:MAX_TOKEN_BYTES]
    raw = [PAD_CHAR] * MAX_CHARS
    raw[0] = BOW_CHAR
    raw[1:len(encoded) + 1] = encoded
    raw[len(encoded) + 1] = EOW_CHAR
    return raw


# Bounded: a corpus has a long tail of distinct tokens. 2**17 entries (value + bookkeeping ~220 bytes,
# plus the key) is ~30-40 MB when full and covers nearly all running text of a Zipfian corpus.
@functools.lru_cache(maxsize=1 << 17)
def _token_bytes(token: str) -> bytes:
    """The 50 shifted ids of ``token`` as little-endian int16 bytes (100 bytes)."""
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {type(token).__name__}")
    return np.asarray(_shifted(_raw_ids(token)), dtype=_ID_DTYPE).tobytes()


def token_to_ids(token: str) -> List[int]:
    """The 50 +1-shifted character ids of one token (values 1..261)."""
    if not isinstance(token, str):  # checked here too: an unhashable token would fail inside the cache
        raise TypeError(f"token must be a str, got {type(token).__name__}")
    return np.frombuffer(_token_bytes(token), dtype=_ID_DTYPE).tolist()


def _check_sentences(sentences: Sequence[Sequence[str]]) -> None:
    if not isinstance(sentences, (list, tuple)):
        raise TypeError(f"sentences must be a list of lists of str, got {type(sentences).__name__}")
    for b, sentence in enumerate(sentences):
        if not isinstance(sentence, (list, tuple)):
            raise TypeError(
                f"sentences must be a list of lists of str, but sentences[{b}] is "
                f"{type(sentence).__name__}" + (" (pass [sentence.split()], not a bare string)"
                                                 if isinstance(sentence, str) else ""))


def batch_to_ids(sentences: List[List[str]]) -> torch.Tensor:
    """Character ids for a batch of tokenized sentences, without sentence boundaries (spec §3.2).

    sentences: B lists of tokens (str). Returns a LongTensor (B, T, 50) with T = longest sentence;
    shorter sentences are right-padded with all-zero tokens. An empty batch gives (0, 0, 50);
    a batch of only empty sentences gives (B, 0, 50).
    """
    _check_sentences(sentences)
    lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
    batch, steps = len(sentences), int(lengths.max(initial=0))
    out = np.zeros((batch, steps, MAX_CHARS), dtype=np.int64)
    if steps == 0:
        return torch.from_numpy(out)
    chunks: List[bytes] = []
    try:
        for sentence in sentences:
            chunks.extend(map(_token_bytes, sentence))
    except TypeError:
        # The fast loop cannot say where; look again (a non-str or unhashable token).
        for b, sentence in enumerate(sentences):
            for t, token in enumerate(sentence):
                if not isinstance(token, str):
                    raise TypeError(f"sentences must be a list of lists of str, but sentences[{b}][{t}] "
                                    f"is {type(token).__name__}") from None
        raise
    ids = np.frombuffer(b"".join(chunks), dtype=_ID_DTYPE).reshape(-1, MAX_CHARS)
    # Boolean-mask assignment fills (b, t) in row-major order, which is the order chunks were built in.
    out[np.arange(steps) < lengths[:, None]] = ids
    return torch.from_numpy(out)
