"""`elmo-fast embed`: in-process for the options and errors, a subprocess for stdin and a real interruption,
torchrun with 2 CPU processes (slow)."""
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from elmo_fast import cli
from elmo_fast.embedder import ElmoEmbedder
from elmo_fast.synthetic import write_elmo_files
from util import interrupt_nth_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL_REORDER = dict(rtol=1e-5, atol=1e-5)   # other batch compositions: float32 rounding differs (not bitwise)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_elmo_files(tmp_path_factory.mktemp("model"))


def lines_file(path, n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "naïve", "x", ",", "."]
    path.write_text("".join(" ".join(rng.choice(words, rng.integers(1, 10))) + "\n" for _ in range(n)),
                    encoding="utf-8")
    return path


def args(model, source, output, *extra):
    return ["embed", str(source), str(output), "--options-file", model[0], "--weight-file", model[1], *extra]


def contents(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}, dict(f.attrs)


def assert_same(a, b, exact=True):
    (da, attrs_a), (db, attrs_b) = contents(a), contents(b)
    assert attrs_a == attrs_b == {} and sorted(da) == sorted(db)
    for key in da:
        if key == "sentence_to_index" or exact:
            np.testing.assert_array_equal(da[key], db[key])
        else:
            np.testing.assert_allclose(da[key], db[key], **TOL_REORDER)


def env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def test_cli_matches_api_and_refuses_to_overwrite(model, tmp_path, capsys):
    source = lines_file(tmp_path / "in.txt", 13)
    ElmoEmbedder(*model).embed_file(str(source), str(tmp_path / "api.hdf5"), "average", batch_size=4)
    assert cli.main(args(model, source, tmp_path / "cli.hdf5", "--average", "--batch-size", "4")) == 0
    assert "sentences/s" in capsys.readouterr().err
    assert_same(tmp_path / "api.hdf5", tmp_path / "cli.hdf5")
    assert cli.main(args(model, source, tmp_path / "cli.hdf5", "--top")) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(args(model, source, tmp_path / "cli.hdf5", "--average", "--batch-size", "4", "--overwrite",
                         "--no-progress")) == 0
    assert_same(tmp_path / "api.hdf5", tmp_path / "cli.hdf5")


