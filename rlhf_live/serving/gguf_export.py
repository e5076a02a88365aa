"""The trained policy as llama.cpp files: the base's exact served weights as a GGUF model, an adapter as a GGUF LoRA.

Knows PEFT's saved LoRA layout, transformers' tensor names and llama.cpp's formats (tensor names, the q/k row
permutation, `general.type=adapter`, `adapter.lora.alpha`), the same mapping as llama.cpp's `convert_hf_to_gguf.py`
and `convert_lora_to_gguf.py`; knows nothing of serving, training or SQL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file

PERMUTED_QK = {"llama"}
"""Architectures whose base conversion interleaves q/k rows for llama.cpp's rope (convert_hf_to_gguf.py's
LlamaModel.permute); a LoRA B on q/k must be permuted the same way or the adapter is silently corrupted."""

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class GGUFExportError(ValueError):
    """The model or adapter cannot be expressed in llama.cpp's format (layout, options or architecture)."""


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved order, exactly as the base weights were converted."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _read_lora(adapter_dir: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """A PEFT LoRA folder's config and its A/B weights by module, in float32; refuses what llama.cpp cannot express."""
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    if lora.get("peft_type") != "LORA" or lora.get("use_dora") or lora.get("use_rslora"):
        raise GGUFExportError(f"{adapter_dir}: only plain LoRA converts or merges (no DoRA, no rsLoRA).")
    if lora.get("rank_pattern") or lora.get("alpha_pattern") or lora.get("modules_to_save"):
        raise GGUFExportError(f"{adapter_dir}: per-module ranks/alphas and modules_to_save do not convert or merge.")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        match = _KEY.match(key)
        if not match:
            raise GGUFExportError(f"{adapter_dir}: unexpected tensor {key!r} (not a LoRA A/B weight).")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor.astype(np.float32)
    return lora, pairs


def write_gguf_lora(adapter_dir: str | Path, base_config: dict, out: str | Path) -> Path:
    """Write `adapter_dir` (a PEFT LoRA folder) as a GGUF LoRA for the base described by `base_config` (config.json)."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    lora, pairs = _read_lora(adapter_dir)
    arch, names, n_head, n_head_kv = _layout(base_config)

    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora["lora_alpha"]))
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise GGUFExportError(f"{adapter_dir}: {module} has only lora_{''.join(ab)}.")
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None or module.endswith("lm_head"):  # tied embeddings: llama.cpp has no separate head
            raise GGUFExportError(f"{adapter_dir}: no llama.cpp tensor for {module}.")
        a, b = ab["A"], ab["B"]  # (r, in), (out, r): llama.cpp computes B (A x) on the same shapes
        b = _rows_for_llamacpp(module, b, arch, n_head, n_head_kv)  # B's rows are the output rows q/k permute
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b))
    return _write(writer, out)


def write_gguf_model(state_dict: dict, base_config: dict, template: str | Path, out: str | Path, qtype: str) -> Path:
    """Write the served base weights (`state_dict`, transformers names) as a GGUF model with `template`'s metadata."""
    arch, names, n_head, n_head_kv = _layout(base_config)
    if qtype not in QTYPES:
        raise GGUFExportError(f"GGUF type must be one of {', '.join(QTYPES)}, not {qtype!r}.")
    reader = gguf.GGUFReader(template)
    writer = gguf.GGUFWriter(None, arch)
    for field in reader.fields.values():  # tokenizer, chat template, hyperparameters: as the original file says
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    writer.add_file_type(QTYPES[qtype][1])
    written = set()
    for key, tensor in state_dict.items():
        if key == "lm_head.weight" and base_config.get("tie_word_embeddings"):
            continue
        target = names.get_name(key, try_suffixes=(".weight",))
        if target is None:
            raise GGUFExportError(f"no llama.cpp tensor for {key}.")
        if not tensor.is_floating_point():
            raise GGUFExportError(f"{key} is stored packed ({tensor.dtype}): export the dequantized weights.")
        data = tensor.detach().float().cpu().numpy()  # bf16 -> fp32 is exact
        module = key.removesuffix(".weight")
        if data.ndim == 2:
            data = _rows_for_llamacpp(module, data, arch, n_head, n_head_kv)
            qt = QTYPES[qtype][0]
            data = gguf.quants.quantize(np.ascontiguousarray(data), qt)
            writer.add_tensor(target, data, raw_dtype=qt)
        else:  # norms stay fp32, as llama.cpp's converter keeps them
            writer.add_tensor(target, np.ascontiguousarray(data))
        written.add(target)
    expected = {t.name for t in reader.tensors}
    if written != expected:
        raise GGUFExportError(
            f"tensors differ from {template}: missing {sorted(expected - written)[:4]}, "
            f"extra {sorted(written - expected)[:4]}"
        )
    return _write(writer, out)


QTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
"""Weight types the served base can be written in: f32/bf16 hold NF4's dequantized values exactly, f16 nearly."""


def _layout(base_config: dict):
    """(architecture, transformers->llama.cpp name map, heads, kv heads) of a transformers config.json."""
    arch = base_config.get("model_type", "")
    try:
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(base_config["num_hidden_layers"]))
    except KeyError as exc:
        raise GGUFExportError(f"llama.cpp has no architecture {arch!r}.") from exc
    n_head = int(base_config["num_attention_heads"])
    return arch, names, n_head, int(base_config.get("num_key_value_heads") or n_head)


