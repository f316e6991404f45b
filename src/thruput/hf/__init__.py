"""Hugging Face transformers: every thruput lever on a causal LM, in the loop you have.

* :func:`patch` -- fused linear cross-entropy and per-document attention on one model instance.
* :func:`hf_batch` -- a thruput Loader batch in transformers' convention (for any model).
* :class:`ThruputCallback` -- the step profiler inside ``Trainer`` (reports in ``output_dir``).
* :class:`ThruputTrainer` / :class:`LoaderMixin` -- a thruput Loader as Trainer's training data,
  its position saved in Trainer's checkpoints (exact resumption).

Needs the ``hf`` extra (transformers >= 5): ``pip install 'thruput[hf]'``.
"""
try:
    import transformers
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("thruput.hf needs transformers >= 5: pip install 'thruput[hf]'") from exc

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(f"thruput.hf needs transformers >= 5, found {transformers.__version__}: "
                      "pip install 'thruput[hf]'")

from thruput.hf.batch import hf_batch
from thruput.hf.callback import ThruputCallback
from thruput.hf.patch import patch
from thruput.hf.trainer import LoaderMixin, ThruputTrainer

__all__ = ["LoaderMixin", "ThruputCallback", "ThruputTrainer", "hf_batch", "patch"]
