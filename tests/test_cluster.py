"""The local Dask cluster that ``--workers N`` starts."""

import os

import pytest

from ggrad_gpu.scaleout.cluster import MALLOC_ENVIRON, WORKER_CONFIG, dask_client


@pytest.mark.slow
@pytest.mark.parametrize("config, trim", [(WORKER_CONFIG, MALLOC_ENVIRON), (None, {"MALLOC_TRIM_THRESHOLD_": "65536"})],
                         ids=["mosaic", "refine"])
def test_local_workers_malloc_thresholds(monkeypatch, config, trim):
    """``ggrad mosaic`` passes WORKER_CONFIG (large arrays kept in one heap); a streamed refine keeps Dask's trim."""
    pytest.importorskip("distributed")
    # Dask's nanny writes its settings into the starting process's environment too: start clean.
    names = sorted(MALLOC_ENVIRON)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    with dask_client(workers=1, config=config) as client:
        seen = client.run(lambda: {name: os.environ.get(name) for name in names})
        blas = client.run(lambda: os.environ.get("OPENBLAS_NUM_THREADS"))
        threads = client.nthreads()
    # The mosaic's: large arrays come from one heap, kept between tiles, not mapped and faulted in
    # afresh. Dask's own trim for the refine: its workers' freed cube chunks go back to the system.
    assert list(seen.values()) == [{name: trim.get(name) for name in names}]
    assert list(blas.values()) == ["1"]  # Dask's other settings stay
    assert list(threads.values()) == [1]
    if config is not None:  # the nanny sets its values in this process's environment too: Dask's trim is not one
        assert os.environ.get("MALLOC_TRIM_THRESHOLD_") != "65536"


def test_tasks_in_threads_share_the_cores_blas_threads():
    """Tile tasks run as threads of one process: each gets the cores divided by the tasks in flight, not all."""
    from threadpoolctl import threadpool_info

    from ggrad_gpu.scaleout.tasks import blas_threads, run_tasks

    def blas_in_task(_):
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    if not blas_in_task(None):
        pytest.skip("no BLAS library that threadpoolctl sees")
    before = blas_in_task(None)
    seen = run_tasks(blas_in_task, [(i,) for i in range(4)], max_in_flight=2)
    assert all(threads == {blas_threads(2)} for threads in seen), seen
    assert blas_in_task(None) == before  # restored after the tasks
