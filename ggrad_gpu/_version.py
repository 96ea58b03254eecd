"""The package's version, from its installed metadata (a source tree without it reads ``0.0.0+unknown``).

Examples
--------
>>> from ggrad_gpu._version import __version__
>>> isinstance(__version__, str)
True
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ggrad_gpu")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
