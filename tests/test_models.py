"""Model resolution and loading: the embedded default offline, clear errors for anything unusable."""

import pytest
import torch

from rlhf_live.config import Config
from rlhf_live.models import ModelNotAvailable, load_base, resolve


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
