"""LoRA adapters (``peft``) on a Hugging Face backbone: only the adapters train, checkpoints hold only them.

The adapters are injected into the transformers model in place (``peft.get_peft_model``), so the
backbone's hooks, its base model and its LM head stay the same objects and the TRIME loss is computed
exactly as for full fine-tuning. The LM head is never adapted: trime computes the token part from its
weight. A LoRA checkpoint is peft's adapter layout plus trime's meta.json:

    checkpoint_dir/
      adapter_config.json        peft's LoraConfig (rank, alpha, target modules)
      adapter_model.safetensors  the adapter weights, by peft's names (PeftModel.from_pretrained reads them)
      trainer.pt, meta.json      as every trime checkpoint; meta.json names the base model and its fingerprint

Reloading for evaluation loads the base model, the adapter, and merges the adapter into the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from trime.errors import CheckpointError, ConfigError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output layer


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs the peft package: pip install trime[hf]") from None
    return peft


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Inject LoRA adapters of ``rank`` (scale ``alpha / rank``) into ``model`` in place and freeze every other
    weight; returns the PeftModel around it (what saving needs). ``targets``: module names peft matches
    (by suffix); empty: every linear layer of the blocks."""
    peft = _peft()
    head = model.get_output_embeddings()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets) or ALL_LINEAR, lora_dropout=0.0, bias="none"
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"--lora-targets {','.join(targets) or ALL_LINEAR}: {' '.join(str(e).split())[:300]}"
        ) from None
    if model.get_output_embeddings() is not head:
        raise ConfigError(
            "--lora-targets names the LM head; trime computes the token part from its weight: leave it out"
        )
    return wrapped


def save_adapter(wrapped: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter (config and safetensors weights) of a PeftModel into ``directory``; returns the weights file."""
    peft = _peft()
    directory = Path(directory)
    wrapped.peft_config["default"].save_pretrained(str(directory))
    weights = directory / ADAPTER_WEIGHTS
    state = peft.get_peft_model_state_dict(wrapped)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(weights))
    return weights


def load_adapter_weights(wrapped: nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint's adapter weights into a PeftModel (resuming a run, or before merging)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS}; it is not a LoRA checkpoint")
    state = load_file(str(path), device=str(next(wrapped.parameters()).device))
    result = _peft().set_peft_model_state_dict(wrapped, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise CheckpointError(
            f"{path}: adapter weights do not fit the adapters (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def merged(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """``model`` with the adapter of ``directory`` merged into its weights (a plain transformers model again)."""
    peft = _peft()
    try:
        config = peft.LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{directory}: unreadable {ADAPTER_CONFIG} ({' '.join(str(e).split())[:300]})") from None
    wrapped = peft.get_peft_model(model, config)
    load_adapter_weights(wrapped, directory)
    return wrapped.merge_and_unload()
