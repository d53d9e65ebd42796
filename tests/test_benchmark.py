"""The benchmark driver runs, times both implementations and writes its JSON (not a speed test)."""
import json
import os
import subprocess
import sys

import pytest

from elmo_fast import bench_data, bench_plot, benchmark, cli


def test_driver_times_reference_and_fused_and_writes_json(tmp_path):
    results = benchmark.run(["highway"], ["small"], [(1, 3)], [1], ["forward", "forward+backward"], repeats=1,
                            progress=lambda line: None)
    assert {(r.mode, r.impl) for r in results} == {(m, i) for m in ["forward", "forward+backward"]
                                                   for i in ["reference", "elmo_fast"]}
    assert all(r.median_s > 0 and r.tokens == 5 and r.threads == 1 for r in results)
    assert all(r.extra["gemm_peak_gflops"] > 0 and r.extra["pct_of_gemm_peak"] > 0 for r in results)
    assert "highway" in benchmark.table(results)
    path = tmp_path / "out.json"
    benchmark.write_json(results, str(path))
    data = json.loads(path.read_text())
    assert data["machine"]["torch"] and len(data["results"]) == 4


def test_english_sentences_are_real_text():
    sentences = bench_data.english_sentences(4, 10)
    assert [len(s) for s in sentences] == [10] * 4
    assert sentences == bench_data.english_sentences(4, 10)  # deterministic
    words = [w for s in sentences for w in s]
    assert len(set(words)) < len(words)  # real text repeats itself


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "torch" in info and "cuda_available" in info
    assert set(info["cpu"]) == {"gemm", "directions", "wavefront"} and info["cpu"]["wavefront"] in ("auto", "on", "off")
    assert set(info["cuda_kernels"]) == {"char_cnn", "cuda_directions", "cuda_graphs", "lstm"}


def test_cli_output_into_a_closed_pipe_is_quiet():
    """`elmo-fast info | head -0`: the reader has gone; exit 141 as a tool killed by SIGPIPE, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "elmo_fast.cli", "info"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and "Error" not in proc.stderr, proc.stderr


def test_cli_bench_shape_option(tmp_path, capsys):
    args = ["bench", "--model", "small", "--op", "highway", "--threads", "1", "--quick", "--out", str(tmp_path)]
    assert cli.main(args + ["--shape", "2x3", "--shape", "1X4"]) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {r["shape"] for r in data["results"]} == {"2x3", "1x4"}
    with pytest.raises(SystemExit):
        cli.main(args + ["--shape", "64by32"])
    assert "--shape takes BATCHxWORDS" in capsys.readouterr().err


def test_flops_count_the_dense_work():
    # original highway, 1 sentence of 3 words = 5 tokens, 2 layers of (5 x 2048) @ (2048 x 4096)
    assert benchmark.flops("highway", "original", 1, 3, False) == 2 * 2 * 5 * 2048 * 4096
    assert benchmark.flops("highway", "original", 1, 3, True) == 3 * benchmark.flops("highway", "original", 1, 3, False)


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    results = benchmark.run(["highway"], ["small"], [(1, 3), (2, 3)], [1], ["forward"], repeats=1,
                            progress=lambda line: None)
    path = tmp_path / "speedup.png"
    assert bench_plot.plot_speedups(results, str(path)) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gemm_floor_lists_the_unavoidable_products():
    from elmo_fast import gemm_floor

    # rows of lengths 3, 1, 0: the input GEMM over 4 valid steps; step 0 has 2 active rows, steps 1-2 one.
    assert sorted(gemm_floor.lstm_gemms([3, 1, 0], 4, 5, 2)) == sorted(
        [(4, 4, 20, 1), (2, 2, 20, 1), (2, 5, 2, 1), (1, 2, 20, 2), (1, 5, 2, 2)])
    elmo = gemm_floor.elmo_gemms(7, [2, 2], n_highway=2, filters=8, cell=5, proj=2)
    assert elmo[:2] == [(7, 8, 16, 2), (7, 8, 2, 1)] and len(elmo) == 2 + 4 * 3
    flops = sum(2 * m * k * n * c for m, k, n, c in gemm_floor.lstm_gemms([22] * 16, 512, 4096, 512))
    assert flops == 2 * 16 * 22 * (512 * 16384 * 2 + 4096 * 512)  # the LSTM layer-direction's dense count


def test_driver_times_the_gemm_floor_beside_the_lstm():
    results = benchmark.run(["lstm_projection"], ["small"], [(2, 3)], [1], ["forward"], repeats=1,
                            progress=lambda line: None)
    impls = {r.impl: r for r in results}
    assert set(impls) == {"reference", "torch.nn.LSTM", "elmo_fast", benchmark.GEMM_FLOOR}
    assert 0 < impls[benchmark.GEMM_FLOOR].median_s


def test_driver_times_the_token_encoder_with_its_floor():
    results = benchmark.run(["char_encoder"], ["small"], [(2, 3)], [1], ["forward", "forward+backward"], repeats=1,
                            progress=lambda line: None)
    cells = {(r.mode, r.impl) for r in results}
    assert cells == {("forward", "reference"), ("forward", "elmo_fast"), ("forward", benchmark.GEMM_FLOOR),
                     ("forward+backward", "reference"), ("forward+backward", "elmo_fast")}
    assert all(r.tokens == 2 * 5 and r.median_s > 0 for r in results)
    assert benchmark.flops("char_encoder", "small", 2, 3, False) > benchmark.flops("char_cnn", "small", 2, 3, False)


def test_settle_calls_until_the_measured_choices_are_made():
    import torch

    ops = torch.ops.elmo_fast
    before = json.loads(ops._cpu_gemm_info())["mode"]
    ops._set_cpu_gemm("auto")
    ops._cpu_gemm_reset()
    w, x = torch.randn(512, 512), torch.randn(16, 512)
    calls = []

    def fn():
        calls.append(1)
        ops._cpu_gemm_linear(x, w, None)

    try:
        benchmark.settle(fn, max_calls=20)
        decisions = json.loads(ops._cpu_gemm_info())["decisions"]
    finally:
        ops._set_cpu_gemm(before)
        ops._cpu_gemm_reset()
    if json.loads(ops._cpu_gemm_info())["onednn_fp32"]:
        # 4 warm-up calls and 3 timed trials of each path (Note [measured path]), then decided
        assert len(calls) == 10 and [d["choice"] for d in decisions.values()] != ["measuring"]
    else:
        assert len(calls) == 1 and decisions == {}
