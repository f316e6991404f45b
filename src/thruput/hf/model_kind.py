"""Model kind ``"hf"``: a transformers causal LM as ``thruput train`` trains it.

``[model] hf = "DIR"`` loads ``DIR`` with ``from_pretrained`` (local files only: thruput never
reaches the network); ``hf_config = { model_type = ..., ... }`` initialises one randomly. The
model is patched (:func:`thruput.hf.patch`): per-document attention over the Loader's packed
rows always, thruput's fused loss with ``kernels.fused_cross_entropy``. A peft LoRA wrap
(``lora``) leaves only the adapters trainable, so only they reach the optimizer.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import transformers

from thruput.config import ConfigError
from thruput.hf.batch import hf_batch
from thruput.hf.patch import _unwrap, patch
from thruput.models.hf_config import HFModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class HFModel:
    """A :class:`~thruput.models.kinds.TrainModel` around a patched transformers causal LM."""

    def __init__(self, module: torch.nn.Module, tokenizer: str | None) -> None:
        self.module = module
        self.tokenizer = tokenizer
        config = _base(module).config
        self.layers, self.width = config.num_hidden_layers, config.hidden_size
        embedding = _base(module).get_input_embeddings().weight.numel()
        self.matmul_params = sum(p.numel() for p in module.parameters()) - embedding
        # Learned absolute positions (GPT-2) have a table of n_positions rows: a piece that
        # continues a long document would index past it. Each piece starts at 0 instead, as the
        # blocks of transformers' own causal-LM recipe (group_texts) do; rotary models keep the
        # document's positions.
        self.positions_per_piece = getattr(config, "rope_parameters", None) is None

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.positions_per_piece and "segment_ids" in batch:
            batch = {**batch, "position_ids": piece_positions(batch["segment_ids"])}
        return self.module(**hf_batch(batch)).loss

    def flops(self, batch: Mapping[str, Any]) -> float:
        """6N per token (N: parameters but the input embedding) plus 12 * layers * hidden * the
        mean per-token context, sum(L_i^2) / T over the row's documents (PaLM, appendix B)."""
        lengths = batch["cu_seqlens"].diff().to(torch.float64)
        tokens = batch["input_ids"].numel()
        context = float((lengths**2).sum()) / tokens
        return (6 * self.matmul_params + 12 * self.layers * self.width * context) * tokens

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def counters(self) -> dict[str, float]:
        return {}

    def fallbacks(self) -> dict[str, str]:
        return {}

    def save(self, directory: Path) -> None:
        """``save_pretrained`` (safetensors) and the run's tokenizer files;
        with LoRA the adapters alone, in peft's format (``PeftModel.from_pretrained``)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.module.save_pretrained(directory)  # the attention implementation is not saved: loads anywhere
        if self.tokenizer is not None:
            source = Path(self.tokenizer)
            folder = source if source.is_dir() else source.parent
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, directory / name)


def piece_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions counted from 0 at the start of every piece (a change of ``segment_ids``) of each row."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    return index - torch.where(starts, index, torch.zeros_like(index)).cummax(1).values


def _base(module: torch.nn.Module) -> Any:
    """The transformers model inside a peft wrap (or ``module`` itself)."""
    return _unwrap(module)


def _folder(model_cfg: HFModelConfig) -> Path:
    """``model.hf`` as a local folder holding a config and safetensors weights."""
    folder = Path(model_cfg.hf)
    if not folder.exists():
        hub_like = "/" in model_cfg.hf and not model_cfg.hf.startswith((".", "/", "~"))
        hint = (f" (thruput loads models from disk only, never the network: download it first, e.g. "
                f"`hf download {model_cfg.hf} --local-dir DIR`, and set model.hf = DIR)") if hub_like else ""
        raise ConfigError(f"model.hf: folder '{folder}' does not exist{hint}")
    if not folder.is_dir():
        raise ConfigError(f"model.hf: '{folder}' is not a folder (give the folder of config.json)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.hf: '{folder}' has no config.json")
    if not list(folder.glob("*.safetensors")):
        raise ConfigError(f"model.hf: '{folder}' has no safetensors weights (*.safetensors)")
    return folder


def _check_weights(folder: Path) -> None:
    """Open each safetensors file's header, so that a torn or corrupt shard is named."""
    from safetensors import SafetensorError, safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(shard, "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"model.hf: '{shard}' does not load: {_first_line(exc)}") from None


def hf_config(model_cfg: HFModelConfig) -> transformers.PretrainedConfig:
    """The transformers config of the model: ``model.hf``'s config.json or ``model.hf_config``."""
    if model_cfg.hf is not None:
        folder = _folder(model_cfg)
        try:
            return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ConfigError(f"model.hf: '{folder / 'config.json'}': {_first_line(exc)}") from None
    keys = dict(model_cfg.hf_config or {})
    model_type = keys.pop("model_type")
    from huggingface_hub.errors import StrictDataclassError

    try:
        return transformers.AutoConfig.for_model(model_type, **keys)
    except StrictDataclassError as exc:  # the config's own validation: its reason is on a later line
        raise ConfigError(f"model.hf_config: {str(exc).splitlines()[-1].strip()}") from None
    except ValueError as exc:
        if model_type not in transformers.CONFIG_MAPPING:
            raise ConfigError(f"model.hf_config.model_type: unknown transformers model type {model_type!r} "
                              f"(e.g. llama, mistral, qwen2, qwen3, gemma, gpt2)") from None
        raise ConfigError(f"model.hf_config: {_first_line(exc)}") from None


def vocab_size(model_cfg: HFModelConfig) -> tuple[str, int]:
    key = "model.hf_config.vocab_size" if model_cfg.hf is None else f"model.hf ('{model_cfg.hf}' config.json vocab_size)"
    return key, int(hf_config(model_cfg).vocab_size)


def transformer_shape(model_cfg: HFModelConfig) -> dict[str, float]:
    """Hidden size, layers, vocabulary and MLP width ratio from the model's transformers config
    (the standard attribute names, which every family maps)."""
    config = hf_config(model_cfg)
    hidden = int(config.hidden_size)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return {"d_model": hidden, "n_layers": int(config.num_hidden_layers), "vocab_size": int(config.vocab_size),
            "mlp_ratio": inner / hidden}


def tokenizer(model_cfg: HFModelConfig) -> str | None:
    """The model folder, when it holds a ``tokenizer.json``."""
    if model_cfg.hf is not None and (Path(model_cfg.hf) / "tokenizer.json").is_file():
        return model_cfg.hf
    return None


def build(cfg: Any, device: torch.device) -> HFModel:
    """The run's model on ``device``: loaded or randomly initialised (from the current torch
    seed), in ``model.dtype``, patched, with activation checkpointing and LoRA as configured."""
    m: HFModelConfig = cfg.model
    config, dtype = hf_config(m), _DTYPES[m.dtype]
    longest = getattr(config, "max_position_embeddings", None)
    if getattr(config, "rope_parameters", None) is None and longest is not None and cfg.data.seq_len > longest:
        where = "model.hf_config" if m.hf is None else f"model.hf ('{m.hf}' config.json)"
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is longer than the model's {longest} learned "
                          f"positions ({where})")
    if m.hf is not None:
        _check_weights(_folder(m))
        try:
            module = transformers.AutoModelForCausalLM.from_pretrained(
                _folder(m), config=config, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:  # e.g. a shard's tensors do not fit the config
            raise ConfigError(f"model.hf: cannot load the weights in '{m.hf}': {_first_line(exc)}") from None
    else:
        try:
            module = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as exc:  # a config type that is no causal LM
            raise ConfigError(f"model.hf_config: {_first_line(exc)}") from None
    module.to(device).train()
    if m.activation_checkpointing:
        # Non-reentrant: frozen inputs (LoRA) still get their layers' gradients. The method's name
        # before transformers deprecated gradient_checkpointing_enable is the fallback.
        enable = getattr(module, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora is not None:
        module = _with_lora(module, m.lora)
    try:
        patch(module, loss=cfg.kernels.fused_cross_entropy)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {_first_line(exc)}") from None
    return HFModel(module, cfg.data.tokenizer)


def _with_lora(module: torch.nn.Module, keys: dict[str, Any]) -> torch.nn.Module:
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora: needs peft: pip install 'thruput[hf]'") from None
    try:
        config = peft.LoraConfig(task_type="CAUSAL_LM", **keys)
        with warnings.catch_warnings():  # peft asks transformers by the name it deprecated: not the user's doing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(module, config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.lora: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
