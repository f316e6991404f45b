"""A Hugging Face model's size, read from its ``config.json``, for the memory planner.

The parameter count is exact: the config's causal-LM class (``AutoModelForCausalLM``) is built
on the ``meta`` device, which allocates no memory and takes milliseconds even for a 70B model,
and its unique parameters are counted. Formulas per family would miss what differs between
families (tied embeddings, attention biases, grouped-query projections, extra norms, experts);
the model's own constructor does not. It needs transformers (the ``hf`` extra) and reads only
local files: nothing is downloaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from thruput.errors import InputError


@dataclass(frozen=True)
class HFModelShape:
    """What the planner needs of a transformers causal LM: counts from its config and class."""

    path: Path  # the config.json read
    model_type: str
    architecture: str  # the causal-LM class counted, e.g. "LlamaForCausalLM"
    n_params: int  # unique parameters (tied embeddings counted once)
    n_layers: int
    hidden_size: int
    vocab_size: int
    largest_param: int  # elements of the largest parameter (its gradient exists whole at once)

    def describe(self) -> str:
        """One line: ``"llama (LlamaForCausalLM) from PATH: 6,738,415,616 params, 32 layers, ..."``."""
        return (f"{self.model_type} ({self.architecture}) from {self.path}: {self.n_params:,} params, "
                f"{self.n_layers} layers, hidden size {self.hidden_size}, vocab {self.vocab_size:,}")


def _read_json(path: Path) -> dict:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InputError(f"Hugging Face config '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"Hugging Face config '{path}' is not JSON: line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Hugging Face config '{path}' could not be read: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"Hugging Face config '{path}' is not a JSON object")
    return data


def read_hf_config(path: str | Path) -> HFModelShape:
    """The shape of the causal LM that ``path`` (a ``config.json`` or a folder holding one) describes.

    Raises ``InputError`` (one line naming the file) when the file is missing, is not a JSON
    object, has no or an unknown ``model_type``, describes no causal LM, or has values its
    class refuses; ``ImportError`` without transformers.
    """
    path = Path(path)
    data = _read_json(path)
    path = path / "config.json" if path.is_dir() else path
    try:
        import torch
        import transformers
        from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("thruput estimate --hf needs transformers: pip install 'thruput[hf]'") from exc
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise InputError(f"Hugging Face config '{path}' has no \"model_type\" string")
    if model_type not in CONFIG_MAPPING:
        raise InputError(f"Hugging Face config '{path}': unknown model_type {model_type!r} "
                         f"(not a transformers {transformers.__version__} model type, e.g. llama, qwen2, gpt2)")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(data)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"Hugging Face config '{path}' (model_type {model_type!r}): no causal LM built from it: "
                         f"{reason}") from exc
    text = config.get_text_config()
    unique = {id(p): p for p in model.parameters()}
    return HFModelShape(path=path, model_type=model_type, architecture=type(model).__name__,
                        n_params=sum(p.numel() for p in unique.values()), n_layers=int(text.num_hidden_layers),
                        hidden_size=int(text.hidden_size), vocab_size=int(text.vocab_size),
                        largest_param=max((p.numel() for p in unique.values()), default=0))
