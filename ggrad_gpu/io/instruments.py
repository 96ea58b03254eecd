"""Instrument files read whole: the cube, its band axis, the white-light image and the stage transform.

A lab's map comes in its instrument's format with the brightfield
(white-light) image and the stage geometry of both. :func:`read_instrument`
reads them through the libraries made for them (the ``[instruments]`` extra:
``rosettasciio`` for Renishaw ``.wdf``, ``agilent-format`` for Agilent FTIR
mosaics ``.dmt``) and turns the geometry into the initial guide-to-cube matrix
of DESIGN's Conventions (:func:`stage_matrix`): (row, col) pixel centres, the
pull-back direction.

========  ===========  ==================  =========================================================
format    suffix       library             guide and initial transform
========  ===========  ==================  =========================================================
renishaw  ``.wdf``     ``rosettasciio``    the embedded white-light image; map origin and step
                                           (centre of the first point) against the image's origin
                                           (outer corner of its first pixel) and pixel size
agilent   ``.dmt``     ``agilent-format``  the visible overview beside the file (else the IR
                                           cutout); the IR collect area (its outer edges, as the
                                           ``.cfg`` files give it) against the image's position
bruker    ``.bcf``     ``rosettasciio``    the electron image of the same scan (BSE, else SE); the
                                           identity (one scan grid, the same pixel count and size)
========  ===========  ==================  =========================================================

A file may say what kind of image its guide is (``InstrumentFile.guide_kind``):
an electron image is not transmitted light, so ``ggrad refine`` compares it
with the cube as it is, not as optical density.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._validation import to_gray
from .cubes import CubeData
from .guides import read_guide
from .libraries import reading, require

__all__ = ["INSTRUMENT_SUFFIXES", "BandAxis", "InstrumentFile", "PlacedImage", "is_instrument_file",
           "read_instrument", "stage_matrix"]

# Suffix -> format. Agilent single tiles (.dat, .seq) carry no visible image or position, so they are not here.
INSTRUMENT_SUFFIXES = {".wdf": "renishaw", ".dmt": "agilent", ".bcf": "bruker"}
# An EDS hypermap's channels summed into bands of this many over the X-ray lines' range: a
# channel holds a fraction of a count per pixel, too few for a gradient (the P45 hypermap's
# 2048 channels, about 8 counts per pixel in all: 1 of 4 starts under 1 px, against 8 of 8 in
# 92 bands of 16).
EDS_CHANNELS_PER_BAND = 16
EDS_RANGE_KEV = (0.2, 15.0)


@dataclass(frozen=True, eq=False)
class BandAxis:
    """The spectral axis of a cube: one value per band, its unit and name (e.g. ``"Wavelength"``, ``"nm"``).

    Examples
    --------
    >>> axis = BandAxis(values=np.linspace(500.0, 1800.0, 5), units="cm-1", name="Raman shift")
    >>> axis.values.size, np.diff(axis.values).tolist()  # one value per band, evenly spaced here
    (5, [325.0, 325.0, 325.0, 325.0])
    """

    values: np.ndarray
    units: str | None
    name: str


@dataclass(frozen=True, eq=False)
class PlacedImage:
    """An image that an instrument file places on its cube.

    Attributes
    ----------
    name : str
        What the file calls it (e.g. ``"white-light image"``, ``"Entire Image"``).
    image : numpy.ndarray of float32, shape (rows, cols)
        Grayscale (colour becomes BT.709 luma, as :func:`~ggrad_gpu.io.read_guide`).
    to_cube : numpy.ndarray, shape (3, 3)
        This image's grid to the cube's native grid, from the stage metadata.
    source : str
        Where the image was read from (the file, or an image beside it).

    Examples
    --------
    >>> to_cube = stage_matrix((0.0, 0.0), (1.0, 1.0), (2.0, 4.0), (5.0, 5.0))  # 1 um image pixels, 5 um map steps
    >>> placed = PlacedImage("white-light image", np.zeros((40, 60), np.float32), to_cube, "sample.wdf")
    >>> np.round(placed.to_cube @ [2.0, 4.0, 1.0], 9)[:2]  # image pixel (2, 4): stage (2.5, 4.5) um, map point 0.1
    array([0.1, 0.1])
    """

    name: str
    image: np.ndarray
    to_cube: np.ndarray
    source: str


@dataclass(frozen=True, eq=False)
class InstrumentFile:
    """Everything :func:`read_instrument` takes from an instrument file.

    Attributes
    ----------
    path : pathlib.Path
    format : str
        ``"renishaw"`` or ``"agilent"`` (:data:`INSTRUMENT_SUFFIXES`).
    cube : numpy.ndarray, shape (rows, cols, bands)
        Bands last; row 0 is the top of the guide.
    band_axis : BandAxis
    guide : numpy.ndarray of float32, shape (rows, cols), or None
        The white-light image (None if the file has none).
    initial : numpy.ndarray, shape (3, 3), or None
        Guide grid to the cube's native grid from the stage metadata.
    initial_source : str or None
        The metadata it came from, for ``transform.json``'s ``initial_source``.
    images : tuple of PlacedImage
        Every image the file places on the cube, the guide first.
    metadata : dict
        The geometry in micrometres and what the file says of the acquisition (JSON-ready).
    guide_kind : str or None
        What the guide is, where the file says: ``"electron"`` (an SEM image of
        the same scan: not transmitted light, compared as it is), else None.

    Examples
    --------
    >>> from ggrad_gpu.core.geometry import footprint_box
    >>> initial = stage_matrix((0.0, 0.0), (1.0, 1.0), (2.0, 4.0), (5.0, 5.0))
    >>> guide = np.zeros((40, 60), np.float32)
    >>> sample = InstrumentFile(Path("sample.wdf"), "renishaw", np.zeros((4, 4, 3), np.float32),
    ...                         BandAxis(np.array([500.0, 1000.0, 1500.0]), "cm-1", "Raman shift"), guide, initial,
    ...                         "renishaw-wdf stage metadata",
    ...                         (PlacedImage("white-light image", guide, initial, "sample.wdf"),))
    >>> low, high = footprint_box(sample.cube.shape, sample.initial)  # where the map lies on the guide
    >>> np.round(low, 9).tolist(), np.round(high, 9).tolist()
    ([-1.0, 1.0], [19.0, 21.0])
    >>> sample.images[0].to_cube is sample.initial  # the guide is the first image
    True
    """

    path: Path
    format: str
    cube: np.ndarray
    band_axis: BandAxis
    guide: np.ndarray | None
    initial: np.ndarray | None
    initial_source: str | None
    images: tuple = ()
    metadata: dict = field(default_factory=dict)
    guide_kind: str | None = None

    def cube_data(self) -> CubeData:
        """The cube as :class:`~ggrad_gpu.io.CubeData`, for the writers and ``ggrad refine``'s outputs."""
        return CubeData(self.cube, self.band_axis.values, self.band_axis.units, self.path, self.format)


