"""Serving and training as two processes on one data dir: `serve --no-train` serves what `train` makes live."""

from __future__ import annotations

import subprocess
import sys
import time

from apphelpers import ROOT, run_app
from gradio_client import Client
from votes import TINY_TRAINING


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


def test_train_watch_runs_a_round_once_enough_new_votes_arrived(tiny_lm_dir, tmp_path, capsys):
    import json
    import threading
    from dataclasses import replace

    from votes import seed_votes

    from rlhf_live.config import Config
    from rlhf_live.learning.trainer import watch
    from rlhf_live.store import Store

    cfg = Config(model=str(tiny_lm_dir), load_in_4bit=False, compute_dtype="float32", data_dir=str(tmp_path / "d"))
    cfg = replace(cfg, lora_r=4, lora_alpha=8, max_context_tokens=256, ppo_batch_size=2, ppo_max_new_tokens=6)
    cfg = replace(cfg, ppo_updates_per_round=1, ppo_epochs=1, ppo_minibatches=1, train_min_new_votes=3)
    cfg.train_check_s = 0.2
    store = Store.from_config(cfg)
    seed_votes(store, 2)  # not enough yet
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(cfg,), kwargs={"rounds": 1, "stop": stop})
    watcher.start()
    time.sleep(1.5)
    assert store.live_adapter() is None
    seed_votes(store, 2)  # now 4 new votes
    watcher.join(120)
    assert not watcher.is_alive()
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["version"] == "v0001" and line["status"] == "live" and store.live_adapter()["version"] == "v0001"
