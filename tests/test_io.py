"""ggrad_gpu.io: cube and guide readers, atomic writers.

References are independent of the module: files written directly with NumPy,
tifffile, spectral (ENVI), h5py, zarr and Pillow, and the BT.709 luma written
out by hand. Tests of a format skip where its library is not installed.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ggrad_gpu import io
from ggrad_gpu.io import cubes

from helpers import DATA

FORMATS = {  # format -> (file name, library the test needs)
    "npy": ("cube.npy", None),
    "npz": ("cube.npz", None),
    "tiff": ("cube.tif", "tifffile"),
    "envi": ("cube.hdr", "spectral"),
    "hdf5": ("cube.h5", "h5py"),
    "zarr": ("cube.zarr", "zarr"),
}
MEMORY_MAPPED = ("npy", "tiff", "envi")


def _needs(fmt):
    library = FORMATS[fmt][1]
    if library is not None:
        pytest.importorskip(library)


def _cube(dtype=np.float32, shape=(6, 7, 5), seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    return rng.integers(0, 60000, size=shape).astype(dtype)


def _centres(bands, seed=1):
    return np.sort(np.random.default_rng(seed).uniform(400, 1000, bands))


def _digest(path: Path) -> dict:
    """Name -> SHA-256 of every file at or under ``path``."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_of_every_format(tmp_path, fmt, dtype):
    _needs(fmt)
    cube, centres = _cube(dtype), _centres(5)
    written = io.write_cube(tmp_path / FORMATS[fmt][0], cube, band_centres=centres, band_unit="nm")
    assert written == tmp_path / FORMATS[fmt][0]
    found = io.read_cube(written)
    assert isinstance(found, io.CubeData)
    assert found.format == fmt and found.path == written
    assert found.data.dtype == cube.dtype and found.data.shape == (6, 7, 5)
    np.testing.assert_array_equal(found.data, cube)
    if fmt == "npy":  # an npy file holds the array only
        assert found.band_centres is None and found.band_unit is None
    else:
        assert found.band_centres.dtype == np.float64
        np.testing.assert_array_equal(found.band_centres, centres)
        assert found.band_unit == "nm"


@pytest.mark.parametrize("fmt", MEMORY_MAPPED)
def test_memory_mapped_data_are_read_only(tmp_path, fmt):
    _needs(fmt)
    path = io.write_cube(tmp_path / FORMATS[fmt][0], _cube())
    data = io.read_cube(path).data
    assert isinstance(data, np.memmap)
    assert not data.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        data[0, 0, 0] = 1.0


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_writers_leave_only_the_target(tmp_path, fmt):
    _needs(fmt)
    io.write_cube(tmp_path / FORMATS[fmt][0], _cube())
    expected = {"cube.hdr", "cube.img"} if fmt == "envi" else {FORMATS[fmt][0]}
    assert {p.name for p in tmp_path.iterdir()} == expected


@pytest.mark.parametrize("unit, header_unit", [("nm", "Nanometers"), ("cm-1", "Wavenumber"), ("keV", "keV")])
def test_envi_units_are_written_in_envi_words_and_read_back(tmp_path, unit, header_unit):
    pytest.importorskip("spectral")
    path = io.write_cube(tmp_path / "cube.hdr", _cube(), band_centres=_centres(5), band_unit=unit)
    assert f"wavelength units = {header_unit}" in path.read_text()
    assert "interleave = bsq" in path.read_text()
    assert io.read_cube(path).band_unit == unit


def test_format_keyword_overrides_the_suffix(tmp_path):
    cube = _cube()
    path = io.write_cube(tmp_path / "cube.bin", cube, format="npz", band_centres=_centres(5))
    assert path == tmp_path / "cube.bin"
    found = io.read_cube(path, format="npz")
    np.testing.assert_array_equal(found.data, cube)
    assert found.format == "npz"


