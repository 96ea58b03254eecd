"""Peak resident memory of a process tree, sampled while a block runs, and its CPU time (the benchmarks' figures)."""

from __future__ import annotations

import threading


def tree_rss(process) -> int:
    """Resident bytes of ``process`` (a ``psutil.Process``) and all its children; 0 once it has ended."""
    import psutil

    try:
        total = process.memory_info().rss
        children = process.children(recursive=True)
    except psutil.Error:  # the process has ended
        return 0
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:  # a child that just ended
            pass
    return total


def tree_cpu_seconds(process) -> float:
    """User and system CPU seconds of ``process`` (a ``psutil.Process``) and all its living children.

    The difference of two calls is the CPU a block used in processes that
    lived through it (a child that ended in between is not counted): on a
    shared machine, what the work cost whatever the load.
    """
    import psutil

    total = 0.0
    try:
        members = [process] + process.children(recursive=True)
    except psutil.Error:  # the process has ended
        return 0.0
    for member in members:
        try:
            times = member.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # a child that just ended
            pass
    return total


class PeakMemory:
    """The largest resident memory summed over a process and its children while the block runs.

    ``process`` is a ``psutil.Process`` (default: this one); it is sampled
    every ``interval`` seconds, and on entry and exit. ``cpu_seconds``: the
    CPU the tree used in the block (:func:`tree_cpu_seconds`).
    """

    def __init__(self, process=None, interval=0.05):
        import psutil

        self.process = psutil.Process() if process is None else process
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def total(self) -> int:
        return tree_rss(self.process)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.cpu_seconds = -tree_cpu_seconds(self.process)
        self.peak = self.total()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())
        self.cpu_seconds += tree_cpu_seconds(self.process)
