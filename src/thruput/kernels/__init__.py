"""Fused kernels and compile policy.

* :func:`linear_cross_entropy` -- LM head + cross-entropy in chunks, gradients in the same pass.
"""
from thruput.kernels.cross_entropy import default_chunk_size, linear_cross_entropy

__all__ = ["default_chunk_size", "linear_cross_entropy"]