def is_instrument_file(path) -> bool:
    """Whether ``path``'s suffix is one of :data:`INSTRUMENT_SUFFIXES` (the file is not opened).

    Examples
    --------
    >>> from ggrad_gpu.io import is_instrument_file
    >>> is_instrument_file("sample.WDF"), is_instrument_file("mosaic.dmt"), is_instrument_file("cube.npy")
    (True, True, False)
    """
    return Path(str(path)).suffix.lower() in INSTRUMENT_SUFFIXES


def stage_matrix(image_origin, image_pixel, map_origin, map_step, *, map_origin_at: str = "centre") -> np.ndarray:
    """The guide-to-cube matrix from stage positions (µm), per axis (row, col).

    A guide pixel centre ``p`` sits on the stage at
    ``image_origin + (p + 0.5) * image_pixel`` (the image's origin is the
    outer corner of its first pixel); cube point ``q`` at
    ``map_origin + q * map_step`` (``map_origin_at="centre"``: the centre of
    the first point) or ``map_origin + (q + 0.5) * map_step``
    (``"corner"``: the map's outer corner).

    Parameters
    ----------
    image_origin, image_pixel, map_origin, map_step : (float, float)
        Along (rows, cols), in one length unit, on axes that grow with the
        row and column index.
    map_origin_at : {"centre", "corner"}

    Returns
    -------
    numpy.ndarray, shape (3, 3)
        Diagonal scale ``image_pixel / map_step`` and the offsets.

    Examples
    --------
    >>> from ggrad_gpu.io import stage_matrix
    >>> stage_matrix((0.0, 0.0), (1.0, 1.0), (2.0, 4.0), (5.0, 5.0))
    array([[ 0.2,  0. , -0.3],
           [ 0. ,  0.2, -0.7],
           [ 0. ,  0. ,  1. ]])
    """
    if map_origin_at not in ("centre", "corner"):
        raise ValueError(f"map_origin_at must be 'centre' or 'corner'; got {map_origin_at!r}")
    values = [np.asarray(v, dtype=np.float64).reshape(2) for v in (image_origin, image_pixel, map_origin, map_step)]
    image_origin, image_pixel, map_origin, map_step = values
    for name, value in (("image_pixel", image_pixel), ("map_step", map_step)):
        if not (np.isfinite(value).all() and (value > 0).all()):
            raise ValueError(f"{name} must be two positive sizes; got {tuple(value)}")
    first_point = map_origin + (0.5 * map_step if map_origin_at == "corner" else 0.0)
    matrix = np.eye(3)
    matrix[[0, 1], [0, 1]] = image_pixel / map_step
    matrix[:2, 2] = (image_origin + 0.5 * image_pixel - first_point) / map_step
    return matrix


