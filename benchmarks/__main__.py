"""``python -m benchmarks``: the stage benchmarks' runner (see ``benchmarks/_runner.py``)."""

import sys

from benchmarks._runner import main

if __name__ == "__main__":
    sys.exit(main())
