"""Communication for data-parallel training, overlapped with backward.

A leaf package: it depends on torch only, so ``thruput.memory`` (ZeRO-2) and the training
loop can both build on it.

Usage (DDP-style averaging)::

    buckets = GradientBuckets(model.parameters(), bucket_mb=25)
    loss.backward()                    # buckets launch async all-reduces as grads become ready
    exposed_s = buckets.finish()       # wait for the rest; p.grad now holds the rank mean
    optimizer.step()

ZeRO-2: ``GradientBuckets(params, op="reduce_scatter", on_shard=fn)`` calls ``fn(bucket, shard)``
with this rank's averaged shard of each bucket; ``bucket.shard_pieces(rank)`` maps the shard
to ``(param, param_start, param_end, shard_start)`` ranges of the flattened parameters.
"""
from thruput.comm.buckets import Bucket, GradientBuckets, plan_buckets

__all__ = ["Bucket", "GradientBuckets", "plan_buckets"]
