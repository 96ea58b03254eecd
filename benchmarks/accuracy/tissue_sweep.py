"""Accuracy of refine against SimpleITK peers on tissue phantoms from an IHC micrograph (RESULTS.md, "Tissue sweep").

``python benchmarks/accuracy/tissue_sweep.py [--cases 20] [--bands 100] [--image ihc.png]``:
the drawn cases (see ``sweep.py``) on ``make_tissue_phantom(rgb, bands=..., seed=case, ...)``:
the guide is the luminance of the micrograph's central 350 x 415 crop, the
native 70 x 83 x bands cube's component maps come from its colour
deconvolution. The image defaults to ``$GGRAD_DATA/ihc-brightfield/ihc.png``,
else ``shared/data/ihc-brightfield/ihc.png`` beside the repository. Wall
times are in the JSON, not in the table. Needs SimpleITK and Pillow.
"""

import os
import sys
from pathlib import Path

import numpy as np
from sweep import REPOSITORY, parser, report, run

from ggrad_gpu.synthetic import make_tissue_phantom


def default_image() -> Path:
    data = os.environ.get("GGRAD_DATA")
    folder = Path(data) if data else REPOSITORY.parent / "shared" / "data"
    return folder / "ihc-brightfield" / "ihc.png"


def main(argv=None) -> int:
    arguments = parser(__doc__.splitlines()[0], default_json="refine_tissue_cases.json")
    arguments.add_argument("--image", type=Path, default=None, help="the RGB micrograph (default: see above)")
    args = arguments.parse_args(argv)
    path = args.image or default_image()
    if not path.is_file():
        arguments.error(f"the IHC micrograph {path.name} was not found (give --image or set GGRAD_DATA)")
    from PIL import Image

    with Image.open(path) as png:
        rgb = np.asarray(png.convert("RGB"))
    sweep = run(args.cases, lambda case: make_tissue_phantom(rgb, bands=args.bands, **case.phantom_kwargs()))
    return report(sweep, title="refine tissue sweep (ihc.png)", path=args.json, seconds=False,
                  starts=("truth", "nudged"))


if __name__ == "__main__":
    sys.exit(main())
