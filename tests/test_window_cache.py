"""The write's window cache: every window equals Zarr's own read, and the decodes follow Belady's plan.

References: ``array[rows, cols]`` read by Zarr for the values; a brute-force
count of the chunks each window touches for the decodes without a cache; the
count of distinct chunks for an unlimited budget (each decoded once).
"""

import pickle
import threading

import numpy as np
import pytest

from helpers import has_module

pytestmark = pytest.mark.skipif(not has_module("zarr"), reason="needs zarr")

from ggrad_gpu._lazy.chunked import warp_source_windows
from ggrad_gpu._lazy.window_cache import WindowCache, chunk_parts, retention_plan


@pytest.fixture(scope="module")
def array(tmp_path_factory):
    import zarr

    path = tmp_path_factory.mktemp("cache") / "cube.zarr"
    values = np.random.default_rng(0).random((61, 53, 3)).astype(np.float32)
    array = zarr.create_array(str(path), shape=values.shape, chunks=(16, 12, 3), dtype="float32")
    array[...] = values
    return array


class CountingArray:
    """A Zarr array that counts its reads (each decodes every chunk it touches)."""

    def __init__(self, array):
        self.array, self.reads, self.shape, self.dtype, self.chunks = array, [], array.shape, array.dtype, array.chunks

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def _windows(rng, shape, count):
    windows = []
    for _ in range(count):
        r0, c0 = rng.integers(0, shape[0] - 1), rng.integers(0, shape[1] - 1)
        windows.append((int(r0), int(rng.integers(r0 + 1, min(shape[0], r0 + 30) + 1)),
                        int(c0), int(rng.integers(c0 + 1, min(shape[1], c0 + 30) + 1))))
    return windows


def _brute_force_chunks(window, chunks):
    r0, r1, c0, c1 = window
    return {(i, j) for i in range(100) for j in range(100)
            if i * chunks[0] < r1 and (i + 1) * chunks[0] > r0 and j * chunks[1] < c1 and (j + 1) * chunks[1] > c0}


def test_chunk_parts_are_the_chunks_a_window_touches_and_tile_it(array):
    for window in _windows(np.random.default_rng(1), array.shape, 40):
        parts = chunk_parts(window, array.chunks)
        assert set(parts) == _brute_force_chunks(window, array.chunks)
        covered = np.zeros(array.shape[:2], dtype=int)
        for r0, r1, c0, c1 in parts.values():
            covered[r0:r1, c0:c1] += 1
        expected = np.zeros_like(covered)
        expected[window[0]:window[1], window[2]:window[3]] = 1
        np.testing.assert_array_equal(covered, expected)


@pytest.mark.parametrize("budget", [0, 4_000, 40_000, 1 << 30])
def test_every_window_equals_zarr_s_read_and_the_decodes_are_the_plan_s(array, budget):
    windows = _windows(np.random.default_rng(2), array.shape, 60)
    counting = CountingArray(array)
    cache = WindowCache(counting, windows, budget)
    for window in windows:
        r0, r1, c0, c1 = window
        np.testing.assert_array_equal(cache.read(*window), array[r0:r1, c0:c1])
        held = sum(values.nbytes for _, values in cache._held.values())
        assert held <= budget
    assert cache.decodes == len(counting.reads) == cache.plan.decodes
    touches = sum(len(_brute_force_chunks(window, array.chunks)) for window in windows)
    assert cache.plan.touches == touches
    assert cache.plan.peak_bytes <= budget
    if budget == 0:
        assert cache.decodes == touches  # nothing held: every window decodes every chunk it touches
    if budget == 1 << 30:
        distinct = set().union(*(_brute_force_chunks(window, array.chunks) for window in windows))
        assert cache.decodes == len(distinct)  # room for everything: each chunk decoded once


def test_more_budget_never_means_more_decodes(array):
    windows = _windows(np.random.default_rng(3), array.shape, 80)
    decodes = [retention_plan(windows, array.chunks, 12, budget).decodes for budget in (0, 2_000, 8_000, 30_000, 1e9)]
    assert decodes == sorted(decodes, reverse=True) and decodes[0] > decodes[-1], decodes


def test_a_warp_s_windows_straddling_chunks_are_decoded_about_once(array):
    # A small rotation, scale and shift (as a refine's output grid), blocks of the store's chunk size.
    angle = np.deg2rad(1.5)
    matrix = np.array([[1.02 * np.cos(angle), -np.sin(angle), 3.3], [np.sin(angle), 1.02 * np.cos(angle), -4.6],
                       [0, 0, 1]])
    windows = warp_source_windows(matrix, array.shape[:2], array.chunks[:2], array.shape, order=1)
    reads = [rows + cols for rows, cols in windows.values() if rows is not None]
    plan = retention_plan(reads, array.chunks, 12, 1 << 30)
    distinct = set().union(*(chunk_parts(window, array.chunks) for window in reads))
    assert plan.touches > 1.8 * len(distinct)  # without a cache: most chunks decoded twice or more
    assert plan.decodes == len(distinct)


def test_reads_out_of_order_and_from_threads_still_equal_zarr_s(array):
    windows = _windows(np.random.default_rng(4), array.shape, 48)
    cache = WindowCache(array, windows, budget=20_000)
    order = list(np.random.default_rng(5).permutation(len(windows)))
    results, errors = {}, []

    def work(part):
        try:
            for k in part:
                results[k] = cache.read(*windows[k])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(order[i::3],)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for k, (r0, r1, c0, c1) in enumerate(windows):
        np.testing.assert_array_equal(results[k], array[r0:r1, c0:c1])
    assert sum(values.nbytes for _, values in cache._held.values()) <= 20_000
    # A window nobody planned for is read all the same.
    np.testing.assert_array_equal(cache.read(0, 61, 0, 53), array[...])


def test_a_copy_for_another_process_holds_nothing_and_reads_the_same(array):
    windows = _windows(np.random.default_rng(6), array.shape, 10)
    cache = WindowCache(array, windows, budget=1 << 30)
    cache.read(*windows[0])
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._held == {} and copy.plan.held == ()
    for r0, r1, c0, c1 in windows:
        np.testing.assert_array_equal(copy.read(r0, r1, c0, c1), array[r0:r1, c0:c1])
    assert copy._held == {}
