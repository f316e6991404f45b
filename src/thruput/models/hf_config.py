"""The ``[model]`` table of a ``kind = "hf"`` run: a Hugging Face transformers causal LM.

Torch- and transformers-free (read before either is imported); the kind itself is
``thruput.hf.model_kind``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class HFModelConfig:
    """A transformers causal LM, from a local folder or randomly initialised from a config.

    * ``hf``: a folder with ``config.json`` and safetensors weights (``from_pretrained``, never
      the network); its ``tokenizer.json`` is the run's tokenizer unless ``data.tokenizer`` is set.
    * ``hf_config``: ``AutoConfig.for_model`` keys, ``model_type`` first: random init.
      Exactly one of ``hf`` and ``hf_config``.
    * ``dtype``: the weights' dtype. ``"bfloat16"`` needs ``optimizer.kind = "offload_adamw"``
      (its fp32 master weights live on the host); autocast is the run's ``dtype``, as for the GPT.
    * ``activation_checkpointing``: recompute each layer's activations in backward.
    * ``lora``: ``peft.LoraConfig`` keys (``r``, ``lora_alpha``, ``target_modules``, ...): only the
      adapter weights train and reach the optimizer.
    """

    kind: Literal["hf"] = "hf"
    hf: str | None = None
    hf_config: dict[str, Any] | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    activation_checkpointing: bool = False
    lora: dict[str, Any] | None = None

    def check(self, run: Any) -> None:
        """Cross-table checks against the ``RunConfig`` ``run``; ``ConfigError`` naming the key."""
        from thruput.config import ConfigError

        if (self.hf is None) == (self.hf_config is None):
            raise ConfigError("model.hf: give exactly one of model.hf (a folder to load) and model.hf_config "
                              "(a config to initialise randomly)")
        if self.hf_config is not None and not isinstance(self.hf_config.get("model_type"), str):
            raise ConfigError("model.hf_config.model_type: required (a transformers model type, e.g. 'llama')")
        if self.dtype == "bfloat16" and run.optimizer.kind != "offload_adamw":
            raise ConfigError("model.dtype: 'bfloat16' weights need optimizer.kind = 'offload_adamw' (fp32 master "
                              "weights on the host); for torch AdamW keep fp32 weights and set dtype = 'bfloat16' "
                              "(autocast)")
        if run.kernels.compile:
            raise ConfigError("kernels.compile: not supported for model.kind = 'hf' (set it to false)")