def test_write_cube_from_a_read_only_memory_map(tmp_path):
    source = io.write_cube(tmp_path / "source.npy", _cube())
    copy = io.write_cube(tmp_path / "copy.npz", io.read_cube(source).data)
    np.testing.assert_array_equal(io.read_cube(copy).data, _cube())


def test_write_cube_takes_either_backend(xp, tmp_path):
    path = io.write_cube(tmp_path / "cube.npz", xp.asarray(_cube()), band_centres=xp.asarray(_centres(5)))
    found = io.read_cube(path)
    assert type(found.data) is np.ndarray and type(found.band_centres) is np.ndarray  # files hold host arrays
    np.testing.assert_array_equal(found.data, _cube())


# --------------------------------------------------------------------------- files written by the libraries


@pytest.mark.parametrize("interleave", ["bil", "bip", "bsq"])
def test_envi_written_by_spectral(tmp_path, interleave):
    envi = pytest.importorskip("spectral.io.envi")
    cube, centres = _cube(np.int16), _centres(5)
    header = tmp_path / "scan.hdr"
    envi.save_image(str(header), cube, interleave=interleave, byteorder=1 if interleave == "bil" else 0,
                    metadata={"wavelength": [float(c) for c in centres], "wavelength units": "Micrometers",
                              "reflectance scale factor": 1000.0})
    found = io.read_cube(header)
    assert found.format == "envi" and isinstance(found.data, np.memmap)
    np.testing.assert_array_equal(found.data, cube)  # no reflectance scaling
    np.testing.assert_array_equal(found.band_centres, centres)
    assert found.band_unit == "um"
    # The data file finds its header too.
    np.testing.assert_array_equal(io.read_cube(tmp_path / "scan.img").data, cube)


def test_envi_without_wavelengths(tmp_path):
    envi = pytest.importorskip("spectral.io.envi")
    envi.save_image(str(tmp_path / "scan.hdr"), _cube(), ext="dat")
    found = io.read_cube(tmp_path / "scan.hdr")
    assert found.band_centres is None and found.band_unit is None
    np.testing.assert_array_equal(found.data, _cube())


def test_envi_refuses_a_band_axis(tmp_path):
    pytest.importorskip("spectral")
    path = io.write_cube(tmp_path / "cube.hdr", _cube())
    with pytest.raises(ValueError, match="band_axis"):
        io.read_cube(path, band_axis=0)


def test_envi_without_its_data_file(tmp_path):
    pytest.importorskip("spectral")
    path = io.write_cube(tmp_path / "cube.hdr", _cube())
    (tmp_path / "cube.img").unlink()
    with pytest.raises(FileNotFoundError, match="cube.hdr"):
        io.read_cube(path)


