"""Fuzzing ``ggrad refine`` with corrupted input files of every format.

A valid small guide (120 x 140) and cube (24 x 28 x 8) are written once per
format; each case copies them, corrupts one file deterministically (truncated
to many lengths, bytes flipped at seeded random offsets, the header zeroed,
and per format: the ENVI data file deleted or its header garbled, a Zarr
chunk or metadata file removed or rewritten, the HDF5 superblock broken) and
runs ``main(["refine", ...])`` in-process. Every case must end in one of two
ways:

- exit 2 with exactly one stderr line, ``ggrad: error: ...`` naming the file;
- exit 0 (the corruption left a readable file, e.g. flipped data bytes) with
  complete, valid outputs;

never a traceback, never exit 3, never a hang (an alarm fails a case after
60 s), the corrupted inputs byte-identical after the run and no partial or
hidden temporary entry beside them.

Readable cases run the whole refinement. To keep the file fast, all but the
first two byte-flip cases of each file draw a blank report figure instead of
the full one (the drawing is tested elsewhere; the file handling is the real
one).
"""

import contextlib
import hashlib
import json
import shutil
import signal

import numpy as np
import pytest

from ggrad_gpu import io
from ggrad_gpu.cli.command import main
from ggrad_gpu.synthetic import make_phantom

from helpers import has_module

tifffile = pytest.importorskip("tifffile")
image_module = pytest.importorskip("PIL.Image")

CUBES = {"npy": "cube.npy", "npz": "cube.npz", "tiff": "cube.tif", "envi": "cube.hdr", "hdf5": "cube.h5",
         "zarr": "cube.zarr"}