def read_instrument(path) -> InstrumentFile:
    """Read an instrument file whole: cube, band axis, white-light image and stage transform.

    Parameters
    ----------
    path : path-like
        A Renishaw ``.wdf``, an Agilent mosaic ``.dmt`` (its tiles and
        visible images beside it) or a Bruker Esprit ``.bcf`` (an EDS
        hypermap with the electron images of the same scan).

    Returns
    -------
    InstrumentFile

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For a suffix not in :data:`INSTRUMENT_SUFFIXES`, a file that holds no
        map, or one its library cannot read (the message starts with the path).
    ImportError
        If the format's library is missing; it names the ``[instruments]`` extra.

    Examples
    --------
    >>> from ggrad_gpu.io import read_instrument
    >>> sample = read_instrument("renishaw_map.wdf")  # doctest: +SKIP
    >>> sample.cube.shape, sample.guide.shape, sample.initial_source  # doctest: +SKIP
    ((20, 20, 1015), (480, 752), 'renishaw-wdf stage metadata')
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"instrument file {path} does not exist")
    kind = INSTRUMENT_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"instrument file {path}: unknown format {path.suffix!r}; supported: "
                         f"{', '.join(INSTRUMENT_SUFFIXES)}")
    return {"renishaw": _read_renishaw, "agilent": _read_agilent, "bruker": _read_bruker}[kind](path)


def _library(module: str, package: str, what: str):
    return require(module, package, what, extra="instruments")


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Hold a library's logger to errors: rsciio says at info/warning level which optional viewer is absent."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_renishaw(path: Path) -> InstrumentFile:
    renishaw = _library("rsciio.renishaw", "rosettasciio", "reading a Renishaw .wdf file")
    with reading(path, "Renishaw .wdf file"), _quiet("rsciio"):
        signals = renishaw.file_reader(str(path))
    maps = [s for s in signals if np.ndim(s["data"]) == 3 and s["data"].dtype.names is None]
    if not maps:
        raise ValueError(f"{path}: holds no spectral map (rows, cols, bands); only "
                         f"{[np.shape(s['data']) for s in signals]}")
    spectral_map = maps[0]
    cube = np.asarray(spectral_map["data"], dtype=np.float32)
    map_rows, map_cols, band = spectral_map["axes"][:3]
    band_axis = BandAxis(_axis_values(band), band.get("units"), str(band.get("name", "band")))
    metadata = {"title": spectral_map["metadata"].get("General", {}).get("title"),
                "map_origin_um": [float(map_rows["offset"]), float(map_cols["offset"])],
                "map_step_um": [float(map_rows["scale"]), float(map_cols["scale"])]}
    images = [s for s in signals if s["data"].dtype.names is not None and np.ndim(s["data"]) == 2]
    if not images:
        return InstrumentFile(path, "renishaw", cube, band_axis, None, None, None, (), metadata)
    image = images[0]
    rgb = np.stack([image["data"][name] for name in image["data"].dtype.names[:3]], axis=-1)
    guide = np.ascontiguousarray(to_gray(rgb, "white-light image", source=path, dtype=np.float32))
    image_rows, image_cols = image["axes"][:2]
    origin = [float(image_rows["offset"]), float(image_cols["offset"])]
    pixel = [float(image_rows["scale"]), float(image_cols["scale"])]
    metadata.update(image_origin_um=origin, image_pixel_um=pixel)
    initial = stage_matrix(origin, pixel, metadata["map_origin_um"], metadata["map_step_um"])
    placed = PlacedImage("white-light image", guide, initial, str(path))
    return InstrumentFile(path, "renishaw", cube, band_axis, guide, initial, "renishaw-wdf stage metadata",
                          (placed,), metadata)


def _read_bruker(path: Path) -> InstrumentFile:
    """An EDS hypermap and the electron images of its scan.

    The cube is counts per sweep (each line divided by how often the beam swept
    it, ``Line counter``: lines swept 2 and 3 times would show as stripes), its
    channels within :data:`EDS_RANGE_KEV` summed into bands of
    :data:`EDS_CHANNELS_PER_BAND`. Image and map share the scan grid, so the
    initial transform is the identity where their pixel counts agree.
    """
    bruker = _library("rsciio.bruker", "rosettasciio", "reading a Bruker .bcf file")
    with reading(path, "Bruker .bcf file"), _quiet("rsciio"):
        signals = bruker.file_reader(str(path))
    maps = [s for s in signals if np.ndim(s["data"]) == 3]
    if not maps:
        raise ValueError(f"{path}: holds no EDS hypermap (rows, cols, channels); only "
                         f"{[np.shape(s['data']) for s in signals]}")
    hypermap = maps[0]
    counts = np.asarray(hypermap["data"])
    rows, cols, channels = counts.shape
    energy = _axis_values(hypermap["axes"][2])
    sweeps = np.asarray(hypermap.get("original_metadata", {}).get("Line counter", ()), dtype=np.float64)
    if sweeps.shape != (rows,) or not (sweeps > 0).all():
        sweeps = np.ones(rows)
    inside = np.flatnonzero((energy >= EDS_RANGE_KEV[0]) & (energy < EDS_RANGE_KEV[1]))
    inside = inside[: inside.size // EDS_CHANNELS_PER_BAND * EDS_CHANNELS_PER_BAND]
    if inside.size == 0:
        raise ValueError(f"{path}: the hypermap has no channel between {EDS_RANGE_KEV[0]} and "
                         f"{EDS_RANGE_KEV[1]} keV")
    bands = inside.size // EDS_CHANNELS_PER_BAND
    cube = counts[:, :, inside].reshape(rows, cols, bands, EDS_CHANNELS_PER_BAND).sum(axis=-1, dtype=np.float32)
    cube /= sweeps.astype(np.float32)[:, None, None]
    centres = energy[inside].reshape(bands, EDS_CHANNELS_PER_BAND).mean(axis=1)
    band_axis = BandAxis(centres, hypermap["axes"][2].get("units"), "Energy")
    title = lambda s: str(s.get("metadata", {}).get("General", {}).get("title", ""))  # noqa: E731
    metadata = {"title": title(hypermap), "channels": int(channels), "channels_per_band": EDS_CHANNELS_PER_BAND,
                "energy_range_keV": [float(energy[inside[0]]), float(energy[inside[-1]])],
                "divided_by_line_sweeps": bool((sweeps != 1).any()), "guide_kind": "electron"}
    images = sorted((s for s in signals if np.ndim(s["data"]) == 2), key=lambda s: title(s) != "BSE")
    # One scan: each image and the map span the same field (a unit square here), their pixels
    # dividing it; a different pixel count scales about the field's outer corner.
    placed = tuple(PlacedImage(f"{title(s) or 'electron'} image", np.asarray(s["data"], dtype=np.float32),
                               stage_matrix((0.0, 0.0), 1 / np.array(s["data"].shape, dtype=np.float64), (0.0, 0.0),
                                            (1 / rows, 1 / cols), map_origin_at="corner"), str(path))
                   for s in images)
    if not placed:
        return InstrumentFile(path, "bruker", cube, band_axis, None, None, None, (), metadata, "electron")
    guide = placed[0]
    metadata["guide"] = guide.name
    return InstrumentFile(path, "bruker", cube, band_axis, guide.image, guide.to_cube,
                          "bruker-bcf scan grid (image and hypermap of the same scan)", placed, metadata, "electron")


def _axis_values(axis: dict) -> np.ndarray:
    if axis.get("axis") is not None:
        return np.asarray(axis["axis"], dtype=np.float64)
    return float(axis.get("offset", 0.0)) + float(axis.get("scale", 1.0)) * np.arange(int(axis["size"]))


def _read_agilent(path: Path) -> InstrumentFile:
    agilent = _library("agilent_format", "agilent-format", "reading an Agilent .dmt mosaic")
    with reading(path, "Agilent .dmt mosaic"):
        # MAT=True: row 0 at the top of the visible images (the four flips were checked against them).
        mosaic = agilent.agilentMosaic(str(path), MAT=True, dtype=np.float32)
    cube = np.asarray(mosaic.data)
    band_axis = BandAxis(np.asarray(mosaic.wavenumbers, dtype=np.float64), "cm-1", "Wavenumber")
    metadata = {key: str(mosaic.info[key]) for key in ("PixelAggregationSize", "FPA Pixel Size")
                if key in mosaic.info}
    cutout = next((v for v in mosaic.vis if v["name"] == "IR Cutout"), None)
    if cutout is None:
        return InstrumentFile(path, "agilent", cube, band_axis, None, None, None, (), metadata)
    # agilent-format gives each image's bottom-left corner with y up, the IR collect area's bottom-left at 0.
    field_height, field_width = float(cutout["img_size_y"]), float(cutout["img_size_x"])
    step = (field_height / cube.shape[0], field_width / cube.shape[1])
    metadata.update(ir_field_um=[field_height, field_width], cube_step_um=list(step))
    placed = []
    for visible in sorted(mosaic.vis, key=lambda v: v["name"] != "Entire Image"):  # the overview first
        image = read_guide(visible["image_ref"])
        height, width = float(visible["img_size_y"]), float(visible["img_size_x"])
        # Row-down coordinates from the IR field's top edge: the image's top edge is at y = pos_y + height.
        origin = (field_height - (float(visible["pos_y"]) + height), float(visible["pos_x"]))
        pixel = (height / image.shape[0], width / image.shape[1])
        to_cube = stage_matrix(origin, pixel, (0.0, 0.0), step, map_origin_at="corner")
        placed.append(PlacedImage(str(visible["name"]), image, to_cube, str(visible["image_ref"])))
        metadata.setdefault("images", []).append(
            {"name": str(visible["name"]), "file": Path(visible["image_ref"]).name, "origin_um": list(origin),
             "pixel_um": list(pixel)})
    guide = placed[0]
    return InstrumentFile(path, "agilent", cube, band_axis, guide.image, guide.to_cube,
                          "agilent-dmt visible-image positions (IrMosaicInfo.cfg, VisMosaicInfo.cfg)",
                          tuple(placed), metadata)
