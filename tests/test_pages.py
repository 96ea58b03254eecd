"""Small pages where huge ones would stall a first touch (ggrad_gpu._pages)."""

import threading

import numpy as np
import pytest

from ggrad_gpu import _pages, synthetic
from ggrad_gpu._pages import huge_pages_stall, small_pages

switch = _pages._numpy_switch()
pytestmark = pytest.mark.skipif(switch is None, reason="this NumPy has no switch for its huge-page mark")


def marked() -> bool:
    """NumPy's current setting: whether it marks large new arrays for huge pages."""
    previous = switch(True)
    switch(previous)
    return previous


@pytest.fixture
def stalling(monkeypatch):
    """A kernel that stalls on marked faults, no user choice, and NumPy marking (restored after)."""
    monkeypatch.setattr(_pages, "huge_pages_stall", lambda: True)
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    before = switch(True)
    yield
    switch(before)


@pytest.mark.parametrize("text, stalls", [
    ("always defer defer+madvise [madvise] never\n", True),
    ("always defer [defer+madvise] madvise never\n", True),
    ("[always] defer defer+madvise madvise never\n", True),
    ("always [defer] defer+madvise madvise never\n", False),
    ("always defer defer+madvise madvise [never]\n", False),
    ("no brackets\n", False),
])
def test_the_kernels_policy_is_read_from_the_bracketed_word(tmp_path, text, stalls):
    policy = tmp_path / "defrag"
    policy.write_text(text)
    assert huge_pages_stall(policy) is stalls


def test_no_policy_file_means_no_stall(tmp_path):
    assert huge_pages_stall(tmp_path / "absent") is False


def test_the_mark_is_off_inside_and_restored_after(stalling):
    with small_pages():
        assert not marked()
        with small_pages():  # nested: still off
            assert not marked()
        assert not marked()
    assert marked()


def test_the_mark_is_restored_after_an_exception(stalling):
    with pytest.raises(RuntimeError):
        with small_pages():
            raise RuntimeError("inside")
    assert marked()


def test_overlapping_threads_restore_the_setting_once_the_last_leaves(stalling):
    inside, leave_first, first_left = threading.Event(), threading.Event(), threading.Event()

    def first():
        with small_pages():
            inside.set()
            leave_first.wait(5)
        first_left.set()

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    with small_pages():
        leave_first.set()
        first_left.wait(5)
        assert not marked()  # the first thread left; this block is still inside
    thread.join(5)
    assert marked()


@pytest.mark.parametrize("reason", ["the kernel does not stall", "the user chose"])
def test_nothing_changes_where_the_kernel_does_not_stall_or_the_user_chose(monkeypatch, stalling, reason):
    if reason == "the kernel does not stall":
        monkeypatch.setattr(_pages, "huge_pages_stall", lambda: False)
    else:
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    with small_pages():
        assert marked()
    assert marked()


def test_refine_runs_on_small_pages_and_gives_the_same_result(monkeypatch, stalling):
    from ggrad_gpu import refine
    from ggrad_gpu.refinement import passes

    seen = []
    build = passes.build_problem

    def recording(*args, **kwargs):
        seen.append(marked())
        return build(*args, **kwargs)

    phantom = synthetic.make_phantom(shape=(64, 80), bands=6, seed=2, signatures="mixed")
    monkeypatch.setattr(passes, "build_problem", recording)
    small = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    monkeypatch.setattr(_pages, "huge_pages_stall", lambda: False)
    huge = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    assert seen == [False, True] and marked()
    # The mark is a performance hint: the same numbers either way.
    np.testing.assert_array_equal(small.matrix, huge.matrix)
    np.testing.assert_array_equal(small.registered, huge.registered)
