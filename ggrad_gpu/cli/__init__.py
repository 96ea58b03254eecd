"""The ``ggrad`` command and the output folders it writes.

- :mod:`~ggrad_gpu.cli.command`: ``ggrad refine | apply | demo | bench``.
- :mod:`~ggrad_gpu.cli.mosaic`: ``ggrad mosaic``.
- :mod:`~ggrad_gpu.cli.outputs`, :mod:`~ggrad_gpu.cli.multi_outputs`: the output folders.
- :mod:`~ggrad_gpu.cli.bench`: ``ggrad bench``.
"""

from .command import main

__all__ = ["main"]
