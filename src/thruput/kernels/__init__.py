"""Fused kernels and compile policy.

* :func:`linear_cross_entropy` -- LM head + cross-entropy in chunks, gradients in the same pass
  (pure torch on any device; a Triton row kernel on CUDA).
* :func:`compile` -- torch.compile with shape buckets, recompile/compile-time accounting
  (:meth:`BucketedCompiled.stats`) and a loud eager fallback.
"""
from thruput.kernels.compile import BucketedCompiled, compile
from thruput.kernels.cross_entropy import default_chunk_size, linear_cross_entropy

__all__ = ["BucketedCompiled", "compile", "default_chunk_size", "linear_cross_entropy"]
