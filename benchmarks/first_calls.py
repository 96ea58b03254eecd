"""A refine's first calls in a fresh process: on small pages (``refine``'s default) and with NumPy's huge-page mark.

Run ``python -m benchmarks.first_calls`` from the repository root (``--help``
for options). For each case of ``benchmarks.floors.cases`` (the paper's
geometry; one 128 x 128 x 256 tile at 4 guide px per tile px on a 900 x 900
guide) it starts a fresh Python ``--rounds`` times per setting, the two
settings alternating, and times ``refine(guide, cube, initial=...)`` called
``--calls`` times in it, with nothing else set (the library's allocator
defaults, as a user's script has them):

- ``small pages``: as ``refine`` runs by default (``ggrad_gpu._pages``:
  NumPy's huge-page mark off while it runs, where the kernel would stall a
  marked first touch);
- ``NumPy's mark``: ``NUMPY_MADVISE_HUGEPAGE=1`` in the environment, which
  ``refine`` leaves as the user chose: every array of 4 MiB or more marked
  for huge pages, as before.

It prints one Markdown row per process: the seconds of each call, and the
kernel's transparent-huge-page policy. Time it on a quiet machine (``uptime``
load under 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SETTINGS = {"small pages": {}, "NumPy's mark": {"NUMPY_MADVISE_HUGEPAGE": "1"}}

_CHILD = """
import json, sys, time, warnings
from benchmarks.floors import cases
from ggrad_gpu import refine
name, guide, cube, initial = cases({case!r})[0]
seconds = []
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    for _ in range({calls}):
        clock = time.perf_counter()
        refine(guide, cube, initial=initial)
        seconds.append(time.perf_counter() - clock)
print(json.dumps(seconds))
"""


def policy() -> str:
    """The kernel's selected transparent-huge-page ``enabled`` and ``defrag`` policies (or "not Linux")."""
    words = []
    for name in ("enabled", "defrag"):
        try:
            text = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text()
        except OSError:
            return "not Linux"
        words.append(f"{name} {text[text.index('[') + 1:text.index(']')]}" if "[" in text else f"{name} ?")
    return ", ".join(words)


def one_process(case: str, calls: int, environment: dict) -> list[float]:
    """The seconds of each of ``calls`` refines in a fresh Python with ``environment`` added."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("NUMPY_MADVISE_HUGEPAGE", None)
    env.update(environment)
    done = subprocess.run([sys.executable, "-c", _CHILD.format(case=case, calls=calls)], capture_output=True,
                          text=True, env=env, cwd=root, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark's subprocess failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("paper", "tile", "both"), default="both")
    parser.add_argument("--calls", type=int, default=3, help="refines per process (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting (default 2)")
    args = parser.parse_args(argv)
    print(f"kernel: {policy()}; load average {os.getloadavg()[0]:.2f} before")
    print("| case | setting | " + " | ".join(f"call {i + 1}, s" for i in range(args.calls)) + " |")
    print("| --- | --- |" + " ---: |" * args.calls)
    for case in ("paper", "tile") if args.case == "both" else (args.case,):
        for _ in range(args.rounds):
            for setting, environment in SETTINGS.items():
                seconds = one_process(case, args.calls, environment)
                print(f"| {case} | {setting} | " + " | ".join(f"{s:.2f}" for s in seconds) + " |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
