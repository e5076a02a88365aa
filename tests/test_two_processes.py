"""Serving and training as two processes on one data dir: `serve --no-train` serves what `train` makes live."""

from __future__ import annotations

import subprocess
import sys
import time

from apphelpers import ROOT, run_app
from gradio_client import Client

TINY_TRAINING = [
    *("--no-load-in-4bit", "--compute-dtype", "float32", "--lora-r", "4", "--lora-alpha", "8"),
    *("--max-context-tokens", "256", "--ppo-batch-size", "2", "--ppo-max-new-tokens", "6"),
    *("--ppo-updates-per-round", "1", "--ppo-epochs", "1", "--ppo-minibatches", "1"),
]


def test_the_server_serves_a_version_the_trainer_process_publishes(tiny_lm_dir, tmp_path):
    data = tmp_path / "data"
    with run_app(tiny_lm_dir, data, extra=("--follow-check-s", "1")) as app:
        client = Client(app.url, verbose=False)
        for i in range(3):
            pair = client.predict(f"Tell me about apples {i}", "", api_name="/compare")
            client.predict(pair["pair_id"], "A", "", api_name="/choose")
        assert client.predict(api_name="/status")["live_version"] == "base"
        cmd = [sys.executable, "-m", "rlhf_live", "train", "--once", "--data-dir", str(data)]
        done = subprocess.run(
            [*cmd, "--model", str(tiny_lm_dir), *TINY_TRAINING], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        published = time.monotonic()
        while client.predict(api_name="/status")["live_version"] != "v0001":
            assert time.monotonic() - published < 30, "the server did not pick up v0001 within 30 s"
            time.sleep(0.5)
        assert client.predict("Hello", "", api_name="/chat")["adapter_version"] == "v0001"