GUIDES = {"png": "guide.png", "jpeg": "guide.jpg", "tiff": "guide.tif"}
NEEDS = {"envi": "spectral", "hdf5": "h5py", "zarr": "zarr"}
OUTPUTS = {"registered.npy", "transform.json", "weights.json", "report.png"}
# What to corrupt: (input kind, format, role of the file in that format).
TARGETS = [("cube", fmt, "file") for fmt in ("npy", "npz", "tiff", "hdf5")] + [
    ("cube", "envi", "header"), ("cube", "envi", "data"), ("cube", "zarr", "metadata"), ("cube", "zarr", "chunk"),
] + [("guide", fmt, "file") for fmt in GUIDES]
TRUNCATIONS = (0, 1, 4, 8, 12, 16, 32, 64, 100, 128, 0.25, 0.5, 0.75, 0.9, 0.99, -1)  # bytes, fractions, size - 1
FLIPS = 16  # seeded cases per file: even ones within the first 512 bytes (headers), odd ones anywhere
CASE_SECONDS = 60


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One folder per format with a valid guide and cube: ``{(kind, fmt): folder}``."""
    phantom = make_phantom(shape=(120, 140), bands=8, seed=5, rotation_deg=1.0, shift=(4.0, -6.0))
    assert phantom.cube.shape == (24, 28, 8)
    root = tmp_path_factory.mktemp("pristine")
    folders = {}
    for fmt, name in CUBES.items():
        if fmt in NEEDS and not has_module(NEEDS[fmt]):
            continue
        folder = root / f"cube-{fmt}"
        folder.mkdir()
        np.save(folder / "guide.npy", phantom.guide)
        io.write_cube(folder / name, phantom.cube, band_centres=np.linspace(800, 1800, 8), band_unit="cm-1")
        folders["cube", fmt] = folder
    grey = np.clip(phantom.guide / phantom.guide.max() * 255, 0, 255).astype(np.uint8)
    for fmt, name in GUIDES.items():
        folder = root / f"guide-{fmt}"
        folder.mkdir()
        np.save(folder / "cube.npy", phantom.cube)
        if fmt == "tiff":
            tifffile.imwrite(folder / name, grey.astype(np.uint16) * 257)
        else:
            options = {"quality": 90} if fmt == "jpeg" else {}
            image_module.fromarray(np.dstack([grey] * 3)).save(folder / name, **options)
        folders["guide", fmt] = folder
    return folders


def _arguments(kind, fmt):
    """(guide file name, cube file name) of a case folder."""
    return (GUIDES[fmt], "cube.npy") if kind == "guide" else ("guide.npy", CUBES[fmt])


def _target_file(folder, kind, fmt, role):
    """The file of a case folder that a corruption works on."""
    if fmt == "envi" and kind == "cube":
        return folder / ("cube.hdr" if role == "header" else "cube.img")
    if fmt == "zarr" and kind == "cube":
        store = folder / "cube.zarr"
        if role == "metadata":
            return next(p for name in ("zarr.json", ".zarray") if (p := store / name).exists())
        return max((p for p in store.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr."))),
                   key=lambda p: p.stat().st_size)  # the biggest chunk
    return folder / _arguments(kind, fmt)[0 if kind == "guide" else 1]


# --------------------------------------------------------------------------- corruptions


def _truncations(size):
    lengths = {int(n * size) if isinstance(n, float) else (size + n if n < 0 else n) for n in TRUNCATIONS}
    for length in sorted(n for n in lengths if 0 <= n < size):
        yield f"truncate-{length}", lambda path, n=length: path.write_bytes(path.read_bytes()[:n])


def _flips(size):
    for seed in range(FLIPS):
        def flip(path, seed=seed):
            data = bytearray(path.read_bytes())
            rng = np.random.default_rng([seed, len(data)])
            span = min(len(data), 512) if seed % 2 == 0 else len(data)
            for offset in rng.integers(0, span, size=1 + seed % 4):
                data[offset] ^= int(rng.integers(1, 256))
            path.write_bytes(bytes(data))

        yield f"flip-{seed}", flip


def _zeroed(size):
    for count in (4, 16, 512):
        def zero(path, count=count):
            data = bytearray(path.read_bytes())
            data[:count] = bytes(min(count, len(data)))
            path.write_bytes(bytes(data))

        yield f"zero-first-{count}", zero


def _text_edit(old, new, *, regex=False):
    import re

    def edit(path):
        text = path.read_text(encoding="latin-1")
        changed = re.sub(old, new, text, count=1) if regex else text.replace(old, new, 1)
        assert changed != text, f"{old!r} not in {path.name}"
        path.write_text(changed, encoding="latin-1")

    return edit


def _specials(kind, fmt, role):
    """Corruptions that know the format: ``(name, function of the target file)``."""
    if fmt == "envi" and role == "data":
        yield "data-file-deleted", lambda path: path.unlink()
        yield "data-file-empty", lambda path: path.write_bytes(b"")
        yield "data-file-doubled", lambda path: path.write_bytes(path.read_bytes() * 2)  # longer than declared
    elif fmt == "envi":
        for name, old, new in [
            ("no-magic", "ENVI", "ENVX"), ("lines-misspelt", "lines", "linez"),
            ("samples-missing", "samples = 28\n", ""),
            ("bands-zero", "bands = 8", "bands = 0"), ("bands-too-many", "bands = 8", "bands = 800"),
            ("lines-negative", "lines = 24", "lines = -24"), ("lines-not-a-number", "lines = 24", "lines = many"),
            ("data-type-unknown", "data type = 4", "data type = 99"),
            ("data-type-wider", "data type = 4", "data type = 5"),
            ("byte-order-bad", "byte order = 0", "byte order = 7"),
            ("interleave-bad", "interleave = bsq", "interleave = xyz"),
            ("header-offset-past-end", "header offset = 0", "header offset = 999999"),
            ("wavelength-unclosed", "}", ""), ("wavelength-too-few", "{ 800.0 ,", "{"),
            ("wavelength-garbage", "{ 800.0", "{ eight hundred"),
        ]:
            yield f"header-{name}", _text_edit(old, new)
        yield "header-binary", lambda path: path.write_bytes(bytes(range(256)) * 2)
        yield "header-empty-lines", lambda path: path.write_text("ENVI\n\n\n")
    elif fmt == "zarr" and role == "chunk":
        yield "chunk-deleted", lambda path: path.unlink()
        yield "chunk-is-a-folder", lambda path: (path.unlink(), path.mkdir())
        yield "chunk-garbage", lambda path: path.write_bytes(b"\x00garbage" * 100)
    elif fmt == "zarr":
        yield "metadata-deleted", lambda path: path.unlink()
        yield "metadata-not-json", lambda path: path.write_text("{not json")
        yield "metadata-a-list", lambda path: path.write_text("[]")
        yield "store-emptied", lambda path: [shutil.rmtree(p) if p.is_dir() else p.unlink()
                                             for p in list(path.parent.iterdir())]
        for name, field, value in [("shape-2d", "shape", [24, 28]), ("shape-bigger", "shape", [48, 56, 16]),
                                   ("dtype-unknown", "data_type", "float99"), ("dtype-wider", "data_type", "float64"),
                                   ("chunks-bogus", "chunk_grid",
                                    {"name": "regular", "configuration": {"chunk_shape": [0]}}),
                                   ("codecs-unknown", "codecs", [{"name": "no-such-codec"}]),
                                   ("fill-value-text", "fill_value", "lots")]:
            yield f"metadata-{name}", _json_edit(field, value)
    elif fmt == "hdf5":
        yield "superblock-signature-zeroed", _overwrite(0, bytes(8))
        for start in (8, 12, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88):  # version, sizes, base/EOF/root addresses
            yield f"superblock-{start}", _overwrite(start, b"\xff" * 8)
    elif fmt == "npz":
        yield "central-directory-zeroed", lambda path: path.write_bytes(path.read_bytes()[:-22] + bytes(22))
        yield "member-not-npy", _npz_with(b"not an npy file")
    elif fmt == "npy":
        yield "header-pickled", _text_edit("'descr': '<f4'", "'descr': '|O8'")
        yield "header-shape-2d", _text_edit(r"'shape': \(\d+, \d+, \d+\)", "'shape': (24, 224)", regex=True)
        yield "header-shape-too-big", _text_edit("'shape': (24,", "'shape': (99,")
        yield "header-not-a-dict", _text_edit("{'descr'", "['descr'")
        yield "magic-version-99", _overwrite(6, b"\x63\x00")
    elif fmt == "tiff":
        yield "byte-order-mark-bad", _overwrite(0, b"XX")
        yield "first-ifd-past-end", _overwrite(4, b"\xff\xff\xff\x7f")
        yield "bigtiff-mark-on-classic", _overwrite(2, b"\x2b\x00")
    elif fmt in ("png", "jpeg"):
        yield "trailer-removed", lambda path: path.write_bytes(path.read_bytes()[:-12])
        yield "appended-garbage", lambda path: path.write_bytes(path.read_bytes() + b"\x00garbage" * 64)
        yield "swapped-format", lambda path: path.write_bytes(b"GIF89a" + path.read_bytes()[6:])


def _overwrite(offset, replacement):
    def overwrite(path):
        data = bytearray(path.read_bytes())
        data[offset:offset + len(replacement)] = replacement
        path.write_bytes(bytes(data))

    return overwrite


def _json_edit(field, value):
    def edit(path):
        record = json.loads(path.read_text())
        record[field] = value
        path.write_text(json.dumps(record))

    return edit


def _npz_with(member_bytes):
    def rewrite(path):
        import zipfile

        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("cube.npy", member_bytes)

    return rewrite


# --------------------------------------------------------------------------- running one case


def _digest(folder):
    """Name -> SHA-256 of every file under ``folder`` (and the names of its folders)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


