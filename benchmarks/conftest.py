"""Session fixtures and the end-of-run summary of the ggrad_gpu benchmarks.

Run from the repository root with ``python -m pytest benchmarks`` (the normal
``python -m pytest`` collects ``tests`` only). ``GGRAD_BENCH_BANDS`` (default
1000) sets the number of bands of the 350 x 415 phantom; use e.g. 100 while
iterating, since the plain SciPy reference takes minutes at 1000 bands.
"""

from __future__ import annotations

import os

import pytest

from ggrad_gpu.synthetic import make_phantom

# Filled by the benchmarks (see test_estimate.py, test_refine.py), read by pytest_terminal_summary;
# pytest-benchmark has no place for figures that combine several benchmarks.
_SUMMARY: dict = {}


def env_int(name: str, default: int) -> int:
    """A positive integer from the environment variable ``name``, else ``default``."""
    value = os.environ.get(name, str(default))
    try:
        number = int(value)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a positive integer; got {value!r}") from None
    if number < 1:
        raise pytest.UsageError(f"{name} must be a positive integer; got {value!r}")
    return number


def bench_bands() -> int:
    """Bands of the benchmark cube, from ``GGRAD_BENCH_BANDS`` (default 1000)."""
    return env_int("GGRAD_BENCH_BANDS", 1000)


@pytest.fixture(scope="session")
def phantom():
    """The default 350 x 415 phantom (seed 0) with ``GGRAD_BENCH_BANDS`` bands."""
    return make_phantom(seed=0, bands=bench_bands())


@pytest.fixture(scope="session")
def guide(phantom):
    """The phantom's 350 x 415 float32 guide."""
    return phantom.guide


@pytest.fixture(scope="session")
def cube(phantom):
    """The phantom's cube on the guide grid, 350 x 415 x bands float32 (built once)."""
    return phantom.cube_on_guide


def pytest_addoption(parser):
    """Options of the stage suite (``test_stages.py``); each falls back to an environment variable."""
    group = parser.getgroup("ggrad_gpu stage benchmarks")
    group.addoption(
        "--bench-sizes",
        default=None,
        help="sizes of test_stages.py: 'small' (default), 'all' or a comma list of RxCxB; "
        "else $GGRAD_BENCH_SIZES",
    )
    group.addoption(
        "--bench-backends",
        default=None,
        help="backends of test_stages.py: comma list of numpy, cupy, scipy (default: all; "
        "CuPy skipped where not usable); else $GGRAD_BENCH_BACKENDS",
    )
    group.addoption(
        "--bench-rounds",
        type=int,
        default=None,
        help="timed rounds per case in test_stages.py (default 3); else $GGRAD_BENCH_ROUNDS",
    )


