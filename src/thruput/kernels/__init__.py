"""Fused kernels and compile policy.

* :func:`linear_cross_entropy` -- LM head + cross-entropy in chunks, gradients in the same pass:
  thruput's chunked kernel (pure torch on any device, a Triton row kernel on CUDA) or torch's
  native chunked op, picked per shape and device by a measured rule.
* :func:`compile` -- torch.compile with shape buckets, recompile/compile-time accounting
  (:meth:`BucketedCompiled.stats`) and a loud eager fallback.
* :func:`fallbacks` -- which kernel fell back to a slower path and why, as plain data.
"""
from thruput.kernels._ce_auto import fallbacks
from thruput.kernels.compile import BucketedCompiled, compile
from thruput.kernels.cross_entropy import default_chunk_size, linear_cross_entropy

__all__ = ["BucketedCompiled", "compile", "default_chunk_size", "fallbacks", "linear_cross_entropy"]
