"""Box-matching post-processing kernels. Callers use these functions, never an implementation directly:
CPU tensors run the torch reference; the Triton kernels plug in here for CUDA tensors."""

from .reference import BoxMatch, box_match, poisson_binomial

__all__ = ["BoxMatch", "box_match", "poisson_binomial"]
