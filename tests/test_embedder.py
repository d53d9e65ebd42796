"""ElmoEmbedder and embed_file (spec §6.5) against ElmoBiLm run directly, on tiny synthetic models."""
import json
import random

import h5py
import numpy as np
import pytest
import torch

from elmo_fast import corpus
from elmo_fast.chars import batch_to_ids
from elmo_fast.elmo import ElmoBiLm, remove_sentence_boundaries
from elmo_fast.embed_io import ConfigurationError, OutputFile
from elmo_fast.embedder import ElmoEmbedder
from elmo_fast.synthetic import write_elmo_files

TOL_REORDER = dict(rtol=1e-5, atol=1e-5)   # float32 GEMMs round differently for other batch sizes (not bitwise)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_elmo_files(tmp_path_factory.mktemp("model"))


def make_lines(n, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "über", "naïve", "x", "hello", "world", ",", "."]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def direct(model, sentences, batch_size, stateful=True):
    """(L+1, len, D) per sentence from one ElmoBiLm run on consecutive batches in order."""
    bilm = ElmoBiLm(*model, stateful=stateful)
    out = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            batch = sentences[start:start + batch_size]
            result = bilm(batch_to_ids(batch))
            layers = [remove_sentence_boundaries(a, result["mask"])[0] for a in result["activations"]]
            stacked = torch.stack(layers, dim=1).numpy()
            out.extend(stacked[i, :, :len(s)] for i, s in enumerate(batch))
    return out


def read(path):
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f.keys() if k != "sentence_to_index"}
        index = json.loads(f["sentence_to_index"][0]) if "sentence_to_index" in f else None
        return data, index, dict(f.attrs)


def test_embed_sentences_match_stateful_bilm(model):
    sentences = [line.split() for line in make_lines(11)]
    expected = direct(model, sentences, batch_size=4)
    embedder = ElmoEmbedder(*model)
    got = list(embedder.embed_sentences(sentences, batch_size=4))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == np.float32 and g.shape == e.shape
        np.testing.assert_array_equal(g, e)
    # the state carries on: one more sentence differs from a fresh embedder's
    assert not np.array_equal(embedder.embed_sentence(sentences[0]), ElmoEmbedder(*model).embed_sentence(sentences[0]))


def test_empty_sentence_mirrors_allennlp(model):
    embedder = ElmoEmbedder(*model)
    empty = embedder.embed_sentence([])
    assert empty.shape == (3, 0, 1024) and empty.dtype == np.float64   # AllenNLP hard-codes this
    mixed = embedder.embed_batch([[], ["a", "b"]])
    assert mixed[0].shape == (3, 0, 1024) and mixed[1].shape == (3, 2, 16)


@pytest.mark.parametrize("output_format", ["all", "top", "average"])
def test_embed_file_layout(model, tmp_path, output_format):
    lines = make_lines(9) + ["the cat"]        # a duplicate sentence: the index keeps the last key
    lines[3] = "  the cat  "
    source = write_lines(tmp_path / "in.txt", lines)
    expected = direct(model, [line.split() for line in lines], batch_size=4)
    ElmoEmbedder(*model).embed_file(str(source), str(tmp_path / "out.hdf5"), output_format, batch_size=4)
    data, index, attrs = read(tmp_path / "out.hdf5")
    assert attrs == {}
    assert sorted(data) == sorted(str(i) for i in range(len(lines)))
    for i, e in enumerate(expected):
        want = {"all": e, "top": e[-1], "average": np.average(e, axis=0)}[output_format]
        assert data[str(i)].dtype == np.float32
        np.testing.assert_array_equal(data[str(i)], want)
    stripped = [line.strip() for line in lines]
    want_index = {}
    for i, s in enumerate(stripped):
        want_index[s] = str(i)
    assert index == want_index and list(index) == list(want_index)


