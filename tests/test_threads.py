"""ggrad_gpu._threads: the host threads a stage may use, and the pool that runs its parts."""

import multiprocessing
import os
import threading
import time

import pytest
from threadpoolctl import threadpool_limits

from ggrad_gpu._threads import host_threads, parallel, spans


def test_host_threads_follow_the_blas_limit():
    with threadpool_limits(limits=1, user_api="blas"):
        assert host_threads() == 1
    assert host_threads() >= 1


@pytest.mark.parametrize("count, parts, minimum", [(0, 3, 1), (1, 4, 1), (10, 3, 1), (10, 4, 5), (7, 7, 1), (5, 9, 2)])
def test_spans_cover_every_item_once_in_runs_of_at_least_the_minimum(count, parts, minimum):
    runs = spans(count, parts, minimum=minimum)
    covered = [i for start, stop in runs for i in range(start, stop)]
    assert covered == list(range(count))
    assert len(runs) <= parts
    assert len(runs) <= 1 or min(stop - start for start, stop in runs) >= minimum


def test_parallel_keeps_the_order_and_uses_other_threads():
    seen = set()

    def work(item):
        seen.add(threading.get_ident())
        time.sleep(0.02)  # long enough for the pool's threads to take their items
        return item * item

    assert parallel(work, range(6)) == [i * i for i in range(6)]
    assert threading.get_ident() in seen and len(seen) > 1


def test_parallel_waits_for_every_item_before_it_raises():
    finished = []

    def work(item):
        if item == 0:
            raise ValueError("first item")
        time.sleep(0.05)
        finished.append(item)
        return item

    with pytest.raises(ValueError, match="first item"):
        parallel(work, range(4))
    assert sorted(finished) == [1, 2, 3]  # none left running behind the error


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX only")
def test_a_forked_child_gets_a_pool_of_its_own():
    from ggrad_gpu import _threads

    def slow(item):
        time.sleep(0.05)
        return item

    parallel(slow, range(4 * _threads.usable_cores()))  # the parent's pool now holds all its threads, idle
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        # The child's copy of the pool counts those threads idle but has none of them: without a
        # pool of its own, what it hands over would never run.
        items = list(range(-_threads.usable_cores() - 1, 0))
        result = pool.apply_async(parallel, (abs, items))
        assert result.get(timeout=30) == [abs(i) for i in items]
