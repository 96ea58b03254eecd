"""benchmarks.check's comparison logic, record and load guard (no timing: reference.run is replaced)."""

import json

import pytest

from benchmarks import check


def rows(numpy_seconds, plain_seconds=1.0, size="s"):
    out = []
    for stage, seconds in numpy_seconds.items():
        out += [{"stage": stage, "size": size, "backend": "plain", "median_s": plain_seconds},
                {"stage": stage, "size": size, "backend": "numpy", "median_s": seconds}]
    return out


def test_a_drop_over_the_tolerance_is_flagged_and_smaller_ones_are_not():
    recorded = check.ratios(rows({"gram": 0.10, "warp": 0.10, "sobel": 0.10}))
    current = check.ratios(rows({"gram": 0.125, "warp": 0.115, "sobel": 0.05}))  # 20 % and 13 % slower, 2x faster
    flags = {c["name"]: c for c in check.compare(current, recorded)}
    assert flags["gram@s"]["dropped"] and flags["gram@s"]["change"] == pytest.approx(-0.2)
    assert not flags["warp@s"]["dropped"] and not flags["sobel@s"]["dropped"]
    assert flags["sobel@s"]["change"] == pytest.approx(1.0)


def test_the_ratio_is_against_the_plain_way_of_the_same_run():
    # A machine twice as slow doubles both times: the ratio, and the verdict, stay.
    recorded = check.ratios(rows({"gram": 0.1}, plain_seconds=1.0))
    current = check.ratios(rows({"gram": 0.2}, plain_seconds=2.0))
    assert current["gram@s"]["ratio"] == pytest.approx(10.0)
    assert not check.compare(current, recorded)[0]["dropped"]


def test_stages_missing_from_the_record_or_without_a_plain_way_are_not_flagged():
    current = check.ratios(rows({"gram": 0.1}) + [{"stage": "nnls", "size": "s", "backend": "numpy",
                                                   "median_s": 0.1}])
    assert list(current) == ["gram@s"]
    (only,) = check.compare(current, None)
    assert only["recorded"] is None and only["change"] is None and not only["dropped"]
    with pytest.raises(ValueError, match="tolerance"):
        check.compare(current, None, tolerance=1.5)


@pytest.fixture
def fake_run(monkeypatch):
    """reference.run replaced: no timing, the rows of ``state["seconds"]``."""
    state = {"seconds": {"gram": 0.1, "warp": 0.1}, "calls": []}

    def run(sizes, backends, stages, **kwargs):
        state["calls"].append((sizes, backends, stages))
        return {"rows": rows(state["seconds"]), "machines": {}, "skipped": []}

    monkeypatch.setattr(check.reference, "run", run)
    return state


def test_a_quiet_run_records_and_a_later_drop_fails(fake_run, monkeypatch, tmp_path, capsys):
    record = tmp_path / "check.json"
    monkeypatch.setattr(check, "load_average", lambda: 0.1)
    # The run's own load is CPU time over wall time, and CPU time comes in 10 ms clock ticks: over
    # the fake run's few milliseconds one tick made it 0.5 or more, and the load after 0.0, now and
    # then (once in three CI runs).
    monkeypatch.setattr(check, "own_load", lambda before, after, seconds: 0.0)
    assert check.main(["--record", "--against", str(record)]) == 0
    # The default plan: every stage at 350 x 415 x 200, then refine at the paper's geometry, on NumPy.
    assert [(sizes, stages) for sizes, _, stages in fake_run["calls"]] == [
        ([(350, 415, 200)], list(check.bench.STAGES)), ([(350, 415, 1000)], ["refine"])]
    stored = json.loads(record.read_text())
    assert stored["ratios"]["gram@s"]["ratio"] == pytest.approx(10.0) and stored["load"] == [0.1, 0.1]
    fake_run["seconds"] = {"gram": 0.2, "warp": 0.1}  # gram half as fast against the same plain way
    assert check.main(["--against", str(record)]) == 1
    out = capsys.readouterr().out
    assert "DROP: gram@s" in out and "-50 %" in out
    assert json.loads(record.read_text()) == stored  # not recorded without --record


def test_a_loaded_machine_is_refused_and_never_recorded(fake_run, monkeypatch, tmp_path, capsys):
    record = tmp_path / "check.json"
    monkeypatch.setattr(check, "load_average", lambda: 0.9)
    assert check.main(["--against", str(record)]) == 2
    assert "refused" in capsys.readouterr().err
    assert check.main(["--anyway", "--record", "--against", str(record)]) == 0
    assert "WARNING" in capsys.readouterr().err and not record.exists()
