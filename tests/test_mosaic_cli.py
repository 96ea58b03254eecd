"""``ggrad mosaic``: manifests, the output folder, reruns, interruptions and other inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("dask")

from ggrad_gpu.cli.command import main  # noqa: E402
from ggrad_gpu.cli.mosaic import initial_from_stage, read_manifest  # noqa: E402
from ggrad_gpu.synthetic import make_mosaic  # noqa: E402


@pytest.fixture(scope="module")
def mosaic_files(tmp_path_factory):
    """A 2 x 3 phantom mosaic as files: guide.npy, tile<i>.npy, manifest.json (matrices inline and in a file)."""
    folder = tmp_path_factory.mktemp("mosaic")
    mosaic = make_mosaic(grid=(2, 3), tile_shape=(24, 24), bands=6, signatures="mixed", slipped=None,
                         featureless=4, seed=1)
    np.save(folder / "guide.npy", mosaic.guide)
    tiles = []
    for i, (tile, initial) in enumerate(zip(mosaic.tiles, mosaic.initials)):
        np.save(folder / f"tile{i}.npy", tile)
        tiles.append({"cube": f"tile{i}.npy", "initial": initial.tolist()})
    (folder / "initial1.json").write_text(json.dumps({"matrix": mosaic.initials[1].tolist()}))
    tiles[1]["initial"] = "initial1.json"
    tiles[2]["name"] = "corner"
    (folder / "manifest.json").write_text(json.dumps({"tiles": tiles}))
    return folder, mosaic


def _run(folder, out, *extra):
    return main(["mosaic", str(folder / "guide.npy"), str(folder / "manifest.json"), "-o", str(out),
                 "--backend", "numpy", "--chunk", "16", "-q", *extra])


def test_manifest_json_and_csv(mosaic_files, tmp_path):
    folder, mosaic = mosaic_files
    tiles = read_manifest(folder / "manifest.json")
    assert [t["name"] for t in tiles] == ["tile0", "tile1", "corner", "tile3", "tile4", "tile5"]
    np.testing.assert_array_equal(np.stack([t["initial"] for t in tiles]), mosaic.initials)
    assert tiles[0]["cube"] == folder / "tile0.npy"
    # A CSV of stage positions: the first pixel's centre of a tile at (x, y) um.
    (tmp_path / "stage.csv").write_text("cube,x_um,y_um\na.npy,100,50\nb.npy,130,50\n")
    rows = read_manifest(tmp_path / "stage.csv", tile_pixel_um=4.0, guide_pixel_um=1.0)
    guide_point = np.array([50.0 - 0.5, 100.0 - 0.5, 1])  # guide pixel whose centre is at (y, x) = (50, 100) um
    np.testing.assert_allclose(rows[0]["initial"] @ guide_point, [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(rows[1]["initial"] @ (guide_point + [0, 30, 0]), [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(initial_from_stage(100, 50, 4.0, 1.0, (10.0, 20.0)) @ (guide_point - [20, 10, 0]),
                               [0, 0, 1], atol=1e-12)
    with pytest.raises(ValueError, match="pixel-size"):
        read_manifest(tmp_path / "stage.csv")
    (tmp_path / "bad.json").write_text(json.dumps({"tiles": [{"cube": "a.npy"}]}))
    with pytest.raises(ValueError, match="initial"):
        read_manifest(tmp_path / "bad.json")


@pytest.mark.slow
def test_mosaic_command_writes_and_reruns(mosaic_files, tmp_path, capsys):
    folder, mosaic = mosaic_files
    out = tmp_path / "out"
    assert _run(folder, out) == 0
    assert sorted(os.listdir(out)) == ["mosaic.zarr", "report.png", "tiles.json"]
    record = json.loads((out / "tiles.json").read_text())
    assert [t["status"] for t in record["tiles"]] == ["refined"] * 4 + ["model", "refined"]
    assert set(record["tiles"][0]) >= {"name", "cube", "matrix", "initial", "status", "quality"}
    assert record["mosaic"]["grid_factor"] == 4 and len(record["model"]["matrix"]) == 3
    store = zarr.open_array(str(out / "mosaic.zarr"), mode="r")
    assert store.attrs["complete"] is True and list(store.shape) == record["mosaic"]["shape"]
    assert store.attrs["mosaic_to_guide"] == record["mosaic"]["mosaic_to_guide"]
    fused = store[:]
    assert "5 refined, 1 model" in capsys.readouterr().out
    # The same command again reuses the transforms and leaves the mosaic as it was.
    stamp = (out / "tiles.json").stat().st_mtime_ns
    assert _run(folder, out) == 0
    assert (out / "tiles.json").stat().st_mtime_ns == stamp
    assert zarr.open_array(str(out / "mosaic.zarr"))[:].tobytes() == fused.tobytes()
    # Other settings: refused without --force (nothing touched), redone with it.
    assert _run(folder, out, "--chunk", "32") == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "tiles.json").stat().st_mtime_ns == stamp
    assert _run(folder, out, "--chunk", "32", "--force", "--ome-zarr") == 0
    assert zarr.open_array(str(out / "mosaic.zarr")).chunks[:2] == (32, 32)
    ome = zarr.open_group(str(out / "mosaic.ome.zarr"), mode="r")
    np.testing.assert_array_equal(ome["s0"][:], np.moveaxis(zarr.open_array(str(out / "mosaic.zarr"))[:], 2, 0))


def test_mosaic_command_refuses_an_outdir_holding_an_input(mosaic_files, capsys):
    folder, _ = mosaic_files
    assert _run(folder, folder, "--force") == 2
    assert "holds the input" in capsys.readouterr().err


@pytest.mark.slow
def test_a_terminated_run_resumes_to_the_same_mosaic(mosaic_files, tmp_path):
    folder, _ = mosaic_files
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_repository()), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "ggrad_gpu", "mosaic", str(folder / "guide.npy"), str(folder / "manifest.json"),
               "--backend", "numpy", "--chunk", "4", "--max-in-flight", "1", "-q", "-o"]
    subprocess.run(command + [str(tmp_path / "whole")], env=env, check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    process = subprocess.Popen(command + [str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        chunks = out / "mosaic.zarr" / "c"
        if chunks.exists() and sum(1 for p in chunks.rglob("*") if p.is_file()) >= 3:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before it could be terminated")
    assert process.returncode == 143, err.decode()
    assert b"run the same command again" in err
    store = zarr.open_array(str(out / "mosaic.zarr"), mode="r")
    assert store.attrs["complete"] is False
    subprocess.run(command + [str(out)], env=env, check=True, capture_output=True, timeout=300)
    resumed = zarr.open_array(str(out / "mosaic.zarr"), mode="r")
    assert resumed.attrs["complete"] is True
    assert resumed[:].tobytes() == zarr.open_array(str(tmp_path / "whole" / "mosaic.zarr"))[:].tobytes()
    assert (out / "tiles.json").read_text() == (tmp_path / "whole" / "tiles.json").read_text().replace(
        str(tmp_path / "whole"), str(out))


def _repository():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("suffix", [".tif", ".zarr", ".npy", ".png"])
def test_a_guide_is_read_by_region_where_its_format_allows(tmp_path, suffix):
    from ggrad_gpu.io import read_guide
    from ggrad_gpu.io.guide_regions import GuideRegions, open_guide_regions

    rgb = np.random.default_rng(1).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    path = tmp_path / f"guide{suffix}"
    if suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, rgb, tile=(32, 32))
        whole = read_guide(path)
    elif suffix == ".zarr":
        zarr.create_array(str(path), data=rgb, chunks=(32, 32, 3))
        np.save(tmp_path / "same.npy", rgb)
        whole = read_guide(tmp_path / "same.npy")
    elif suffix == ".npy":
        np.save(path, rgb)
        whole = read_guide(path)
    else:
        from PIL import Image

        Image.fromarray(rgb).save(path)
        whole = read_guide(path)
    guide = open_guide_regions(path)
    assert isinstance(guide, GuideRegions) == (suffix != ".png")
    assert tuple(guide.shape[:2]) == (70, 90)
    np.testing.assert_array_equal(guide[10:40, 25:80], whole[10:40, 25:80])
    np.testing.assert_array_equal(np.asarray(guide), whole)
    if suffix != ".png":
        # To a worker process as its path (the pixels stay in the file), read there by region.
        import pickle

        sent = pickle.dumps(guide)
        assert len(sent) < rgb.nbytes / 10
        np.testing.assert_array_equal(pickle.loads(sent)[10:40, 25:80], whole[10:40, 25:80])


@pytest.mark.slow
def test_demo_mosaic(tmp_path, capsys):
    assert main(["demo", "--mosaic", "--bands", "4", "--backend", "numpy", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "tile 5 slipped" in out and "   6  model" in out
    record = json.loads((tmp_path / "demo" / "tiles.json").read_text())
    assert record["tiles"][5]["status"] == "refined" and record["tiles"][6]["status"] == "model"
    assert zarr.open_array(str(tmp_path / "demo" / "mosaic.zarr")).attrs["complete"] is True
    assert (tmp_path / "demo" / "report.png").stat().st_size > 0


@pytest.mark.parametrize("missing", ["zarr", "dask"])
def test_without_zarr_or_dask_the_mosaic_commands_stop_before_any_work(missing, tmp_path, monkeypatch, capsys):
    """After a bare ``pip install .``: the exact install command, before a phantom is made or a tile read."""
    from ggrad_gpu import synthetic

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: its import fails
    monkeypatch.setattr(synthetic, "make_mosaic", no_work)
    assert main(["demo", "--mosaic", "-o", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert f"needs {missing}" in err and "pip install 'ggrad_gpu[io,dask]'" in err, err
    assert not (tmp_path / "demo").exists()
    (tmp_path / "manifest.json").write_text("{}")
    assert main(["mosaic", str(tmp_path / "guide.npy"), str(tmp_path / "manifest.json"), "-o",
                 str(tmp_path / "out")]) == 2
    assert "pip install 'ggrad_gpu[io,dask]'" in capsys.readouterr().err
