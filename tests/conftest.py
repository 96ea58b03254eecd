"""Shared fixtures: the ``xp`` backend parametrisation and small phantoms.

Every backend-following test takes ``xp``; its CuPy parameter carries the
``gpu`` marker and is skipped where CuPy sees no device.

``GGRAD_REQUIRE_GPU=1`` (for a run on a GPU machine) turns every skip of a
``gpu`` test into a failure that gives the skip's reason: a CuPy that does
not import, sees no device or cannot compute on it then fails the run
instead of skipping its tests silently.
"""

import os

import numpy as np
import pytest

from ggrad_gpu._backend import cupy_usable
from ggrad_gpu import synthetic


def _cupy_param():
    usable, reason = cupy_usable()
    if usable:
        import cupy

        return pytest.param(cupy, id="cupy", marks=pytest.mark.gpu)
    return pytest.param(None, id="cupy", marks=[pytest.mark.gpu, pytest.mark.skip(reason=reason)])


REQUIRE_GPU = os.environ.get("GGRAD_REQUIRE_GPU", "").strip() not in ("", "0")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``GGRAD_REQUIRE_GPU=1``, a skipped ``gpu`` test is reported as failed, with the skip's reason."""
    report = yield
    if REQUIRE_GPU and report.skipped and item.get_closest_marker("gpu") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"GGRAD_REQUIRE_GPU=1 but this gpu test was skipped: {reason}"
    return report


@pytest.fixture(params=[pytest.param(np, id="numpy"), _cupy_param()])
def xp(request):
    """The array module under test: NumPy, and CuPy where a device is usable."""
    return request.param


@pytest.fixture(scope="session")
def small_phantom():
    """A 96 x 112 guide and a 40-band cube, misregistered by a known affine."""
    return synthetic.make_phantom(shape=(96, 112), bands=40, seed=11)


# --------------------------------------------------------------------------- reliability summary

_RELIABILITY = pytest.StashKey[dict]()


@pytest.fixture
def reliability(request):
    """Counts of the fault-injection and fuzz cases that passed their checks, for the run's summary.

    Keys: ``"corrupt files"`` (and ``"corrupt files read back"``, those that
    still read), ``"interrupts mid-write"``, ``"signals"`` (SIGINT, SIGTERM)
    and ``"full disk"``. A test adds to them only once a case's checks pass.
    """
    import collections

    return request.config.stash.setdefault(_RELIABILITY, collections.Counter())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line: how many corrupt files and injected faults the reliability tests went through."""
    counts = config.stash.get(_RELIABILITY, None)
    if not counts:
        return
    faults = counts["interrupts mid-write"] + counts["signals"] + counts["full disk"]
    verdict = ("no input modified, no partial output left" if exitstatus == 0
               else "some tests failed: see above")
    terminalreporter.write_line(
        f"reliability: {counts['corrupt files']} corrupt files ({counts['corrupt files read back']} still "
        f"readable), {faults} injected faults ({counts['interrupts mid-write']} interrupts mid-write, "
        f"{counts['signals']} SIGINT/SIGTERM, {counts['full disk']} full disk); {verdict}"
    )


# --------------------------------------------------------------------------- input validation summary

_INPUT_CASES = pytest.StashKey[dict]()


class _InputCaseSummary:
    """Prints one line at the end: how many unusual inputs the validation tests tried, by outcome."""

    def __init__(self, counts):
        self.counts = counts

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        counts = self.counts
        if not counts:
            return
        parts = ", ".join(f"{counts[key]} {key}" for key in sorted(counts))
        terminalreporter.write_line(f"input validation: {sum(counts.values())} unusual inputs tried ({parts})")


@pytest.fixture(scope="session")
def input_cases(request):
    """A counter of the unusual inputs tried, by outcome, printed in the run's summary.

    Outcomes: ``"refused"`` (a ValueError or TypeError naming the parameter),
    ``"converted"`` (accepted after a documented conversion: dtype, byte
    order, colour, band axis), ``"missing data"`` (NaN, inf or a mask
    handled as missing) and ``"degenerate"`` (a defined result for
    degenerate data). Session-scoped, so that hypothesis tests may use it.
    """
    import collections

    counts = request.config.stash.get(_INPUT_CASES, None)
    if counts is None:
        counts = request.config.stash[_INPUT_CASES] = collections.Counter()
        request.config.pluginmanager.register(_InputCaseSummary(counts), "ggrad-input-case-summary")
    return counts
