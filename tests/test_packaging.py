"""The source distribution holds everything a build and the tests need: setuptools alone takes only the
extension's .cpp/.cu files (of the configuration that ran `sdist`), so an sdist without MANIFEST.in had
no headers and, made on a CPU-only machine, no CUDA sources: `pip install` of it could not compile."""
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tracked_files():
    result = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    return [line for line in result.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_sdist_holds_every_source_header_test_and_benchmark(tmp_path):
    files = tracked_files()
    tree = tmp_path / "tree"
    for name in files:  # a copy of what is committed: no build outputs, nothing untracked
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    # ELMO_FAST_CUDA=0: the CPU-only configuration, which by itself would leave the .cu files out.
    env = dict(os.environ, ELMO_FAST_CUDA="0")
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    (archive,) = (tmp_path / "dist").glob("elmo_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = [name for name in files
              if name.startswith(("csrc/", "elmo_fast/", "tests/", "bench/", "scripts/"))
              and not name.startswith("bench/results/")]
    needed += ["setup.py", "pyproject.toml", "CMakeLists.txt", "MANIFEST.in", "README.md", "Makefile"]
    assert any(name.endswith(".cu") for name in needed) and any(name.endswith(".h") for name in needed)
    missing = sorted(set(needed) - packed)
    assert not missing, f"missing from the sdist: {missing}"
    assert not any(name.startswith("bench/results/") or name.endswith((".so", ".o")) for name in packed)
