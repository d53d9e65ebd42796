"""FASTA input (SeqVec-style protein embedding): ElmoEmbedder.embed_fasta and `elmo-fast embed --fasta`, the
10 000-residue case (memory linear in length), and the chunked character encoder."""
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from elmo_fast import cli
from elmo_fast import elmo as elmo_module
from elmo_fast.chars import batch_to_ids
from elmo_fast.elmo import ElmoCharacterEncoder
from elmo_fast.embed_io import ConfigurationError
from elmo_fast.embedder import ElmoEmbedder
from elmo_fast.synthetic import write_elmo_files
from util import interrupt_nth_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Other batch compositions: float32 rounding differs (not bitwise), compounded over up to 30 steps.
TOL_REORDER = dict(rtol=1e-4, atol=1e-4)
RESIDUES = "ACDEFGHIKLMNPQRSTVWYXBZU"

FASTA = """\
>sp|P1|FIRST some description
MKTAYIAKQR
QISFVKSHFS

RQ
>P2
acdefg
>EMPTY empty record
>P3 third
MVLSPADKTNVKAAW
"""
RECORDS = {"sp|P1|FIRST": "MKTAYIAKQRQISFVKSHFSRQ", "P2": "acdefg", "EMPTY": "", "P3": "MVLSPADKTNVKAAW"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_elmo_files(tmp_path_factory.mktemp("model"))


def read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}, dict(f.attrs)


def random_fasta(path, n, seed=0, width=7):
    rng = np.random.default_rng(seed)
    records = {}
    with open(path, "w") as f:
        for i in range(n):
            seq = "".join(rng.choice(list(RESIDUES), int(rng.integers(1, 30))))
            records[f"prot{i}"] = seq
            f.write(f">prot{i} random\n" + "".join(seq[k:k + width] + "\n" for k in range(0, len(seq), width)))
    return records


@pytest.mark.parametrize("output_format", ["all", "top", "average"])
def test_fasta_keys_multiline_empty_and_values(model, tmp_path, output_format):
    (tmp_path / "in.fasta").write_text(FASTA)
    embedder = ElmoEmbedder(*model, stateful=False)
    summary = embedder.embed_fasta(str(tmp_path / "in.fasta"), str(tmp_path / "out.hdf5"), output_format,
                                   max_tokens_per_batch=40)
    assert summary["embedded"] == 4 and summary["tokens"] == sum(map(len, RECORDS.values()))
    data, attrs = read(tmp_path / "out.hdf5")
    assert attrs == {} and sorted(data) == sorted(RECORDS)            # keys = ids; no sentence_to_index
    for name, seq in RECORDS.items():
        want = embedder.embed_sentence(list(seq))                        # (3, len, D); empty: (3, 0, 1024)
        want = {"all": want, "top": want[-1], "average": want.mean(0)}[output_format]
        assert data[name].shape == want.shape and data[name].dtype == np.float32
        np.testing.assert_allclose(data[name], want, **TOL_REORDER)


def test_fasta_stateful_file_order_matches_embed_sentences(model, tmp_path):
    records = random_fasta(tmp_path / "in.fasta", 11, seed=1)
    ElmoEmbedder(*model).embed_fasta(str(tmp_path / "in.fasta"), str(tmp_path / "out.hdf5"), batch_size=4)
    want = list(ElmoEmbedder(*model).embed_sentences([list(s) for s in records.values()], batch_size=4))
    data, _ = read(tmp_path / "out.hdf5")
    for (name, _), w in zip(records.items(), want):
        np.testing.assert_array_equal(data[name], w.astype(np.float32))


def test_fasta_errors(model, tmp_path):
    embedder = ElmoEmbedder(*model, stateful=False)
    cases = {
        ">a\nMK\n>b x\nAA\n>a again\nCC\n>b\nD\n>c\nE\n": r"2 FASTA id\(s\) occur more than once: 'a' \(header lines "
                                                          r"1, 5\); 'b' \(header lines 3, 7\)",
        "MKV\n>a\nMK\n": "line 1: sequence data before the first '>' header",
        ">a\nMK\n>  \nAA\n": "line 3: a FASTA header without an id",
    }
    for i, (text, match) in enumerate(cases.items()):
        (tmp_path / f"bad{i}.fasta").write_text(text)
        with pytest.raises(ConfigurationError, match=match):
            embedder.embed_fasta(str(tmp_path / f"bad{i}.fasta"), str(tmp_path / f"o{i}.hdf5"))
        assert not (tmp_path / f"o{i}.hdf5").exists()       # found by the prescan, before any computation
    # a stream (not seekable: no prescan) stops at the first duplicate
    read_end, write_end = os.pipe()
    os.write(write_end, b">a\nMK\n>a\nCC\n")
    os.close(write_end)
    with open(read_end, "rb") as stream, pytest.raises(ConfigurationError, match="duplicate FASTA id 'a'"):
        embedder.embed_fasta(stream, str(tmp_path / "stream.hdf5"))
    with pytest.raises(ValueError, match="keyed by the sequence ids"):
        from elmo_fast.corpus import prepare

        prepare(str(tmp_path / "bad0.fasta"), str(tmp_path / "k.hdf5"), use_sentence_keys=True, input_format="fasta")


