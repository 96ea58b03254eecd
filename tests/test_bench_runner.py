"""Smoke test of the stage benchmarks' runner (``python -m benchmarks``): a tiny cube, NumPy.

It checks the plumbing, not the figures: one row per stage with positive
times, the rates the model defines, the table, the JSON written atomically
and read back unchanged, the command line, and that asking for CuPy where it
is not usable skips it instead of failing.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZE = (40, 48, 16)


@pytest.fixture(scope="module")
def runner():
    """``benchmarks._runner``, importable from the repository root.

    ``python -m pytest`` puts the current directory on ``sys.path``; the
    ``pytest`` script does not, so the root is added for this import.
    """
    if not (ROOT / "benchmarks" / "_runner.py").exists():
        pytest.skip("the benchmarks folder is not beside the tests")
    with pytest.MonkeyPatch.context() as patch:
        if str(ROOT) not in sys.path:
            patch.syspath_prepend(str(ROOT))
        from benchmarks import _runner
    assert Path(_runner.__file__).resolve().parent == ROOT / "benchmarks", _runner.__file__
    return _runner


@pytest.fixture(scope="module")
def stages(runner):
    from benchmarks._stages import STAGES

    return list(STAGES)


@pytest.fixture(scope="module")
def results(runner, stages):
    return runner.run([SIZE], ["numpy"], stages, rounds=1, quick_peaks=True, keep_going=False)


def test_one_row_per_stage(results, stages):
    rows = results["rows"]
    assert [row["stage"] for row in rows] == stages
    for row in rows:
        assert row["backend"] == "numpy" and row["size"] == "40x48x16" and "error" not in row
        assert row["rounds"] == 1 and len(row["times_s"]) == 1
        assert row["median_s"] > 0 and row["min_s"] > 0 and row["warmup_s"] > 0, row
        assert row["h2d_s"] is None  # no transfer on NumPy
    by_stage = {row["stage"]: row for row in rows}
    for name in ("sobel", "pyramid", "warp"):
        assert by_stage[name]["bytes_moved"] > 0 and by_stage[name]["gbps"] > 0
        assert by_stage[name]["frac_peak"] > 0
    gram = by_stage["gram"]
    assert gram["flops"] == 2 * SIZE[0] * SIZE[1] * SIZE[2] ** 2 and gram["gflops"] > 0
    assert by_stage["nnls"]["info"]["active_bands"] >= 1
    assert by_stage["refine"]["info"]["native_cube"] == [8, 10, 16]


def test_environment(results):
    cpu = results["environment"]["cpu"]
    assert cpu["copy_gbps"] > 0 and cpu["gemm_gflops"]["float32"] > 0 and cpu["gemm_gflops"]["float64"] > 0
    assert cpu["logical_cores"] >= 1 and results["environment"]["numpy"]


def test_table(runner, results, stages):
    table = runner.format_table(results).splitlines()
    assert table[0].startswith("| stage") and "CuPy/NumPy" in table[0]
    body = table[2:]
    assert [line.split("|")[1].strip() for line in body] == stages
    assert all("40x48x16" in line and "numpy" in line for line in body)


def test_json_round_trip(runner, results, tmp_path):
    markdown, data = runner.write_results(results, tmp_path / "out")
    assert json.loads(data.read_text(encoding="utf-8")) == results
    text = markdown.read_text(encoding="utf-8")
    assert runner.format_table(results) in text and "CPU limits" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["stages.json", "stages.md"]  # no temporaries


def test_command_line(runner, tmp_path, capsys):
    argv = ["--sizes", "40x48x16", "--backends", "numpy", "--stages", "sobel,nnls", "--rounds", "1",
            "--quick-peaks", "--out", str(tmp_path)]
    assert runner.main(argv) == 0
    out = capsys.readouterr().out
    assert "| sobel" in out and "| nnls" in out
    written = json.loads((tmp_path / "stages.json").read_text(encoding="utf-8"))
    assert [row["stage"] for row in written["rows"]] == ["sobel", "nnls"]


def test_cupy_where_unusable_is_skipped(runner):
    from ggrad_gpu._backend import cupy_usable

    results = runner.run([SIZE], ["numpy", "cupy"], ["sobel"], rounds=1, quick_peaks=True, keep_going=False)
    backends = [row["backend"] for row in results["rows"]]
    if cupy_usable()[0]:
        assert backends == ["numpy", "cupy"] and results["rows"][1]["median_s"] > 0
        assert results["rows"][1]["h2d_s"] > 0 and results["environment"]["gpu"]["copy_gbps"] > 0
    else:
        assert backends == ["numpy"] and results["environment"]["gpu"] is None
        assert [(s["backend"], s["stage"]) for s in results["skipped"]] == [("cupy", "sobel")]


def test_bad_sizes_are_usage_errors(runner, capsys):
    with pytest.raises(SystemExit) as excinfo:
        runner.main(["--sizes", "40x48"])
    assert excinfo.value.code == 2 and "sizes" in capsys.readouterr().err
