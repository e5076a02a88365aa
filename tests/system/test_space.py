"""The app installs and starts the way a Hugging Face Space starts it, and answers /chat (scripts/space_start.py)."""

from __future__ import annotations

import pytest

from scripts.space_start import space_start

pytestmark = pytest.mark.slow


def test_a_space_like_install_serves_the_page_and_answers(tmp_path):
    report = space_start(tmp_path)
    assert report["chat"]["text"].strip() and report["chat"]["adapter_version"] == "base"
    assert report["storage_notice"] is True  # no /data on this "Space": the app says votes vanish on restart
    assert report["login_button"] is True  # hf_oauth: the owner can sign in for the admin controls


def _hub_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://huggingface.co/api/models/HuggingFaceTB/SmolLM2-135M-Instruct", timeout=5)
    except OSError:
        return False
    return True


def test_the_hub_model_id_path_where_the_hub_is_reachable(tmp_path):
    """On a Space `--model HuggingFaceTB/SmolLM2-135M-Instruct` loads from the hub; here only where it is reachable."""
    if not _hub_reachable():
        pytest.skip("huggingface.co is not reachable from this machine: the hub id path runs on a Space only")
    from rlhf_live.config import Config
    from rlhf_live.serving.policy import Policy
    from rlhf_live.serving.settings import GenerationSettings

    cfg = Config(model="HuggingFaceTB/SmolLM2-135M-Instruct", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    policy = Policy.from_config(cfg)
    (answer,) = policy.generate(
        [{"role": "user", "content": "What is the capital of France?"}],
        GenerationSettings(max_new_tokens=12, temperature=0),
    )
    assert "Paris" in answer.text