def test_sentence_keys_and_forget(model, tmp_path):
    lines = make_lines(5, seed=1)
    lines = list(dict.fromkeys(lines))
    source = write_lines(tmp_path / "in.txt", lines)
    embedder = ElmoEmbedder(*model, stateful=False)
    embedder.embed_file(str(source), str(tmp_path / "keys.hdf5"), "top", use_sentence_keys=True)
    data, index, _ = read(tmp_path / "keys.hdf5")
    assert index is None and sorted(data) == sorted(lines)
    embedder.embed_file(str(source), str(tmp_path / "forget.hdf5"), "top", forget_sentences=True)
    data, index, _ = read(tmp_path / "forget.hdf5")
    assert index is None and sorted(data) == [str(i) for i in range(len(lines))]
    write_lines(tmp_path / "dup.txt", ["a b", "c", "a b"])
    with pytest.raises(ConfigurationError, match="Key already exists"):
        embedder.embed_file(str(tmp_path / "dup.txt"), str(tmp_path / "dup.hdf5"), use_sentence_keys=True)


def test_bad_inputs(model, tmp_path):
    embedder = ElmoEmbedder(*model)
    (tmp_path / "blank.txt").write_text("a b\n\nc\n   \nd\n")
    with pytest.raises(ConfigurationError, match=r"empty lines at indexes \[1, 3\]"):
        embedder.embed_file(str(tmp_path / "blank.txt"), str(tmp_path / "o1.hdf5"))
    (tmp_path / "bad.txt").write_bytes(b"fine\nstill fine\nbad \xff byte\n")
    with pytest.raises(ConfigurationError, match=r"line index 2 \(line 3 of the file\) is not valid UTF-8"):
        embedder.embed_file(str(tmp_path / "bad.txt"), str(tmp_path / "o2.hdf5"))
    embedder.embed_file(str(tmp_path / "bad.txt"), str(tmp_path / "o2.hdf5"), encoding_errors="replace")
    _, index, _ = read(tmp_path / "o2.hdf5")
    assert "bad \ufffd byte" in index
    with pytest.raises(ConfigurationError, match="does not exist"):
        embedder.embed_file(str(tmp_path / "bad.txt"), str(tmp_path / "nodir" / "o.hdf5"))
    (tmp_path / "exists.hdf5").write_bytes(b"")
    with pytest.raises(ConfigurationError, match="already exists"):
        corpus.prepare(str(tmp_path / "bad.txt"), str(tmp_path / "exists.hdf5"), overwrite=False)
    with pytest.raises(ValueError, match="output_format"):
        embedder.embed_file(str(tmp_path / "bad.txt"), str(tmp_path / "o3.hdf5"), "mean")


