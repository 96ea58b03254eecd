"""The local Dask cluster that ``--workers N`` starts."""

import os

import pytest

from ggrad_gpu.cluster import dask_client


@pytest.mark.slow
def test_local_workers_keep_glibcs_adaptive_malloc_thresholds(monkeypatch):
    pytest.importorskip("distributed")
    # Dask's nanny writes its settings into the starting process's environment too: start clean.
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dask_client(workers=1) as client:
        trim = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        blas = client.run(lambda: os.environ.get("OPENBLAS_NUM_THREADS"))
        threads = client.nthreads()
    assert list(trim.values()) == [None]  # unset: every large array is not mapped and faulted in afresh
    assert list(blas.values()) == ["1"]  # Dask's other settings stay
    assert list(threads.values()) == [1]
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
