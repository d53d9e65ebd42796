"""elmo_fast.chars against spec §3.1 test vectors and a line-by-line copy of AllenNLP's ELMoCharacterMapper."""
import random

import pytest
import torch

from elmo_fast import chars

PAD = [261]  # the +1-shifted in-token pad char


def allennlp_word_to_char_ids(word):
    """AllenNLP 0.9 ELMoCharacterMapper.convert_word_to_char_ids, transcribed as the oracle."""
    if word == "<S>":
        char_ids = [258, 256, 259] + [260] * 47
    elif word == "</S>":
        char_ids = [258, 257, 259] + [260] * 47
    else:
        word_encoded = word.encode("utf-8", "ignore")[:48]
        char_ids = [260] * 50
        char_ids[0] = 258
        for k, chr_id in enumerate(word_encoded, start=1):
            char_ids[k] = chr_id
        char_ids[len(word_encoded) + 1] = 259
    return [c + 1 for c in char_ids]


@pytest.mark.parametrize("token, expected", [
    ("<S>", [259, 257, 260] + PAD * 47),
    ("</S>", [259, 258, 260] + PAD * 47),
    ("Second", [259, 84, 102, 100, 112, 111, 101, 260] + PAD * 42),
    (".", [259, 47, 260] + PAD * 47),
    (chr(256) + "t", [259, 197, 129, 117, 260] + PAD * 45),
])
def test_spec_vectors(token, expected):
    assert chars.token_to_ids(token) == expected
    assert chars.batch_to_ids([[token]])[0, 0].tolist() == expected


def test_padding_token_is_all_zeros():
    ids = chars.batch_to_ids([["a", "b"], ["c"]])
    assert ids[1, 1].tolist() == [0] * 50
    assert ids[1, 0].tolist() == chars.token_to_ids("c")


def test_constants():
    assert chars.MAX_CHARS == 50
    assert (chars.BOS_CHAR, chars.EOS_CHAR, chars.BOW_CHAR, chars.EOW_CHAR, chars.PAD_CHAR) == (256, 257, 258, 259, 260)
    assert chars.BOS_CHARS == [259, 257, 260] + PAD * 47
    assert chars.EOS_CHARS == [259, 258, 260] + PAD * 47
    assert len(chars.BOS_CHARS) == len(chars.EOS_CHARS) == 50


def test_non_bmp_emoji():
    # U+1F600 is F0 9F 98 80 in UTF-8: four byte ids, not one surrogate pair.
    assert chars.token_to_ids("a\U0001F600") == [259, 98, 241, 160, 153, 129, 260] + PAD * 43


def test_lone_surrogate_is_dropped():
    assert chars.token_to_ids("a\ud800b") == chars.token_to_ids("ab")
    assert chars.token_to_ids("\udfff") == chars.token_to_ids("")


def test_empty_string_token():
    assert chars.token_to_ids("") == [259, 260] + PAD * 48
    # An empty-string token is a real token: its row is not the all-zero padding row.
    assert chars.batch_to_ids([[""]])[0, 0].tolist() == [259, 260] + PAD * 48


def test_long_word_truncated_to_48_bytes():
    full = [259] + [98] * 48 + [260]   # no in-token pad char left
    assert chars.token_to_ids("a" * 60) == full
    assert chars.token_to_ids("a" * 48) == full
    assert chars.token_to_ids("a" * 49) == full
    assert chars.token_to_ids("a" * 47) == [259] + [98] * 47 + [260, 261]


def test_truncation_splits_multibyte_char():
    # "é" is C3 A9; at bytes 48-49 only C3 survives the 48-byte cut.
    assert chars.token_to_ids("a" * 47 + "é") == [259] + [98] * 47 + [0xC3 + 1, 260]
    assert chars.token_to_ids("a" * 46 + "é") == [259] + [98] * 46 + [0xC3 + 1, 0xA9 + 1, 260]
    # 12 four-byte chars = 48 bytes exactly; a 13th is dropped whole.
    emoji = "\U0001F600"
    assert chars.token_to_ids(emoji * 13) == chars.token_to_ids(emoji * 12)


def test_boundary_strings_are_special_only_when_exact():
    assert chars.token_to_ids("<S>") == chars.BOS_CHARS
    assert chars.token_to_ids("</S>") == chars.EOS_CHARS
    assert chars.token_to_ids(" <S>") == allennlp_word_to_char_ids(" <S>") != chars.BOS_CHARS
    assert chars.token_to_ids("<s>") == [259, 61, 116, 63, 260] + PAD * 45


def random_token(rng):
    kind = rng.random()
    if kind < 0.3:
        return "".join(rng.choice("abcXYZ.,'-0") for _ in range(rng.randint(0, 12)))
    if kind < 0.4:
        return rng.choice(["<S>", "</S>", "", " ", "<S", "S>"])
    # Any code point, surrogates included, and lengths across the 48-byte cut.
    return "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xFFFF),
                                   rng.randint(0x10000, 0x10FFFF)])) for _ in range(rng.randint(0, 30)))


@pytest.mark.parametrize("seed", range(3))
def test_matches_allennlp_mapper_on_random_unicode(seed):
    rng = random.Random(seed)
    sentences = [[random_token(rng) for _ in range(rng.randint(0, 9))] for _ in range(rng.randint(1, 12))]
    ids = chars.batch_to_ids(sentences)
    assert ids.dtype == torch.int64
    assert ids.shape == (len(sentences), max(len(s) for s in sentences), 50)
    for b, sentence in enumerate(sentences):
        for t in range(ids.shape[1]):
            expected = allennlp_word_to_char_ids(sentence[t]) if t < len(sentence) else [0] * 50
            assert ids[b, t].tolist() == expected, (b, t, sentence[t:t + 1])


def test_ragged_batch_padding():
    ids = chars.batch_to_ids([["a"], ["b", "c", "d"], [], ["e", "f"]])
    assert ids.shape == (4, 3, 50)
    mask = (ids > 0).any(-1)
    assert mask.tolist() == [[True, False, False], [True, True, True], [False] * 3, [True, True, False]]
    assert ids[3, 1].tolist() == chars.token_to_ids("f")


def test_empty_batches():
    empty = chars.batch_to_ids([])
    assert empty.shape == (0, 0, 50) and empty.dtype == torch.int64
    only_empty = chars.batch_to_ids([[], [], []])
    assert only_empty.shape == (3, 0, 50) and only_empty.dtype == torch.int64


def test_output_is_fresh_and_writable():
    # The per-token cache must not be aliased by the returned tensor.
    first = chars.batch_to_ids([["cache", "me"]])
    first.zero_()
    assert chars.batch_to_ids([["cache", "me"]])[0, 0].tolist() == chars.token_to_ids("cache")


def test_tuples_accepted():
    assert torch.equal(chars.batch_to_ids((("a", "b"),)), chars.batch_to_ids([["a", "b"]]))


@pytest.mark.parametrize("bad", [
    "a bare string",
    ["a", "list", "of", "str"],
    [["ok"], "not a list"],
    [["a", 1]],
    [["a", None]],
    [["a"], [["nested"]]],
    None,
    42,
    [[b"bytes"]],
])
def test_bad_inputs_raise_type_error_naming_sentences(bad):
    with pytest.raises(TypeError, match="sentences"):
        chars.batch_to_ids(bad)


def test_bad_token_to_ids():
    with pytest.raises(TypeError, match="token"):
        chars.token_to_ids(b"bytes")
    with pytest.raises(TypeError, match="token"):
        chars.token_to_ids(["a"])