def test_empty_input_gives_valid_file(model, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    ElmoEmbedder(*model).embed_file(str(tmp_path / "empty.txt"), str(tmp_path / "out.hdf5"))
    data, index, attrs = read(tmp_path / "out.hdf5")
    assert data == {} and index == {} and attrs == {}


def test_crlf_and_file_objects(model, tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"a b\r\nc d\r\n")
    embedder = ElmoEmbedder(*model, stateful=False)
    embedder.embed_file(str(tmp_path / "crlf.txt"), str(tmp_path / "a.hdf5"))
    with open(tmp_path / "crlf.txt", "r", encoding="utf-8") as text:
        embedder.embed_file(text, str(tmp_path / "b.hdf5"))
    (data_a, index_a, _), (data_b, index_b, _) = read(tmp_path / "a.hdf5"), read(tmp_path / "b.hdf5")
    assert index_a == index_b == {"a b": "0", "c d": "1"}
    for key in data_a:
        np.testing.assert_array_equal(data_a[key], data_b[key])


def test_stateless_sorted_equals_unsorted(model, tmp_path):
    lines = make_lines(40, seed=2)
    source = write_lines(tmp_path / "in.txt", lines)
    embedder = ElmoEmbedder(*model, stateful=False)
    embedder.embed_file(str(source), str(tmp_path / "plain.hdf5"), batch_size=5, sort=False)
    embedder.embed_file(str(source), str(tmp_path / "sorted.hdf5"), batch_size=5, max_tokens_per_batch=40,
                        sort=True)
    corpus.embed_corpus(embedder, str(source), str(tmp_path / "window.hdf5"), batch_size=3, window=7, overwrite=True)
    expected = direct(model, [line.split() for line in lines], batch_size=5, stateful=False)
    plain, index_plain, _ = read(tmp_path / "plain.hdf5")
    for name in ("sorted.hdf5", "window.hdf5"):
        data, index, _ = read(tmp_path / name)
        assert index == index_plain and sorted(data) == sorted(plain)
        for key in plain:
            assert data[key].shape == plain[key].shape
            np.testing.assert_allclose(data[key], plain[key], **TOL_REORDER)
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(plain[str(i)], e)


def _interrupt_after(monkeypatch, batches):
    calls = {"n": 0}
    original = OutputFile.write_batch

    def write_batch(self, items, state=None):
        if items and calls["n"] == batches:
            raise KeyboardInterrupt("simulated")
        if items:
            calls["n"] += 1
        return original(self, items, state)

    monkeypatch.setattr(OutputFile, "write_batch", write_batch)


@pytest.mark.parametrize("state", ["carry", "zero"])
def test_resume_after_interruption_equals_uninterrupted(model, tmp_path, monkeypatch, state):
    lines = make_lines(23, seed=3)
    source = write_lines(tmp_path / "in.txt", lines)
    ElmoEmbedder(*model, state=state).embed_file(str(source), str(tmp_path / "full.hdf5"), batch_size=4)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            ElmoEmbedder(*model, state=state).embed_file(str(source), str(tmp_path / "part.hdf5"), batch_size=4)
    with h5py.File(tmp_path / "part.hdf5", "r") as f:        # valid, with its progress records
        assert f["_elmo_fast_done"].shape == (12,) and "elmo_fast_job" in f.attrs
    with pytest.raises(ConfigurationError, match="different settings"):
        ElmoEmbedder(*model, state=state).embed_file(str(source), str(tmp_path / "part.hdf5"), "top", batch_size=4,
                                                     resume=True)
    summary = ElmoEmbedder(*model, state=state).embed_file(str(source), str(tmp_path / "part.hdf5"), batch_size=4,
                                                           resume=True)
    assert summary["skipped"] == 12 and summary["embedded"] == 11
    full, index_full, attrs_full = read(tmp_path / "full.hdf5")
    part, index_part, attrs_part = read(tmp_path / "part.hdf5")
    assert attrs_part == attrs_full == {} and index_part == index_full and sorted(part) == sorted(full)
    for key in full:
        np.testing.assert_array_equal(part[key], full[key])
    again = ElmoEmbedder(*model, state=state).embed_file(str(source), str(tmp_path / "part.hdf5"), resume=True)
    assert again["complete_before"]


def test_warm_state_is_order_independent_and_deterministic(model):
    sentences = [line.split() for line in make_lines(8, seed=4)]
    warm = ElmoEmbedder(*model, state="warm")
    alone = [warm.embed_sentence(s) for s in sentences]
    batched = warm.embed_batch(sentences[::-1])[::-1]
    again = ElmoEmbedder(*model, state="warm").embed_batch(sentences)
    zero = ElmoEmbedder(*model, stateful=False).embed_batch(sentences)
    for a, b, c, z in zip(alone, batched, again, zero):   # (alone vs batched: other batch sizes, not bitwise)
        np.testing.assert_allclose(a, b, **TOL_REORDER)
        np.testing.assert_allclose(a, c, **TOL_REORDER)
        assert np.abs(a[1:] - z[1:]).max() > 1e-3          # the warm state is not the zero state
        np.testing.assert_allclose(a[0], z[0], **TOL_REORDER)   # layer 0 (char CNN) has no state


def test_device_and_dtype_errors(model):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ElmoEmbedder(*model, cuda_device=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ElmoEmbedder(*model, dtype="int8")
    with pytest.raises(ValueError, match="state must be one of"):
        ElmoEmbedder(*model, state="hot")
    for dtype in ("float16", "bfloat16"):
        try:
            embedder = ElmoEmbedder(*model, dtype=dtype)
        except ValueError as e:
            assert f"dtype {dtype} is not supported on cpu" in str(e)
        else:
            assert embedder.embed_sentence(["a"]).dtype == np.float32
    e64 = ElmoEmbedder(*model, dtype="float64", stateful=False)
    e32 = ElmoEmbedder(*model, stateful=False)
    np.testing.assert_allclose(e64.embed_sentence(["a", "b"]), e32.embed_sentence(["a", "b"]), rtol=1e-4, atol=1e-4)