def test_tiff_written_by_tifffile_has_pages_as_bands(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    cube = _cube()
    tifffile.imwrite(tmp_path / "stack.tif", np.moveaxis(cube, -1, 0), photometric="minisblack")
    found = io.read_cube(tmp_path / "stack.tif")
    assert isinstance(found.data, np.memmap)
    np.testing.assert_array_equal(found.data, cube)
    assert found.band_centres is None


def test_compressed_tiff_is_read_into_memory(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    cube = _cube()
    tifffile.imwrite(tmp_path / "stack.tif", np.moveaxis(cube, -1, 0), photometric="minisblack",
                     compression="zlib")
    found = io.read_cube(tmp_path / "stack.tif")
    assert not isinstance(found.data, np.memmap)
    np.testing.assert_array_equal(found.data, cube)


def test_imagej_tiff_stack(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    cube = _cube()
    tifffile.imwrite(tmp_path / "stack.tif", np.moveaxis(cube, -1, 0)[:, None], imagej=True,
                     metadata={"axes": "ZCYX"})  # one channel: a length-1 axis
    found = io.read_cube(tmp_path / "stack.tif")
    np.testing.assert_array_equal(found.data, cube)


def test_tiff_with_bands_last_and_band_axis(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    cube = _cube()
    tifffile.imwrite(tmp_path / "stack.tif", cube, photometric="minisblack")  # pages are rows here
    np.testing.assert_array_equal(io.read_cube(tmp_path / "stack.tif", band_axis=-1).data, cube)


def test_hdf5_with_the_cube_at_a_nested_path(tmp_path):
    h5py = pytest.importorskip("h5py")
    cube, centres = _cube(), _centres(5)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("scan/bfm", data=np.zeros((12, 14)))
        dataset = file.create_dataset("scan/raman/cube", data=cube)
        dataset.attrs["wavenumbers"] = centres
        dataset.attrs["band_unit"] = "cm-1"
    for found in (io.read_cube(path),  # the only 3-D dataset
                  io.read_cube(path, dataset="/scan/raman/cube"),
                  io.read_cube(f"{path}:/scan/raman/cube")):
        assert found.format == "hdf5" and found.path == path
        assert found.dataset == "/scan/raman/cube"
        np.testing.assert_array_equal(found.data, cube)
        np.testing.assert_array_equal(found.band_centres, centres)
        assert found.band_unit == "cm-1"
    with pytest.raises(ValueError, match="cube must be 3-D"):
        io.read_cube(path, dataset="scan/bfm")


def test_hdf5_band_centres_beside_the_cube_and_a_bands_first_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    cube, centres = _cube(), _centres(5)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("maps/data", data=np.moveaxis(cube, -1, 0))
        file.create_dataset("maps/wavelengths", data=centres)
        file["maps"].attrs["band_unit"] = "nm"
    found = io.read_cube(path, band_axis=0)
    np.testing.assert_array_equal(found.data, cube)
    np.testing.assert_array_equal(found.band_centres, centres)
    assert found.band_unit == "nm"


def test_hdf5_with_two_cubes_needs_a_dataset(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("raman", data=_cube())
        file.create_dataset("ir", data=_cube(seed=2))
    with pytest.raises(ValueError, match="several 3-D arrays.*dataset="):
        io.read_cube(path)
    np.testing.assert_array_equal(io.read_cube(path, dataset="ir").data, _cube(seed=2))
    with pytest.raises(ValueError, match="'absent'"):
        io.read_cube(path, dataset="absent")


def test_zarr_group_written_by_zarr(tmp_path):
    zarr = pytest.importorskip("zarr")
    cube, centres = _cube(), _centres(5)
    group = zarr.open_group(str(tmp_path / "scan.zarr"), mode="w")
    sub = group.require_group("raman")
    create = getattr(sub, "create_array", None) or sub.create_dataset  # zarr 3, zarr 2
    array = create("spectra", shape=cube.shape, dtype=cube.dtype)
    array[...] = cube
    array.attrs.update({"band_centres": centres.tolist(), "band_unit": "cm-1"})
    create("guide", shape=(3, 4), dtype="f4")
    for found in (io.read_cube(tmp_path / "scan.zarr"),
                  io.read_cube(tmp_path / "scan.zarr", dataset="raman/spectra"),
                  io.read_cube(f"{tmp_path / 'scan.zarr'}:/raman/spectra")):
        assert found.format == "zarr" and found.dataset == "raman/spectra"
        np.testing.assert_array_equal(found.data, cube)
        np.testing.assert_array_equal(found.band_centres, centres)
        assert found.band_unit == "cm-1"


def test_npz_with_named_arrays(tmp_path):
    cube, centres = _cube(), _centres(5)
    np.savez(tmp_path / "scan.npz", spectra=cube, wavelengths=centres, band_unit="nm", image=np.zeros((3, 3)))
    found = io.read_cube(tmp_path / "scan.npz")
    assert found.dataset == "spectra" and found.band_unit == "nm"
    np.testing.assert_array_equal(found.data, cube)
    np.testing.assert_array_equal(found.band_centres, centres)
    np.savez(tmp_path / "two.npz", cube=cube, other=_cube(seed=3))
    np.testing.assert_array_equal(io.read_cube(tmp_path / "two.npz").data, cube)  # "cube" wins
    np.testing.assert_array_equal(io.read_cube(tmp_path / "two.npz", dataset="other").data, _cube(seed=3))


def test_band_axis_zero_for_a_bands_first_npy(tmp_path):
    cube = _cube()
    np.save(tmp_path / "bands_first.npy", np.moveaxis(cube, -1, 0))
    found = io.read_cube(tmp_path / "bands_first.npy", band_axis=0)
    assert found.data.shape == cube.shape
    assert isinstance(found.data, np.memmap) and not found.data.flags.writeable  # a view, no copy
    np.testing.assert_array_equal(found.data, cube)


@pytest.mark.parametrize("band_axis, error", [(3, ValueError), (-4, ValueError), (1.0, TypeError), (True, TypeError)])
def test_band_axis_is_checked(tmp_path, band_axis, error):
    path = io.write_cube(tmp_path / "cube.npy", _cube())
    with pytest.raises(error, match="band_axis"):
        io.read_cube(path, band_axis=band_axis)


# --------------------------------------------------------------------------- reading leaves inputs alone


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_reading_never_modifies_the_file(tmp_path, fmt):
    _needs(fmt)
    path = io.write_cube(tmp_path / FORMATS[fmt][0], _cube(), band_centres=_centres(5), band_unit="nm")
    before = {**_digest(path), **(_digest(tmp_path / "cube.img") if fmt == "envi" else {})}
    listing = sorted(p.name for p in tmp_path.iterdir())
    found = io.read_cube(path)
    float(np.asarray(found.data).sum())
    del found
    after = {**_digest(path), **(_digest(tmp_path / "cube.img") if fmt == "envi" else {})}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _write_input(tmp_path, kind):
    """A cube (``kind`` one of FORMATS) or a guide (``guide-png``, ...) written with its own library."""
    if kind in FORMATS:
        _needs(kind)
        return io.write_cube(tmp_path / FORMATS[kind][0], _cube(), band_centres=_centres(5), band_unit="nm")
    gray = np.random.default_rng(3).integers(0, 256, size=(9, 11), dtype=np.uint8)
    if kind == "guide-npy":
        np.save(tmp_path / "guide.npy", gray)
        return tmp_path / "guide.npy"
    if kind == "guide-tiff":
        pytest.importorskip("tifffile").imwrite(tmp_path / "guide.tif", gray)
        return tmp_path / "guide.tif"
    image_module = pytest.importorskip("PIL.Image")
    path = tmp_path / ("guide.png" if kind == "guide-png" else "guide.jpg")
    image_module.fromarray(gray).save(path)
    return path


@pytest.mark.parametrize("kind", list(FORMATS) + ["guide-npy", "guide-tiff", "guide-png", "guide-jpeg"])
def test_readers_open_files_read_only(tmp_path, monkeypatch, kind):
    """Every open of an input is read-only: files, memory maps (``mmap`` ACCESS_READ) and HDF5 (mode "r")."""
    import builtins
    import io as stdio
    import mmap

    path = _write_input(tmp_path, kind)
    opened, real_open, real_os_open, real_mmap = [], builtins.open, os.open, mmap.mmap

    def spy_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(tmp_path) in os.fspath(file):
            opened.append(("open", os.fspath(file), mode))
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(file, flags, *args, **kwargs):
        if str(tmp_path) in os.fspath(file):
            opened.append(("os.open", os.fspath(file), flags))
        return real_os_open(file, flags, *args, **kwargs)

    def spy_mmap(fileno, length, *args, **kwargs):
        opened.append(("mmap", fileno, kwargs.get("access")))
        return real_mmap(fileno, length, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(stdio, "open", spy_open)  # pathlib opens through io.open
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(mmap, "mmap", spy_mmap)
    if kind == "hdf5":
        h5py = pytest.importorskip("h5py")
        real_file = h5py.File

        def spy_file(name, mode="r", *args, **kwargs):
            opened.append(("h5py.File", os.fspath(name), mode))
            return real_file(name, mode, *args, **kwargs)

        monkeypatch.setattr(h5py, "File", spy_file)
    if kind.startswith("guide-"):
        float(io.read_guide(path).sum())
    else:
        float(np.asarray(io.read_cube(path).data).sum())
    monkeypatch.undo()
    assert opened, "the spies saw nothing"
    for how, name, mode in opened:
        if how in ("open", "h5py.File"):
            assert set(mode) <= set("rbt") and "r" in mode, (how, name, mode)
        elif how == "os.open":
            assert mode & _WRITE_FLAGS == 0, (how, name, mode)
        else:
            assert mode == mmap.ACCESS_READ, (how, name, mode)


# --------------------------------------------------------------------------- guide images


def _luma(rgb):
    rgb = rgb.astype(np.float64)
    return 0.2125 * rgb[..., 0] + 0.7154 * rgb[..., 1] + 0.0721 * rgb[..., 2]


def test_rgb_png_becomes_bt709_gray(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(4).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    image_module.fromarray(rgb).save(tmp_path / "guide.png")
    guide = io.read_guide(tmp_path / "guide.png")
    assert guide.dtype == np.float32 and guide.shape == (9, 11)
    np.testing.assert_allclose(guide, _luma(rgb), rtol=1e-6)
    assert guide.max() > 1.5  # not rescaled to [0, 1]


def test_rgba_png_drops_alpha(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rgba = np.random.default_rng(5).integers(0, 256, size=(8, 6, 4), dtype=np.uint8)
    image_module.fromarray(rgba, mode="RGBA").save(tmp_path / "guide.png")
    np.testing.assert_allclose(io.read_guide(tmp_path / "guide.png"), _luma(rgba[..., :3]), rtol=1e-6)


def test_gray_pngs_keep_their_values(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(6)
    gray8 = rng.integers(0, 256, size=(7, 5), dtype=np.uint8)
    image_module.fromarray(gray8).save(tmp_path / "gray8.png")
    np.testing.assert_array_equal(io.read_guide(tmp_path / "gray8.png"), gray8.astype(np.float32))
    gray16 = rng.integers(0, 65536, size=(7, 5), dtype=np.uint16)
    image_module.fromarray(gray16).save(tmp_path / "gray16.png")
    np.testing.assert_array_equal(io.read_guide(tmp_path / "gray16.png"), gray16.astype(np.float32))


def test_jpeg_guide(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rgb = np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8)
    image_module.fromarray(rgb).save(tmp_path / "guide.jpg", quality=95)
    guide = io.read_guide(tmp_path / "guide.jpg")
    assert guide.shape == (16, 16) and guide.dtype == np.float32
    np.testing.assert_allclose(guide, _luma(rgb), atol=3)  # lossy


def test_16_bit_tiff_guide(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    gray = np.random.default_rng(7).integers(0, 65536, size=(10, 12), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "guide.tif", gray)
    guide = io.read_guide(tmp_path / "guide.tif")
    assert guide.dtype == np.float32
    np.testing.assert_array_equal(guide, gray.astype(np.float32))


@pytest.mark.parametrize("planarconfig", ["contig", "separate"])
def test_rgb_tiff_guide(tmp_path, planarconfig):
    tifffile = pytest.importorskip("tifffile")
    rgb = np.random.default_rng(8).integers(0, 65536, size=(10, 12, 3), dtype=np.uint16)
    stored = rgb if planarconfig == "contig" else np.moveaxis(rgb, -1, 0)
    tifffile.imwrite(tmp_path / "guide.tif", stored, photometric="rgb", planarconfig=planarconfig)
    np.testing.assert_allclose(io.read_guide(tmp_path / "guide.tif"), _luma(rgb), rtol=1e-6)


def test_npy_guide(tmp_path):
    guide = np.random.default_rng(9).normal(size=(5, 4))
    np.save(tmp_path / "guide.npy", guide)
    found = io.read_guide(tmp_path / "guide.npy")
    assert found.dtype == np.float32
    np.testing.assert_array_equal(found, guide.astype(np.float32))


def test_guide_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.png"):
        io.read_guide(tmp_path / "absent.png")
    (tmp_path / "guide.xyz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"suffix '\.xyz'.*\.png"):
        io.read_guide(tmp_path / "guide.xyz")
    np.save(tmp_path / "cube.npy", np.zeros((4, 5, 6)))
    with pytest.raises(ValueError, match=r"guide must be 2-D.*\(4, 5, 6\)"):
        io.read_guide(tmp_path / "cube.npy")


# --------------------------------------------------------------------------- atomic writes


def _fail_after(real):
    """A saver that writes everything, then fails as a full disk would."""

    def failing(temps, *args):
        real(temps, *args)
        assert all(os.path.lexists(temp) for temp in temps)
        raise OSError("No space left on device")

    return failing


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_failing_write_leaves_nothing(tmp_path, monkeypatch, fmt):
    _needs(fmt)
    monkeypatch.setitem(cubes.WRITERS, fmt, _fail_after(cubes.WRITERS[fmt]))
    with pytest.raises(OSError, match="No space"):
        io.write_cube(tmp_path / FORMATS[fmt][0], _cube(), band_centres=_centres(5))
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    def half_written(temps, cube, *args):
        with open(temps[0], "wb") as file:
            file.write(b"\x93NUMPY partial")
        raise OSError("No space left on device")

    monkeypatch.setitem(cubes.WRITERS, "npy", half_written)
    with pytest.raises(OSError):
        io.write_cube(tmp_path / "cube.npy", _cube())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_an_existing_target_is_kept_without_overwrite(tmp_path, fmt):
    _needs(fmt)
    path = io.write_cube(tmp_path / FORMATS[fmt][0], _cube(seed=0))
    before = {name: _digest(tmp_path / name) for name in os.listdir(tmp_path)}
    with pytest.raises(FileExistsError, match=path.name if fmt != "envi" else "cube"):
        io.write_cube(tmp_path / FORMATS[fmt][0], _cube(seed=1))
    assert {name: _digest(tmp_path / name) for name in os.listdir(tmp_path)} == before
    # With overwrite the new cube replaces it, and nothing else is left.
    io.write_cube(tmp_path / FORMATS[fmt][0], _cube(seed=1), overwrite=True)
    np.testing.assert_array_equal(io.read_cube(path).data, _cube(seed=1))
    assert set(os.listdir(tmp_path)) == set(before)


def test_atomic_write_removes_the_temporary_file_on_interrupt(tmp_path):
    target = tmp_path / "report.png"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_write(target) as temp:
            assert temp.parent == tmp_path and temp.name.startswith(".report.tmp-") and temp.suffix == ".png"
            temp.write_bytes(b"half a png")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_while_renaming_an_envi_pair_waits_for_both(tmp_path, monkeypatch, reliability):
    """The header is never left behind without its data file (nor the data file without its header)."""
    import signal

    pytest.importorskip("spectral")
    real_rename = os.rename

    def rename(source, target):
        if Path(target).name == "cube.img":  # the first of the two renames
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # time for the handler to run, were it not held back
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        io.write_cube(tmp_path / "cube.hdr", _cube(), band_centres=_centres(5))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.hdr", "cube.img"]
    np.testing.assert_array_equal(io.read_cube(tmp_path / "cube.hdr").data, _cube())
    reliability["signals"] += 1


def test_writers_work_outside_the_main_thread(tmp_path):
    import threading

    errors = []

    def write():
        try:
            io.write_cube(tmp_path / "cube.npz", _cube())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert not errors
    np.testing.assert_array_equal(io.read_cube(tmp_path / "cube.npz").data, _cube())


def test_atomic_write_folders_and_refusals(tmp_path):
    target = tmp_path / "store"
    with io.atomic_write(target) as temp:
        temp.mkdir()
        (temp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    with pytest.raises(FileExistsError, match="store"):
        with io.atomic_write(target):
            pass
    with pytest.raises(FileExistsError, match="folder"):  # a folder is only replaced by a folder
        with io.atomic_write(target, overwrite=True) as temp:
            temp.write_text("a file")
    assert (target / "a").read_text() == "new"
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with io.atomic_write(tmp_path / "empty.txt"):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with io.atomic_write(tmp_path / "missing" / "x.txt"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_atomic_folder_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_folder(out) as staging:
            assert staging.parent == tmp_path and staging.name.startswith(".out.partial-") and staging.is_dir()
            (staging / "a.txt").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with io.atomic_folder(out) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(FileExistsError, match="out"):
        with io.atomic_folder(out):
            pass
    with io.atomic_folder(out, overwrite=True) as staging:  # the old folder goes once the new one is in
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    (tmp_path / "file").write_text("a file")
    with pytest.raises(FileExistsError, match="file"):  # a file is never replaced by a folder
        with io.atomic_folder(tmp_path / "file", overwrite=True):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_split_dataset_path_and_cube_suffix(tmp_path):
    assert io.split_dataset_path("scan.h5:/raman/cube") == (Path("scan.h5"), "/raman/cube")
    assert io.split_dataset_path("store.zarr:maps/cube", "/maps/cube") == (Path("store.zarr"), "maps/cube")
    assert io.split_dataset_path("cube.npy", "x") == (Path("cube.npy"), "x")
    odd = tmp_path / "a.h5:b"  # a file that exists is never split
    odd.write_bytes(b"")
    assert io.split_dataset_path(odd) == (odd, None)
    with pytest.raises(ValueError, match="contradicts"):
        io.split_dataset_path("scan.h5:/a", "b")
    assert {fmt: io.cube_suffix(fmt) for fmt in io.CUBE_FORMATS} == {
        "npy": ".npy", "npz": ".npz", "tiff": ".tif", "envi": ".hdr", "hdf5": ".h5", "zarr": ".zarr"}
    assert all(io.CUBE_SUFFIXES[io.cube_suffix(fmt)] == fmt for fmt in io.CUBE_FORMATS)
    with pytest.raises(ValueError, match="format"):
        io.cube_suffix("png")


def test_no_private_name_crosses_a_module_boundary_into_or_inside_io():
    """What io's modules share, and what others take from io, has a public name."""
    import ast

    package = Path(io.__file__).parents[1]
    crossings = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            # A package's own name ends in ".__init__" here, so one rule resolves every level.
            base = module.rsplit(".", node.level)[0] if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            touches_io = source.startswith("ggrad_gpu.io") or module.startswith("ggrad_gpu.io")
            crossings += [f"{module}: from {source} import {alias.name}" for alias in node.names
                          if touches_io and alias.name.startswith("_") and not alias.name.startswith("__")]
    assert crossings == []


def test_write_json(tmp_path):
    record = {"matrix": np.eye(3), "levels": np.int64(4), "mse": np.float32(0.5), "path": tmp_path / "a"}
    path = io.write_json(tmp_path / "transform.json", record)
    assert json.loads(path.read_text()) == {"matrix": np.eye(3).tolist(), "levels": 4, "mse": 0.5,
                                            "path": str(tmp_path / "a")}
    with pytest.raises(FileExistsError, match="transform.json"):
        io.write_json(path, {})
    io.write_json(path, {"replaced": True}, overwrite=True)
    assert json.loads(path.read_text()) == {"replaced": True}
    with pytest.raises(ValueError, match="weights.json"):
        io.write_json(tmp_path / "weights.json", {"alpha": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transform.json"]


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        io.read_cube(tmp_path / "absent.npy")
    with pytest.raises(FileNotFoundError, match="absent.h5"):
        io.read_cube(f"{tmp_path / 'absent.h5'}:/cube")


def test_unknown_suffix(tmp_path):
    (tmp_path / "cube.xyz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'\.xyz'.*\.npy.*\.hdr.*\.zarr"):
        io.read_cube(tmp_path / "cube.xyz")
    with pytest.raises(ValueError, match=r"'\.xyz'"):
        io.write_cube(tmp_path / "out.xyz", _cube())
    with pytest.raises(ValueError, match="format must be one of"):
        io.read_cube(tmp_path / "cube.xyz", format="bmp")


def test_data_that_are_not_3d(tmp_path):
    np.save(tmp_path / "image.npy", np.zeros((70, 70), dtype=np.float32))
    with pytest.raises(ValueError, match=r"cube must be 3-D \(rows, cols, bands\); got shape \(70, 70\)"):
        io.read_cube(tmp_path / "image.npy")
    np.savez(tmp_path / "images.npz", a=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="cube must be 3-D.*no 3-D array"):
        io.read_cube(tmp_path / "images.npz")
    with pytest.raises(ValueError, match=r"cube must be 3-D.*\(70, 70\)"):
        io.write_cube(tmp_path / "out.npy", np.zeros((70, 70)))
    assert not (tmp_path / "out.npy").exists()


def test_write_cube_checks_its_options(tmp_path):
    with pytest.raises(ValueError, match=r"band_centres must hold one value per band \(5\); got 4"):
        io.write_cube(tmp_path / "cube.npz", _cube(), band_centres=[1, 2, 3, 4])
    with pytest.raises(TypeError, match="band_unit"):
        io.write_cube(tmp_path / "cube.npz", _cube(), band_unit=3)
    with pytest.raises(ValueError, match="format must be one of"):
        io.write_cube(tmp_path / "cube.npz", _cube(), format="png")
    assert list(tmp_path.iterdir()) == []


def test_dataset_on_a_format_without_datasets(tmp_path):
    path = io.write_cube(tmp_path / "cube.npy", _cube())
    with pytest.raises(ValueError, match="dataset"):
        io.read_cube(path, dataset="cube")


@pytest.mark.parametrize("module, package, fmt", [("h5py", "h5py", "hdf5"), ("tifffile", "tifffile", "tiff"),
                                                  ("zarr", "zarr", "zarr"), ("spectral", "spectral", "envi")])
def test_a_missing_library_says_what_to_install(tmp_path, monkeypatch, module, package, fmt):
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes "import module" fail
    path = tmp_path / FORMATS[fmt][0]
    path.mkdir() if fmt == "zarr" else path.write_bytes(b"")
    with pytest.raises(ImportError, match=f"pip install {package}"):
        io.read_cube(path)
    with pytest.raises(ImportError, match=f"pip install {package}"):
        io.write_cube(tmp_path / f"new{path.suffix}", _cube())
    assert not os.path.lexists(tmp_path / f"new{path.suffix}")


def test_a_missing_pillow_says_what_to_install(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "PIL" or name.startswith("PIL."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)
    (tmp_path / "guide.png").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install pillow"):
        io.read_guide(tmp_path / "guide.png")


# --------------------------------------------------------------------------- real data


@pytest.mark.data
def test_real_fenix_envi_header(tmp_path):
    """The FENIX rock scan's original ENVI header, with its BSQ uint16 data rebuilt from cube.npy."""
    folder = DATA / "fenix-rock-swir"
    if not (folder / "image.hdr.orig.txt").exists() or not (folder / "cube.npy").exists():
        pytest.skip("the fenix-rock-swir data set is not available")
    pytest.importorskip("spectral")
    cube = np.load(folder / "cube.npy")
    wavelengths = np.load(folder / "wavelengths_nm.npy")
    (tmp_path / "image.hdr").write_bytes((folder / "image.hdr.orig.txt").read_bytes())
    np.ascontiguousarray(np.moveaxis(cube, -1, 0)).astype("<u2").tofile(tmp_path / "image.dat")
    found = io.read_cube(tmp_path / "image.hdr")
    assert found.shape == (38, 23, 450) and found.data.dtype == np.uint16
    np.testing.assert_array_equal(found.data, cube)  # raw values: no reflectance scale factor applied
    np.testing.assert_allclose(found.band_centres, wavelengths, rtol=0, atol=1e-6)
    assert found.band_unit == "nm"
