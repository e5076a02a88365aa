"""Model resolution and loading: the embedded default offline, clear errors for anything unusable."""

import dataclasses

import pytest
import torch
from conftest import build_tiny_lm

from rlhf_live.config import Config
from rlhf_live.model.base import ModelNotAvailable, dequantize_cpu_4bit, disable_cpu_4bit_packing, load_base, resolve


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailable, match="neither a folder"):
        resolve(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(ModelNotAvailable, match="No GGUF file"):
        resolve(str(tmp_path / "missing.gguf"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match="no config.json"):
        resolve(str(tmp_path / "empty"), tmp_path)


def test_unreadable_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelNotAvailable, match="Could not read the GGUF file"):
        resolve(str(bad), tmp_path / "cache")
    assert not list((tmp_path / "cache" / "models").glob("*")), "no half-converted folder is left behind"


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = Config(model="no-such-org/no-such-model", cache_dir=str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="leave --model unset"):
        load_base(cfg)


def test_folder_model_loads_in_full_precision(tiny_cfg):
    model, tok = load_base(tiny_cfg)
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert not model.training


@pytest.mark.slow
def test_default_model_resolves_offline_and_knows_paris(real_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = Config(model=str(real_model_dir), load_in_4bit=True)
    model, tok = load_base(cfg)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_dequantized_nf4_base_computes_the_same_and_trains_only_lora(tiny_cfg, tmp_path):
    """dequantize_cpu_4bit: no 4-bit linear left, the same logits as NF4, and a LoRA on top still trains alone."""
    import bitsandbytes as bnb

    from rlhf_live.model.lora import attach_adapter

    # bitsandbytes' packed CPU kernel (what NF4 runs here) wants every linear's outputs in blocks of 32.
    folder = build_tiny_lm(tmp_path / "lm128", hidden=128)
    cfg = dataclasses.replace(tiny_cfg, model=str(folder), load_in_4bit=True)
    model, _ = load_base(cfg)
    n_linear = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    model.train()  # Llama has no dropout; training mode keeps bitsandbytes on its dequantize+matmul path
    with torch.no_grad():
        nf4 = model(input_ids=ids).logits
    model.eval()
    assert dequantize_cpu_4bit(model) == n_linear > 0
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    assert torch.equal(dense, nf4)  # exactly the values bitsandbytes computes with

    # In eval mode without gradients bitsandbytes repacks the weights for its CPU kernel: too late to dequantize.
    packed, _ = load_base(cfg)
    with torch.no_grad():
        packed(input_ids=ids)
    with pytest.raises(ValueError, match="before the model's first no-grad forward"):
        dequantize_cpu_4bit(packed)

    peft = attach_adapter(model, cfg, trainable=True)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.filterwarnings("ignore:bitsandbytes..gemv_4bit:UserWarning")  # the unguarded case, on purpose
def test_nf4_lora_gradients_are_right_after_a_no_grad_forward(tiny_cfg, tmp_path):
    """After a rollout-like no-grad forward, LoRA gradients on NF4 equal those on the dequantized base."""
    from rlhf_live.model.lora import attach_adapter

    folder = build_tiny_lm(tmp_path / "lm128", hidden=128, layers=3)
    cfg = dataclasses.replace(tiny_cfg, model=str(folder), load_in_4bit=True, lora_target="all-linear")
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 12]])

    def lora_grads(prepare) -> dict[str, torch.Tensor]:
        base, _ = load_base(cfg)
        prepare(base)
        torch.manual_seed(0)
        model = attach_adapter(base, cfg, trainable=True)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # non-zero B: gradients reach every A
        with torch.no_grad():
            model(input_ids=ids)  # the rollout: bitsandbytes would repack its weights here
        model(input_ids=ids).logits.pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    dense = lora_grads(dequantize_cpu_4bit)
    guarded = lora_grads(disable_cpu_4bit_packing)
    packed = lora_grads(lambda base: None)
    assert dense.keys() == guarded.keys() == packed.keys()
    for name in dense:
        torch.testing.assert_close(guarded[name], dense[name], rtol=1e-5, atol=1e-7)
    # What the guard prevents: the packed kernel has no backward, the lowest layer's LoRA gradients are wrong.
    first = [n for n in dense if ".layers.0.self_attn.q_proj.lora_A" in n]
    assert first and all(not torch.allclose(packed[n], dense[n], rtol=0.1) for n in first)


def test_bf16_falls_back_to_float32_on_a_gpu_without_it(monkeypatch):
    from rlhf_live.model.base import dtype_of

    assert dtype_of("bfloat16", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dtype_of("bfloat16", torch.device("cuda")) is torch.float32
    assert dtype_of("float16", torch.device("cuda")) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dtype_of("bfloat16", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        dtype_of("int8")