def _rows_for_llamacpp(module: str, rows: np.ndarray, arch: str, n_head: int, n_head_kv: int) -> np.ndarray:
    """Output rows of q/k in llama.cpp's order for architectures whose conversion permutes them; others as they are."""
    if arch in PERMUTED_QK and module.endswith("q_proj"):
        return _permute(rows, n_head)
    if arch in PERMUTED_QK and module.endswith("k_proj"):
        return _permute(rows, n_head_kv)
    return rows


def _write(writer: gguf.GGUFWriter, out: str | Path) -> Path:
    """Write atomically: a reader never sees half a file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _key(*parts: object) -> str:
    return hashlib.sha1(":".join(str(p) for p in parts).encode()).hexdigest()[:12]


def cached_model_gguf(state_dict: dict, base_config: dict, template: Path, cache_dir: str | Path, qtype: str) -> Path:
    """The served base as GGUF in `cache_dir`, written once per source file, weight type and quantization."""
    stat = template.stat()
    # NF4 of the same source weights is deterministic, so the source file, the quantization and the dtype the
    # weights are held in (bf16 or fp32 compute) name the result.
    dtypes = sorted({str(v.dtype) for v in state_dict.values()})
    key = _key(
        template.resolve(), stat.st_size, stat.st_mtime_ns, qtype, base_config.get("quantization_config"), dtypes
    )
    out = Path(cache_dir).expanduser() / "gguf" / f"{template.stem}-served-{qtype}-{key}.gguf"
    return out if out.is_file() else write_gguf_model(state_dict, base_config, template, out, qtype)


def merge_lora(base_state: dict, adapter_dir: str | Path) -> dict:
    """The served base weights (transformers names) with a PEFT LoRA folded in: W + alpha / r * B @ A, in float32."""
    adapter_dir = Path(adapter_dir)
    lora, pairs = _read_lora(adapter_dir)
    scale = float(lora["lora_alpha"]) / float(lora["r"])  # PEFT's LoraLayer.scaling for plain LoRA
    merged = dict(base_state)
    for module, ab in pairs.items():
        key = f"{module}.weight"
        if set(ab) != {"A", "B"} or key not in base_state:
            raise GGUFExportError(f"{adapter_dir}: {module} does not fit the base model.")
        w = base_state[key].detach().float().cpu().numpy()  # (out, in)
        delta = scale * (ab["B"] @ ab["A"])  # (out, r) @ (r, in)
        if delta.shape != w.shape:
            raise GGUFExportError(f"{adapter_dir}: {module} is {delta.shape}, the base weight {w.shape}.")
        merged[key] = torch.from_numpy(w + delta)
    return merged


def cached_merged_gguf(
    base_state: dict, adapter_dir: str | Path, base_config: dict, template: Path, cache_dir: str | Path, qtype: str
) -> Path:
    """One version as a whole GGUF model (its LoRA merged into the served base) in `cache_dir`, written once."""
    stat = template.stat()
    dtypes = sorted({str(v.dtype) for v in base_state.values()})
    key = _key(template.resolve(), stat.st_size, stat.st_mtime_ns, qtype, dtypes, _digest(adapter_dir))
    out = Path(cache_dir).expanduser() / "gguf" / f"{template.stem}-merged-{qtype}-{key}.gguf"
    if out.is_file():
        os.utime(out)  # used again: recent for prune_cache
        return out
    return write_gguf_model(merge_lora(base_state, adapter_dir), base_config, template, out, qtype)


def _digest(adapter_dir: str | Path) -> str:
    """A content hash of an adapter folder's weights."""
    digest = hashlib.sha1()
    with open(Path(adapter_dir) / "adapter_model.safetensors", "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def cached_lora_gguf(adapter_dir: str | Path, base_config: dict, cache_dir: str | Path) -> Path:
    """An adapter folder as GGUF LoRA in `cache_dir`, keyed by the adapter's content."""
    out = Path(cache_dir).expanduser() / "gguf" / f"lora-{_digest(adapter_dir)}.gguf"
    if out.is_file():
        os.utime(out)
        return out
    return write_gguf_lora(adapter_dir, base_config, out)


def prune_cache(cache_dir: str | Path, keep: set[Path], newest: int) -> list[Path]:
    """Delete per-version files (merged models, LoRAs) beyond the `newest` most recently used, never those in `keep`."""
    # Each version's merged model is a whole model (145-271 MB for SmolLM2-135M), one per round: unpruned, a live app
    # fills its disk. A running llama.cpp process keeps a deleted file it has mapped, so only a restart needs it.
    folder = Path(cache_dir).expanduser() / "gguf"
    files = [*folder.glob("*-merged-*.gguf"), *folder.glob("lora-*.gguf")]
    keep = {Path(p).resolve() for p in keep}
    dropped = []
    for path in sorted(files, key=_mtime, reverse=True)[newest:]:
        if path.resolve() not in keep:
            path.unlink(missing_ok=True)
            dropped.append(path)
    return dropped


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # another process pruned it meanwhile
        return 0.0
