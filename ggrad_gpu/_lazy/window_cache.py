"""Windows of a Zarr array read in an order known in advance, each store chunk decoded as few times as a budget allows.

Writing ``registered.zarr`` reads, for each output chunk, the window of the
cube that its pixels map into. Under any shift, rotation or scale these
windows straddle the store's chunks (2 x 2 of them, mostly), and Zarr decodes
every chunk a read touches whole: each chunk of a 4 GiB cube was decoded about
four times, and decoding was half of the write. The windows and their order
are known before the first read, so :class:`WindowCache` keeps, after each
read, the part of each chunk that later reads touch, and, over its byte
budget, drops the part needed last (Belady's rule, which is optimal for parts
of one size). :func:`retention_plan` makes that plan; the reads follow it.

A read never depends on the plan for its values: a part that is not held (a
window read out of order, by another thread or a worker process that holds no
cache) is decoded again, so the windows are those of ``array[rows, cols]``.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

__all__ = ["WindowCache", "retention_plan"]


@dataclass(frozen=True)
class RetentionPlan:
    """What a :class:`WindowCache` holds after each read, and what that costs.

    ``held[s]``: after the read of window ``s``, each kept chunk (its index in
    the chunk grid) and the region of it kept, ``(r0, r1, c0, c1)`` in the
    array's coordinates. ``decodes``: chunk decodes over all windows (each
    chunk at least once); ``touches``: chunk decodes without a cache;
    ``peak_bytes``: the most bytes held after a read.

    Examples
    --------
    >>> plan = retention_plan([(0, 4, 0, 6), (0, 4, 4, 10)], (5, 5), pixel_bytes=4, budget=1 << 20)
    >>> plan.held[0], plan.held[1]  # columns 4:5 of chunk (0, 0) held for the second window, then nothing
    ({(0, 0): (0, 4, 4, 5), (0, 1): (0, 4, 5, 10)}, {})
    >>> plan.decodes, plan.touches, plan.peak_bytes
    (2, 4, 96)
    """

    held: tuple
    decodes: int
    touches: int
    peak_bytes: int


def chunk_parts(window, chunks) -> dict:
    """The chunks a window ``(r0, r1, c0, c1)`` touches, each with the region of it inside the window.

    Examples
    --------
    >>> chunk_parts((3, 9, 0, 4), (5, 5))
    {(0, 0): (3, 5, 0, 4), (1, 0): (5, 9, 0, 4)}
    """
    r0, r1, c0, c1 = window
    rows, cols = chunks[:2]
    return {(i, j): (max(r0, i * rows), min(r1, (i + 1) * rows), max(c0, j * cols), min(c1, (j + 1) * cols))
            for i in range(r0 // rows, (r1 - 1) // rows + 1) for j in range(c0 // cols, (c1 - 1) // cols + 1)}


def _covers(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] >= inner[1] and outer[2] <= inner[2] and outer[3] >= inner[3]


def _union(regions):
    regions = list(regions)
    return (min(r[0] for r in regions), max(r[1] for r in regions),
            min(r[2] for r in regions), max(r[3] for r in regions))


def _pixels(region) -> int:
    return (region[1] - region[0]) * (region[3] - region[2])


def retention_plan(windows, chunks, pixel_bytes: int, budget: int) -> RetentionPlan:
    """The regions of chunks to hold after each of ``windows`` is read, within ``budget`` bytes.

    Parameters
    ----------
    windows : sequence of (r0, r1, c0, c1)
        The windows in the order they will be read.
    chunks : (int, int, ...)
        The store's chunk shape (rows and columns are used).
    pixel_bytes : int
        Bytes of one pixel with all its bands.
    budget : int
        Bytes the held regions may take at once.

    Returns
    -------
    RetentionPlan

    Notes
    -----
    After each read, a chunk that a later window touches keeps the union of
    the regions the later windows touch (which holds every one of them), as
    long as that fits: over the budget, the chunk whose next read is the
    furthest away is dropped first, and decoded again when it comes.

    Examples
    --------
    >>> windows = [(0, 6, 0, 4), (4, 10, 0, 4)]  # the second window reaches back into the first chunk
    >>> plan = retention_plan(windows, (5, 5), pixel_bytes=4, budget=1 << 20)
    >>> plan.held[0], plan.decodes, plan.touches  # rows 4:5 of chunk (0, 0) wait for the second read
    ({(0, 0): (4, 5, 0, 4), (1, 0): (5, 10, 0, 4)}, 2, 4)
    >>> retention_plan(windows, (5, 5), pixel_bytes=4, budget=0).decodes
    4
    """
    parts = [chunk_parts(window, chunks) for window in windows]
    reads = defaultdict(list)  # chunk -> the steps that touch it, in order
    for step, touched in enumerate(parts):
        for chunk in touched:
            reads[chunk].append(step)
    pending = {chunk: deque(steps) for chunk, steps in reads.items()}
    held, plans, decodes, peak = {}, [], 0, 0
    for step, touched in enumerate(parts):
        for chunk, region in touched.items():
            if not (chunk in held and _covers(held[chunk], region)):
                decodes += 1
            pending[chunk].popleft()
        kept = {}
        for chunk in sorted(set(held) | set(touched)):
            if pending[chunk]:
                # Kept: what every later read of the chunk touches (within what it holds or just decoded).
                kept[chunk] = _union(parts[later][chunk] for later in pending[chunk])
        size = sum(_pixels(region) for region in kept.values()) * pixel_bytes
        for chunk in sorted(kept, key=lambda c: pending[c][0], reverse=True):
            if size <= budget:
                break
            size -= _pixels(kept.pop(chunk)) * pixel_bytes
        held = kept
        plans.append(dict(kept))
        peak = max(peak, size)
    return RetentionPlan(tuple(plans), decodes, sum(len(p) for p in parts), peak)


class WindowCache:
    """A Zarr array read by windows in a known order, holding what later windows need (:func:`retention_plan`).

    Parameters
    ----------
    array : zarr.Array
        Rows and columns first; every read takes all of the other axes.
    windows : sequence of (r0, r1, c0, c1)
        The windows :meth:`read` will be asked for, in that order.
    budget : int
        Bytes the held chunk regions may take at once.

    Notes
    -----
    Threads may read at once (a lock guards what is held; decoding runs
    outside it). A copy sent to another process (a Dask worker) holds
    nothing and reads each window as it comes.

    Examples
    --------
    >>> import tempfile, zarr
    >>> array = zarr.create_array(tempfile.mkdtemp() + "/a.zarr", shape=(10, 10, 2), chunks=(5, 5, 2), dtype="f4")
    >>> array[:] = np.arange(200, dtype="f4").reshape(10, 10, 2)
    >>> windows = [(0, 6, 0, 6), (0, 6, 4, 10), (4, 10, 0, 6), (4, 10, 4, 10)]
    >>> cache = WindowCache(array, windows, budget=1 << 20)
    >>> all(np.array_equal(cache.read(*w), array[w[0]:w[1], w[2]:w[3]]) for w in windows)
    True
    >>> cache.decodes, cache.plan.touches  # each chunk decoded once instead of four times
    (4, 16)
    """

    def __init__(self, array, windows, budget: int):
        self.array = array
        windows = [tuple(int(v) for v in window) for window in windows]
        pixel_bytes = int(np.prod(array.shape[2:], dtype=np.int64)) * array.dtype.itemsize
        self.plan = retention_plan(windows, array.chunks, pixel_bytes, budget)
        self._steps = defaultdict(deque)
        for step, window in enumerate(windows):
            self._steps[window].append(step)
        self._held = {}  # chunk -> (region, values)
        self._applied = -1
        self._lock = threading.Lock()
        self.decodes = 0

    @property
    def shape(self):
        return self.array.shape

    def __getstate__(self):
        # Another process shares no memory with this one: it gets the array, no plan and nothing held.
        return {"array": self.array}

    def __setstate__(self, state):
        self.array = state["array"]
        self.plan = RetentionPlan((), 0, 0, 0)
        self._steps, self._held, self._applied = defaultdict(deque), {}, -1
        self._lock, self.decodes = threading.Lock(), 0

    def read(self, r0: int, r1: int, c0: int, c1: int):
        """``array[r0:r1, c0:c1]`` (within the array), from held regions where they cover it."""
        window = (int(r0), int(r1), int(c0), int(c1))
        with self._lock:
            steps = self._steps.get(window)
            step = steps.popleft() if steps else None
            held = dict(self._held)
        keep = self.plan.held[step] if step is not None else {}
        out = np.empty((r1 - r0, c1 - c0) + tuple(self.array.shape[2:]), dtype=self.array.dtype)
        decoded = {}
        for chunk, region in chunk_parts(window, self.array.chunks).items():
            source = held.get(chunk)
            if source is None or not _covers(source[0], region):
                # Zarr decodes the chunk whole whatever part is read: read what this window and the plan want.
                wanted = _union([region, keep[chunk]]) if chunk in keep else region
                source = (wanted, self.array[wanted[0]:wanted[1], wanted[2]:wanted[3]])
                decoded[chunk] = source
            (a0, _, b0, _), values = source
            out[region[0] - r0:region[1] - r0, region[2] - c0:region[3] - c0] = \
                values[region[0] - a0:region[1] - a0, region[2] - b0:region[3] - b0]
        with self._lock:
            self.decodes += len(decoded)
            if step is not None and step > self._applied:
                self._applied = step
                self._held = _kept(keep, decoded, self._held)
        return out


def _kept(keep: dict, decoded: dict, held: dict) -> dict:
    """The regions ``keep`` asks for, cut from what was just decoded or is held (a copy where smaller)."""
    kept = {}
    for chunk, region in keep.items():
        for source in (decoded.get(chunk), held.get(chunk)):
            if source is not None and _covers(source[0], region):
                (a0, a1, b0, b1), values = source
                if region == (a0, a1, b0, b1):
                    kept[chunk] = source
                else:  # a copy, so that the rest of the decoded chunk is freed
                    kept[chunk] = (region, values[region[0] - a0:region[1] - a0, region[2] - b0:region[3] - b0].copy())
                break
    return kept
