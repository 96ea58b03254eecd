"""Affine registration of two images (eq. 10), its coarse search, and the measures of a match.

- :mod:`~ggrad_gpu.registration.register`: :func:`register_affine`, the
  coarse search (:func:`~ggrad_gpu.registration.register.coarse_shifts`), the
  displacement covariance of a fit.
- :mod:`~ggrad_gpu.registration.metrics` (also ``ggrad_gpu.metrics``): TRE, NCC, MSE.
"""

from .metrics import TRE, mse, ncc, target_registration_error
from .register import AffineRegistration, register_affine

__all__ = ["TRE", "AffineRegistration", "mse", "ncc", "register_affine", "target_registration_error"]