def test_cli_errors_before_computation(model, tmp_path, capsys):
    source = lines_file(tmp_path / "in.txt", 3)
    assert cli.main(args(model, source, tmp_path / "missing" / "o.hdf5", "--all")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xc3(\n")
    assert cli.main(args(model, tmp_path / "bad.txt", tmp_path / "o.hdf5", "--all")) == 2
    assert "line index 1 (line 2 of the file) is not valid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "o.hdf5").exists()
    assert cli.main(args(model, tmp_path / "bad.txt", tmp_path / "o.hdf5", "--all", "--encoding-errors",
                         "replace")) == 0
    assert cli.main(args(model, source, tmp_path / "o16.hdf5", "--all", "--dtype", "float16")) in (0, 2)
    err = capsys.readouterr().err
    assert "sentences/s" in err or "dtype float16 is not supported" in err
    with pytest.raises(SystemExit):
        cli.main(args(model, source, tmp_path / "o2.hdf5", "--all", "--top"))
    capsys.readouterr()
    for threads in ("0", "-1", "two"):  # 0 once meant "torch's default" without a word
        with pytest.raises(SystemExit):
            cli.main(args(model, source, tmp_path / "o3.hdf5", "--all", "--threads", threads))
        assert "argument --threads: expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o3.hdf5").exists()


def test_cli_stateless_sorted_equals_api_and_resume(model, tmp_path, monkeypatch):
    source = lines_file(tmp_path / "in.txt", 30, seed=1)
    ElmoEmbedder(*model, stateful=False).embed_file(str(source), str(tmp_path / "api.hdf5"), "top", batch_size=4,
                                                    sort=False)
    undo_interrupt = interrupt_nth_write(monkeypatch, 3)
    out = tmp_path / "cli.hdf5"
    common = ("--top", "--stateless", "--batch-size", "4", "--max-tokens-per-batch", "30", "--sort-window", "9")
    assert cli.main(args(model, source, out, *common)) == 130
    undo_interrupt()
    assert cli.main(args(model, source, out, *common)) == 2                 # exists: needs --resume
    assert cli.main(args(model, source, out, *common, "--resume")) == 0
    assert_same(tmp_path / "api.hdf5", out, exact=False)


def test_stdin_subprocess(model, tmp_path):
    source = lines_file(tmp_path / "in.txt", 6, seed=2)
    ElmoEmbedder(*model).embed_file(str(source), str(tmp_path / "api.hdf5"), "all")
    with open(source, "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "elmo_fast.cli", *args(model, "-", tmp_path / "out.hdf5", "--all")],
                              stdin=stdin, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr
    assert_same(tmp_path / "api.hdf5", tmp_path / "out.hdf5", exact=False)   # other thread count: rounding


def test_sigterm_then_resume_equals_uninterrupted_stateful(model, tmp_path):
    source = lines_file(tmp_path / "in.txt", 120, seed=3)
    out = tmp_path / "out.hdf5"
    cmd = [sys.executable, "-m", "elmo_fast.cli", *args(model, source, out, "--all", "--batch-size", "2")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env(), cwd=tmp_path)
    buffer = b""
    deadline = time.time() + 120
    while time.time() < deadline:   # wait until some batches are written (tqdm shows a count > 0)
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        buffer += chunk
        if any(f" {n}/120 [".encode() in buffer for n in range(6, 90)):
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, (buffer + rest).decode(errors="replace")
    with h5py.File(out, "r") as f:
        done = f["_elmo_fast_done"].shape[0]
    assert 0 < done < 120
    assert cli.main(args(model, source, out, "--all", "--batch-size", "2", "--resume", "--no-progress")) == 0
    ElmoEmbedder(*model).embed_file(str(source), str(tmp_path / "api.hdf5"), "all", batch_size=2)
    assert_same(tmp_path / "api.hdf5", out, exact=False)   # the subprocess ran 1 thread: float rounding differs


@pytest.mark.slow
def test_torchrun_two_processes_equals_single(model, tmp_path):
    source = lines_file(tmp_path / "in.txt", 17, seed=4)
    ElmoEmbedder(*model, stateful=False).embed_file(str(source), str(tmp_path / "one.hdf5"), "all", batch_size=3,
                                                    sort=False)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    base = [torchrun, "--nproc-per-node", "2", "-m", "elmo_fast.cli"]
    proc = subprocess.run(base + args(model, source, tmp_path / "two.hdf5", "--all", "--stateless", "--batch-size",
                                      "3"), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_same(tmp_path / "one.hdf5", tmp_path / "two.hdf5", exact=False)
    assert not (tmp_path / "two.rank0.hdf5").exists()
    proc = subprocess.run(base + args(model, source, tmp_path / "keep.hdf5", "--all", "--stateless", "--no-merge"),
                          capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    index = json.loads((tmp_path / "keep.index.json").read_text())
    assert index["world_size"] == 2 and index["lines"] == 17 and len(index["sentence_to_index"]) <= 17
    with h5py.File(tmp_path / "keep.rank1.hdf5", "r") as f:
        assert sorted(f.keys(), key=int) == [str(i) for i in range(1, 17, 2)]
    proc = subprocess.run(base + args(model, source, tmp_path / "st.hdf5", "--all"), capture_output=True, text=True,
                          env=env(), cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "--stateless or --warm-state" in proc.stderr


def test_cli_bfloat16_on_cpu(model, tmp_path, capsys):
    """elmo-fast embed --dtype bfloat16 runs on the CPU (issue 10); vectors are written as float32."""
    source = lines_file(tmp_path / "in.txt", 3)
    assert cli.main(args(model, source, tmp_path / "bf16.hdf5", "--all", "--dtype", "bfloat16")) == 0
    assert "sentences/s" in capsys.readouterr().err
