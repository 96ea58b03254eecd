"""A cube held as per-pixel coefficients times a band basis: ``values = coefficients @ basis``.

A denoised cube (:mod:`ggrad_gpu.core.denoise`) is its mean plus a few
principal components: every pixel's spectrum lies in a space of ``rank``
dimensions, however many bands it has (the paper's geometry: 1000 bands,
16 components). Every step of an estimate before the Sobel magnitude is
linear in each band and the same for all bands (the warp, the pyramid's
blur, the nearest-pixel fill of gaps, the Sobel derivatives), so each can run
on the ``rank`` coefficient images instead of the bands, and the bands'
derivatives follow by one product with the basis each. Only the magnitude
``hypot`` and the Gram products (eq. 5) need every band. The numbers are those
of the dense cube up to the products' rounding.

Per-pixel factors (the normalisation by each spectrum's total) scale the
coefficients; per-band factors and band selections act on the basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._backend import array_module
from .._lazy.chunked import is_dask_array

__all__ = ["FactoredCube", "imagewise", "is_factored"]


@dataclass(frozen=True)
class FactoredCube:
    """A cube ``coefficients @ basis`` of shape ``(rows, cols, bands)``, never made whole.

    Attributes
    ----------
    coefficients : array, shape (rows, cols, rank)
        NumPy or CuPy, floating.
    basis : array, shape (rank, bands)
        Same array module and dtype as ``coefficients``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> cube = FactoredCube(rng.random((4, 5, 2)), rng.random((2, 7)))
    >>> cube.shape, cube.rank
    ((4, 5, 7), 2)
    >>> bool(np.allclose(cube.dense(), np.einsum("rck,kb->rcb", cube.coefficients, cube.basis)))
    True
    >>> bool(np.allclose(cube.bands([6, 1]).dense(), cube.dense()[:, :, [6, 1]]))
    True
    """

    coefficients: object
    basis: object

    @property
    def shape(self) -> tuple:
        return tuple(self.coefficients.shape[:2]) + (int(self.basis.shape[1]),)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def dtype(self):
        return self.coefficients.dtype

    @property
    def ndim(self) -> int:
        return 3

    def dense(self, rows=slice(None), cols=slice(None)):
        """The cube itself (or its ``rows``, ``cols``): one product."""
        part = self.coefficients[rows, cols]
        return (part.reshape(-1, self.rank) @ self.basis).reshape(part.shape[:2] + (self.shape[2],))

    def pixelwise(self, operation) -> "FactoredCube":
        """The cube after ``operation``, an operation on images that is linear and the same for every band.

        ``operation`` receives the coefficients (rows, cols, rank) and returns
        the new ones (any rows and cols): a warp, a blur, a gather.
        """
        return FactoredCube(operation(self.coefficients), self.basis)

    def bands(self, selected) -> "FactoredCube":
        """Only the ``selected`` bands (indices), in that order."""
        xp = array_module(basis=self.basis)
        return FactoredCube(self.coefficients, self.basis[:, xp.asarray(selected)])

    def band_scaled(self, factors) -> "FactoredCube":
        """Each band multiplied by its entry of ``factors`` (bands,); a 0 makes the band 0."""
        xp = array_module(basis=self.basis)
        return FactoredCube(self.coefficients, self.basis * xp.asarray(factors, dtype=self.basis.dtype))

    def pixel_scaled(self, factors) -> "FactoredCube":
        """Each pixel's spectrum multiplied by its entry of ``factors`` (rows, cols; in memory).

        Lazy coefficients (a dask array) are scaled chunk by chunk.
        """
        factors = factors.astype(self.dtype)
        if is_dask_array(self.coefficients):
            import dask.array as da

            factors = da.from_array(factors, chunks=self.coefficients.chunks[:2])
        return FactoredCube(self.coefficients * factors[:, :, None], self.basis)

    def astype(self, dtype, copy: bool = True) -> "FactoredCube":
        """Coefficients and basis in ``dtype``."""
        return FactoredCube(self.coefficients.astype(dtype, copy=copy), self.basis.astype(dtype, copy=copy))

    def totals(self):
        """Each pixel's total over the bands (rows, cols), float64: one product of the coefficients.

        Lazy where the coefficients are (a dask array).
        """
        return (self.coefficients @ self.basis.sum(axis=1)).astype(np.float64)


def imagewise(operation, cube):
    """``operation`` (linear, the same for every band: a warp, a blur, a gather, a checkpoint) of ``cube``.

    A :class:`FactoredCube`'s coefficient images go through it; any other
    cube goes through it whole.

    Examples
    --------
    >>> import numpy as np
    >>> cube = FactoredCube(np.arange(8.0).reshape(2, 2, 2), np.ones((2, 3)))
    >>> flipped = imagewise(lambda images: images[::-1], cube)
    >>> bool(np.array_equal(flipped.dense(), cube.dense()[::-1])), imagewise(np.negative, np.ones(2)).tolist()
    (True, [-1.0, -1.0])
    """
    return cube.pixelwise(operation) if is_factored(cube) else operation(cube)


def is_factored(x) -> bool:
    """Whether ``x`` is a :class:`FactoredCube`.

    Examples
    --------
    >>> import numpy as np
    >>> is_factored(FactoredCube(np.ones((2, 2, 1)), np.ones((1, 3)))), is_factored(np.ones((2, 2, 3)))
    (True, False)
    """
    return isinstance(x, FactoredCube)