@contextlib.contextmanager
def _deadline(seconds, what):
    """Fail (rather than hang) if the block takes longer than ``seconds`` (POSIX; elsewhere no limit)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what} ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _blank_report(monkeypatch):
    """Draw an empty figure for the report (the real drawing is slow; its file handling stays real)."""
    from matplotlib.figure import Figure

    monkeypatch.setattr("ggrad_gpu.plotting.report.report_figure", lambda *args, **kwargs: Figure(figsize=(1, 1), dpi=10))


def _run_case(folder, kind, fmt, capfd):
    """Run ``ggrad refine`` on a case folder; return ``(exit code, stderr)`` and check what it left."""
    guide, cube = (folder / name for name in _arguments(kind, fmt))
    before = _digest(folder)
    out = folder / "out"
    with _deadline(CASE_SECONDS, folder.name):
        code = main(["refine", str(guide), str(cube), "-o", str(out), "-q", "--levels", "2", "--backend", "numpy"])
    captured = capfd.readouterr()
    err = captured.err
    problems = []
    if "Traceback" in err or "Traceback" in captured.out:
        problems.append("a traceback was printed")
    if code == 2:
        if not (err.startswith("ggrad: error:") and err.count("\n") == 1):
            problems.append("exit 2 without exactly one 'ggrad: error:' line")
        bad = guide if kind == "guide" else cube
        if str(bad) not in err and not any(str(folder / name) in err for name in before):
            problems.append(f"the error does not name {bad.name}")
        if out.exists():
            problems.append("an output folder was left after an error")
    elif code == 0:
        problems += _check_outputs(out)
    else:
        problems.append(f"exit code {code}")
    after = {name: digest for name, digest in _digest(folder).items() if not name.startswith("out")}
    if after != before:
        problems.append("the inputs changed")
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    if hidden:
        problems.append(f"hidden entries left: {hidden}")
    if problems:
        problems.append(f"stderr: {err.strip()[:500]!r}")
    return code, problems


def _check_outputs(out):
    problems = []
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if names != OUTPUTS:
        return [f"outputs incomplete: {sorted(names)}"]
    matrix = np.array(json.loads((out / "transform.json").read_text())["matrix"], dtype=float)
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        problems.append("transform.json holds no finite 3x3 matrix")
    json.loads((out / "weights.json").read_text())
    if io.read_cube(out / "registered.npy").data.ndim != 3:
        problems.append("registered.npy is not a cube")
    if (out / "report.png").read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        problems.append("report.png is not a PNG")
    return problems


# --------------------------------------------------------------------------- the fuzz run


def _families(kind, fmt, role, size):
    yield from _truncations(size)
    yield from _flips(size)
    yield from _zeroed(size)
    yield from _specials(kind, fmt, role)


# The fast lane fuzzes one cube and one guide format; the full run every one.
FAST_TARGETS = {("cube", "npz", "file"), ("guide", "png", "file")}


@pytest.mark.parametrize("kind, fmt, role", [
    pytest.param(*target, id="-".join(target), marks=() if target in FAST_TARGETS else pytest.mark.slow)
    for target in TARGETS])
def test_corrupted_input_gives_one_error_line_or_valid_outputs(pristine, tmp_path, monkeypatch, capfd,
                                                                reliability, kind, fmt, role):
    if (kind, fmt) not in pristine:
        pytest.skip(f"{NEEDS[fmt]} is not installed")
    source = pristine[kind, fmt]
    size = _target_file(source, kind, fmt, role).stat().st_size
    failures, outcomes = [], {0: 0, 2: 0}
    for number, (name, corrupt) in enumerate(_families(kind, fmt, role, size)):
        folder = tmp_path / f"{number:03d}-{name}"
        shutil.copytree(source, folder)
        corrupt(_target_file(folder, kind, fmt, role))
        with monkeypatch.context() as patch:
            if name not in ("flip-0", "flip-1"):
                _blank_report(patch)
            code, problems = _run_case(folder, kind, fmt, capfd)
        outcomes[code] = outcomes.get(code, 0) + 1
        if problems:
            failures.append(f"{folder.name}: " + "; ".join(problems))
        else:
            reliability["corrupt files"] += 1
            reliability["corrupt files read back"] += code == 0
        shutil.rmtree(folder)
    assert not failures, (f"{len(failures)} of {sum(outcomes.values())} cases failed (exit codes {outcomes}):\n"
                          + "\n".join(failures))
    assert outcomes.get(2, 0) > 0  # the corruptions do break the file
