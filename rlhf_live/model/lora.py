"""The policy's LoRA: which modules it targets, how it is attached to a base, and what a valid adapter folder holds.

Knows PEFT and the files of an adapter folder; knows nothing of versions, SQL, serving or training loops.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from rlhf_live.config import Config

BASE = "base"
"""Adapter name meaning 'no adapter' (PEFT's mixed-batch name for the base model)."""
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(RuntimeError):
    """An adapter folder is missing, corrupt or does not fit the base model."""


def check_folder(path: str | Path) -> Path:
    """Raise AdapterError unless `path` holds a readable adapter_config.json and adapter weights."""
    path = Path(path)
    config = path / "adapter_config.json"
    if not config.is_file():
        raise AdapterError(f"{path} has no adapter_config.json: not a PEFT adapter folder.")
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{config} is not valid JSON ({exc}): the adapter folder is corrupt.") from None
    if not any((path / n).is_file() and (path / n).stat().st_size > 0 for n in WEIGHT_FILES):
        raise AdapterError(f"{path} has no adapter_model.safetensors: the adapter weights are missing.")
    return path


def lora_targets(cfg: Config) -> str | list[str]:
    """Config.lora_target as PEFT takes it: 'all-linear' or a list of module names."""
    return cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]


def lora_config(cfg: Config) -> LoraConfig:
    """The policy's LoRA: rank/alpha/targets from Config; dropout 0 so PPO log-probs are deterministic."""
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=lora_targets(cfg),
        task_type="CAUSAL_LM",
    )


def attach_adapter(
    base, cfg: Config, adapter_path: str | Path | None = None, *, trainable: bool = False, name="default"
):
    """Wrap `base` in a PeftModel with a fresh LoRA (B=0: same outputs as base) or one loaded from a folder."""
    if adapter_path:
        folder = check_folder(adapter_path)
        try:
            return PeftModel.from_pretrained(base, str(folder), adapter_name=name, is_trainable=trainable)
        except Exception as exc:
            raise AdapterError(f"Could not load the adapter in {folder}: {type(exc).__name__}: {exc}") from exc
    model = get_peft_model(base, lora_config(cfg), adapter_name=name)
    if not trainable:
        model.requires_grad_(False)
    return model