@pytest.fixture(scope="session")
def summary():
    """Session-wide dict where benchmarks leave the figures for the final summary."""
    return _SUMMARY


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the figures that compare benchmarks with each other."""
    if not _SUMMARY:
        return
    terminalreporter.write_sep("=", "ggrad_gpu benchmark summary")
    for line in summary_lines(_SUMMARY):
        terminalreporter.write_line(line)


def summary_lines(summary: dict) -> list[str]:
    """Lines of the end-of-run summary; whatever a partial run did not measure is left out.

    Parameters
    ----------
    summary : dict
        The session's ``_SUMMARY``, as filled by ``test_estimate.py`` and
        ``test_refine.py``.
    """
    lines = []
    stages = summary.get("stages", {})
    ggrad, plain = summary.get("ggrad"), summary.get("plain")
    gemm = summary.get("gemm_gflops", {})
    if "shape" in summary:
        rows, cols, bands = summary["shape"]
        lines.append(f"estimate at {rows} x {cols} x {bands}, NumPy backend")

    def stage_sum(prefix):
        times = [entry["mean"] for name, entry in stages.items() if name.startswith(prefix)]
        return sum(times) if times else None

    if ggrad and plain and ggrad["mean"] and plain["mean"]:
        lines.append(
            f"end to end: plain SciPy {plain['mean']:.2f} s / ggrad_gpu {ggrad['mean']:.2f} s (mean)"
            f" = {plain['mean'] / ggrad['mean']:.1f}x"
        )
    pyramid, guide_stage, sobel_gram = stage_sum("cube pyramid"), stage_sum("guide"), stage_sum("Sobel+Gram")
    if plain and None not in (pyramid, guide_stage, sobel_gram):
        ours = pyramid + guide_stage + sobel_gram
        theirs = plain["timings"]["pyramid_sobel_matrix"]
        lines.append(
            f"Sobel + Gram stages alone: plain pyramid+Sobel+matrix {theirs:.2f} s / ggrad_gpu pyramids"
            f"+Sobel+Gram {ours:.2f} s = {theirs / ours:.1f}x"
        )
    nnls = stage_sum("NNLS")
    if plain and nnls:
        theirs = plain["timings"]["nnls"]
        lines.append(f"NNLS: scipy.optimize.nnls on A_k {theirs:.2f} s / nnls_gram {nnls:.3f} s = {theirs / nnls:.0f}x")
    if plain:
        t = plain["timings"]
        lines.append(
            f"plain stages: pyramid+Sobel+matrix {t['pyramid_sobel_matrix']:.2f} s, nnls {t['nnls']:.2f} s,"
            f" rest {t['rest']:.2f} s"
        )
    if stages:
        lines.append("ggrad_gpu stages (mean):")
        for name, entry in stages.items():
            rates = []
            if "gflops" in entry:
                rates.append(f"{entry['gflops']:.1f} GFLOP/s (N*L^2)")
            if "gbps" in entry:
                rates.append(f"{entry['gbps']:.2f} GB/s")
            lines.append(f"  {name:<22} {entry['mean'] * 1e3:10.2f} ms  {', '.join(rates)}")
    if gemm:
        quoted = ", ".join(f"{dtype} {rate:.1f}" for dtype, rate in gemm.items())
        lines.append(f"GEMM a.T @ b (8192 x 1000 operands, 2*M*N*K): {quoted} GFLOP/s")
        gram = [entry for name, entry in stages.items() if name.startswith("Sobel+Gram")]
        if gram:
            # All levels together: total SYRK flops over total time. Quoted against
            # both GEMM rates: the Gram's product precision is ggrad_gpu's choice.
            overall = sum(e["gflops"] * e["mean"] for e in gram) / sum(e["mean"] for e in gram)
            versus = ", ".join(f"{overall / rate:.0%} of {dtype} GEMM" for dtype, rate in gemm.items())
            lines.append(f"Sobel+Gram rate, all levels: {overall:.1f} GFLOP/s (N*L^2 count) = {versus}")
    if "copy_gbps" in summary:
        lines.append(f"memory bandwidth, np.copyto of the cube (read + write): {summary['copy_gbps']:.1f} GB/s")
    if ggrad or plain:
        lines.append(
            "active bands per level: ggrad_gpu "
            f"{ggrad['active_bands'] if ggrad else '-'}, plain {plain['active_bands'] if plain else '-'}"
        )
    if plain and plain.get("ggrad_objective") is not None:
        lines.append("NNLS objective ||A_k x_k - b_k||^2 per level (ggrad_gpu / SciPy - 1):")
        for k, (ours, theirs) in enumerate(zip(plain["ggrad_objective"], plain["objective"])):
            lines.append(f"  level {k}: ggrad_gpu {ours:.9e}, SciPy {theirs:.9e}, {ours / theirs - 1:+.2e}")
    if ggrad:
        lines.append(
            f"peak extra memory of estimate_global_gradient (tracemalloc): {ggrad['peak_bytes'] / 2**20:.0f} MiB"
            f" = {ggrad['peak_ratio']:.3f} x cube.nbytes"
        )
    if plain:
        # For scale: the plain way's level-0 matrix alone, float64 pixels x bands.
        lines.append("the plain way's explicit float64 A_0 alone is 2 x cube.nbytes (float32 cube)")
    if any(key in summary for key in ("refine_sweep", "refine_tissue_sweep", "refine_speed")):
        # Filled by test_refine.py; its formatting lives beside its peers.
        from benchmarks.peers import refine_summary_lines

        lines.extend(refine_summary_lines(summary))
    return lines
