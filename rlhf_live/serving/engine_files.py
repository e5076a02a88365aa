"""The llama.cpp side of a served version: whether the engine can run, its model files, and starting it.

Knows which weights serving uses (the NF4 values, dequantized, under transformers' names), where the per-version
GGUF files are cached and how many are kept; knows nothing of requests, SQL or training (a round calls
`prebuild_engine_file` through the runtime's hook).
"""

from __future__ import annotations

import os
from pathlib import Path

from peft import PeftModel

from rlhf_live.config import Config
from rlhf_live.model.base import source_gguf
from rlhf_live.model.lora import AdapterError
from rlhf_live.serving import llamacpp as llama
from rlhf_live.serving.gguf_export import cached_lora_gguf, cached_merged_gguf, cached_model_gguf, prune_cache


def served_base(model: PeftModel) -> dict:
    """The base weights serving uses (the dequantized NF4 values), under transformers' names, without any LoRA."""
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    return {k.replace("base_model.model.", "", 1).replace(".base_layer.", "."): v for k, v in state.items()}


def engine_unavailable(cfg: Config, model: PeftModel) -> str:
    """Why llama.cpp cannot serve this model here ('' when it can)."""
    template = source_gguf(cfg)
    state = served_base(model)
    reason = ""
    if not llama.available():
        reason = "the xllamacpp package is not installed"
    elif next(model.parameters()).device.type != "cpu":
        reason = "the model is on CUDA, where torch serves"  # llama.cpp's CPU wheel; CUDA stays on the reference
    elif template is None:
        reason = "the base is not from a GGUF file (llama.cpp needs its tokenizer metadata)"
    elif any(not v.is_floating_point() for v in state.values()):
        reason = "the NF4 weights are packed (--cpu-dequantize is off)"
    return reason


def start_engine(cfg: Config, model: PeftModel) -> llama.LlamaCppEngine | None:
    """llama.cpp on the exact weights `model` serves, when `cfg.engine` asks for it or 'auto' finds it can run."""
    if cfg.engine == "torch":
        return None
    reason = engine_unavailable(cfg, model)
    if reason:
        if cfg.engine == "llamacpp":
            raise llama.EngineError(f"--engine llamacpp cannot run: {reason}.")
        return None
    # Not the original GGUF file: the values the trained adapter was trained against (NF4, dequantized). An adapter
    # trained on NF4 weights moved the next-token distribution 0.61 nats there but 0.10 on the original Q4_1 weights.
    template = source_gguf(cfg)
    path = cached_model_gguf(served_base(model), model.config.to_dict(), template, cfg.cache_dir, cfg.engine_weights)
    threads = cfg.engine_threads or os.cpu_count() or 1
    return llama.LlamaCppEngine(
        path,
        threads=threads,
        parallel=cfg.engine_parallel,
        n_ctx=cfg.max_context_tokens,
        cache_mib=cfg.engine_cache_mib,
        options=engine_options(cfg),
    )


def engine_options(cfg: Config) -> dict:
    """The engine_worker settings Config chooses beyond threads, slots and context (llama.cpp's defaults otherwise)."""
    return {"ubatch": cfg.engine_ubatch} if cfg.engine_ubatch else {}


def version_file(cfg: Config, model: PeftModel, adapter_path: str | Path) -> Path:
    """The engine's file for a version: the whole model with the adapter merged (engine_merge), or a GGUF LoRA."""
    config = model.config.to_dict()
    try:
        if cfg.engine_merge:
            template, qtype = source_gguf(cfg), cfg.engine_weights
            return cached_merged_gguf(served_base(model), adapter_path, config, template, cfg.cache_dir, qtype)
        return cached_lora_gguf(adapter_path, config, cfg.cache_dir)
    except Exception as exc:  # safetensors, gguf and the OS raise many kinds for a bad folder
        raise AdapterError(f"Could not convert the adapter in {adapter_path} for llama.cpp: {exc}") from exc


def prebuild_engine_file(cfg: Config, model: PeftModel | None, adapter_path: str | Path) -> bool:
    """Write the merged llama.cpp model of a published version into the cache, where serving's swap will find it."""
    if model is None or cfg.engine == "torch" or not cfg.engine_merge or not llama.available():
        return False
    template = source_gguf(cfg)
    if template is None or next(model.parameters()).device.type != "cpu":
        return False
    try:
        base = served_base(model)
        path = cached_merged_gguf(
            base, adapter_path, model.config.to_dict(), template, cfg.cache_dir, cfg.engine_weights
        )
    except Exception:  # serving will try again (and report) at the swap
        return False
    prune_engine_files(cfg, {path})
    return True


def prune_engine_files(cfg: Config, keep: set[Path]) -> None:
    """Delete per-version llama.cpp files past as many as the data dir keeps versions (+ live, parent), never `keep`."""
    prune_cache(cfg.cache_dir, keep, newest=cfg.keep_versions + 2)