def test_cli_fasta_stateless_resume_equals_api(model, tmp_path, monkeypatch):
    random_fasta(tmp_path / "in.fasta", 25, seed=2)
    ElmoEmbedder(*model, stateful=False).embed_fasta(str(tmp_path / "in.fasta"), str(tmp_path / "api.hdf5"), "top",
                                                     batch_size=4, sort=False)
    undo_interrupt = interrupt_nth_write(monkeypatch, 3)
    common = ["embed", str(tmp_path / "in.fasta"), str(tmp_path / "cli.hdf5"), "--options-file", model[0],
              "--weight-file", model[1], "--fasta", "--top", "--stateless", "--batch-size", "4",
              "--max-tokens-per-batch", "60", "--no-progress"]
    assert cli.main(common) == 130
    undo_interrupt()
    assert cli.main(common + ["--resume"]) == 0
    api, _ = read(tmp_path / "api.hdf5")
    got, attrs = read(tmp_path / "cli.hdf5")
    assert attrs == {} and sorted(got) == sorted(api)
    for key in api:
        np.testing.assert_allclose(got[key], api[key], **TOL_REORDER)
    assert cli.main(common[:2] + [str(tmp_path / "x.hdf5")] + common[3:] + ["--use-sentence-keys"]) == 2


def test_encoder_chunks_give_the_same_numbers(model, monkeypatch):
    # Note [encoder chunks]: more distinct tokens than a chunk, under no_grad, equal to one call.
    encoder = ElmoCharacterEncoder(*model)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(1, 12)))) for _ in range(700)]
    ids = batch_to_ids([words[i:i + 70] for i in range(0, 700, 70)])          # (10, 70, 50): ~700 distinct rows
    with torch.no_grad():
        whole = encoder(ids)["token_embedding"]
        monkeypatch.setattr(elmo_module, "ENCODE_CHUNK_ROWS", 64)
        chunked = encoder(ids)["token_embedding"]
    # Row-wise math, so equal up to float rounding: a 64-row chunk may take another GEMM path than
    # the whole (the CPU GEMM layer's size policy: mm vs packed oneDNN), which rounds differently.
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


LONG_SCRIPT = textwrap.dedent("""
    import resource, sys, numpy as np, torch, h5py
    from elmo_fast.embedder import ElmoEmbedder
    from elmo_fast.synthetic import write_elmo_files
    torch.set_num_threads(1)
    d = sys.argv[1]
    opts, weights = write_elmo_files(d, dim=1024, projection_dim=64)
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 10000))
    with open(d + "/long.fasta", "w") as f:
        f.write(">short\\nMKV\\n>long 10k residues\\n" + "".join(seq[i:i + 60] + "\\n" for i in range(0, 10000, 60)))
    e = ElmoEmbedder(opts, weights, stateful=False)
    e.embed_sentence(list(seq[:50]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    e.embed_fasta(d + "/long.fasta", d + "/long.hdf5", "all", max_tokens_per_batch=4000)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with h5py.File(d + "/long.hdf5", "r") as f:
        print(sorted(f.keys()), f["long"].shape, f["short"].shape, bool(np.isfinite(f["long"][()]).all()))
    print("PEAK_GROWTH_MIB", (after - before) / 1024)
""")


def test_fasta_10000_residues_memory_linear(tmp_path):
    # n = 1024 cells: one (T, 4n) float32 gates buffer would be 10 002 x 4096 x 4 B = 156 MiB per layer and
    # direction; the chunked input GEMM needs 16 MiB. Peak RSS growth measured in a fresh process.
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LONG_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "['long', 'short'] (3, 10000, 128) (3, 3, 128) True"
    growth = float(lines[1].split()[1])
    print(f"peak RSS growth for a 10 000-residue sequence (n=1024, P=64): {growth:.1f} MiB")
    gates_buffer_mib = 10002 * 4 * 1024 * 4 / 2**20
    assert growth < 0.5 * gates_buffer_mib, growth


@pytest.mark.slow
def test_torchrun_two_processes_fasta_equals_single(model, tmp_path):
    records = random_fasta(tmp_path / "in.fasta", 13, seed=5)
    with open(tmp_path / "in.fasta", "a") as f:
        f.write(">empty\n")
    ElmoEmbedder(*model, stateful=False).embed_fasta(str(tmp_path / "in.fasta"), str(tmp_path / "one.hdf5"), "all",
                                                     batch_size=3, sort=False)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "elmo_fast.cli", "embed",
                           str(tmp_path / "in.fasta"), str(tmp_path / "two.hdf5"), "--options-file", model[0],
                           "--weight-file", model[1], "--fasta", "--all", "--stateless", "--batch-size", "3",
                           "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    one, _ = read(tmp_path / "one.hdf5")
    two, attrs = read(tmp_path / "two.hdf5")
    assert attrs == {} and sorted(two) == sorted(one) == sorted([*records, "empty"])
    assert two["empty"].shape == (3, 0, 1024)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], **TOL_REORDER)
