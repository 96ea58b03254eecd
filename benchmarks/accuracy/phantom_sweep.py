"""Accuracy of refine against SimpleITK peers on synthetic phantoms (benchmarks/RESULTS.md, "accuracy against peers").

``python benchmarks/accuracy/phantom_sweep.py [--cases 20] [--bands 100]``: the
drawn cases (see ``sweep.py``) on ``make_phantom(bands=..., seed=case, ...)``
(350 x 415 guide, native 70 x 83 x bands cube). Needs SimpleITK
(``pip install ".[bench]"``); many minutes.
"""

import sys

from sweep import parser, report, run

from ggrad_gpu.synthetic import make_phantom


def main(argv=None) -> int:
    args = parser(__doc__.splitlines()[0], default_json="refine_cases.json").parse_args(argv)
    # signatures="mixed": the phantom of the recorded figures (before make_phantom's default changed).
    sweep = run(args.cases, lambda case: make_phantom(bands=args.bands, signatures="mixed", **case.phantom_kwargs()))
    return report(sweep, title="refine accuracy sweep (phantoms)", path=args.json)


if __name__ == "__main__":
    sys.exit(main())
