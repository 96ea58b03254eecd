"""The paper's stages, each a function of arrays (NumPy in, NumPy out; CuPy in, CuPy out).

- :mod:`~ggrad_gpu.core.filters`: Sobel magnitude (eq. 4).
- :mod:`~ggrad_gpu.core.pyramid`: Gaussian pyramids and upsampling of a level.
- :mod:`~ggrad_gpu.core.nnls`: Gram products and NNLS from them (eq. 5).
- :mod:`~ggrad_gpu.core.level_weights`: the level weights (eq. 9).
- :mod:`~ggrad_gpu.core.estimate`: the global gradient estimate (eqs. 4-9).
- :mod:`~ggrad_gpu.core.warp`: a whole cube through an affine matrix.
- :mod:`~ggrad_gpu.core.coverage`: which pixels hold data, and why the others do not.
- :mod:`~ggrad_gpu.core.geometry`: coordinates, footprints, the working grid.
- :mod:`~ggrad_gpu.core.denoise`: the cube on its signal subspace.
- :mod:`~ggrad_gpu.core.factored`: a cube held as coefficients times a band basis.
- :mod:`~ggrad_gpu.core.baselines`: band sum (eq. 2), band std (eq. 3), first PC.
- :mod:`~ggrad_gpu.core.stage_model`: a mosaic's shared stage correction.

A dask cube is handed by each stage to :mod:`ggrad_gpu._lazy`, with the
stage's own in-memory function; nothing here imports a layer above.
"""

from .estimate import GlobalGradient, estimate_global_gradient
from .filters import sobel_magnitude
from .nnls import gram_products, nnls_gram
from .pyramid import gaussian_pyramid, upsample_level
from .warp import warp_cube

__all__ = ["GlobalGradient", "estimate_global_gradient", "gaussian_pyramid", "gram_products", "nnls_gram",
           "sobel_magnitude", "upsample_level", "warp_cube"]
