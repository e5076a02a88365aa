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
