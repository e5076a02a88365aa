"""kill -9 at the worst moments: during a burst of votes, during a round's PPO and right after a publish.

After a restart no acknowledged vote is missing, no half version exists, the live version is the last good one and
the next round runs.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

from apphelpers import ROOT, rows, run_app
from gradio_client import Client
from votes import TINY_TRAINING, seed_votes

from rlhf_live.store import Store
from rlhf_live.store.folders import AdapterRegistry
from rlhf_live.store.recovery import reconcile


def train_once(tiny_lm_dir, data, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf_live", "train", "--once", "--data-dir", str(data), "--model", str(tiny_lm_dir)]
    return subprocess.run([*cmd, *TINY_TRAINING, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_votes_acknowledged_before_a_kill_survive_the_restart(tiny_lm_dir, tmp_path):
    data, acked, errors, stop = tmp_path / "data", [], [], threading.Event()
    with run_app(tiny_lm_dir, data) as app:
        pair_ids = []
        client = Client(app.url, verbose=False)
        for i in range(6):
            pair_ids.append(client.predict(f"Question {i}?", "", api_name="/compare")["pair_id"])

        def vote(k: int) -> None:
            c = Client(app.url, verbose=False)
            while not stop.is_set():
                try:
                    reply = c.predict(f"Burst {k} {len(acked)}", "", api_name="/chat")
                    c.predict(reply["response_id"], "up", "", api_name="/feedback")
                except Exception as exc:  # the requests in flight when the server is killed fail: expected, not acked
                    if app.proc.poll() is None:
                        errors.append(exc)
                    return
                acked.append(reply["response_id"])  # acknowledged: the server answered ok

        threads = [threading.Thread(target=vote, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 12 and not errors:
            time.sleep(0.05)
        assert not errors, errors
        app.proc.send_signal(signal.SIGKILL)  # mid-burst: requests in flight die with it
        stop.set()
        app.proc.wait()
    done = list(acked)
    with run_app(tiny_lm_dir, data) as app:
        voted = {r["response_id"] for r in rows(app.db_path, "SELECT response_id FROM feedback WHERE value = 'up'")}
        assert set(done) <= voted
        assert rows(app.db_path, "PRAGMA integrity_check") == [{"integrity_check": "ok"}]
        assert Client(app.url, verbose=False).predict("Still there?", "", api_name="/chat")["response_id"]


def test_a_round_killed_during_ppo_leaves_no_half_version_and_the_next_round_runs(tiny_lm_dir, tmp_path):
    data = tmp_path / "data"
    store = Store(data / "rlhf_live.db")
    seed_votes(store)
    cmd = [sys.executable, "-m", "rlhf_live", "train", "--once", "--data-dir", str(data), "--model", str(tiny_lm_dir)]
    proc = subprocess.Popen([*cmd, *TINY_TRAINING, "--ppo-updates-per-round", "500"], cwd=ROOT, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while b"PPO: update 3/" not in proc.stdout.readline():  # well into PPO
        assert time.monotonic() < deadline and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    registry = AdapterRegistry(data / "adapters")
    assert registry.versions() == [] and store.live_adapter() is None  # nothing half-published
    assert reconcile(store, registry)[-1].endswith("was interrupted: its process stopped.")
    assert store.runs(1)[0]["status"] == "interrupted"
    done = train_once(tiny_lm_dir, data)  # the lock died with the process: the next round runs
    assert done.returncode == 0, done.stderr[-2000:]
    assert store.live_adapter()["version"] == "v0001" and registry.versions() == ["v0001"]
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".tmp-")]
    store.close()


def test_a_kill_right_after_publishing_is_registered_on_restart(tiny_lm_dir, tmp_path):
    data = tmp_path / "data"
    store = Store(data / "rlhf_live.db")
    seed_votes(store)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from rlhf_live import cli
        from rlhf_live.store import Store
        Store.add_adapter = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # dies between publish and register
        cli.main(["train", "--once", "--data-dir", {str(data)!r}, "--model", {str(tiny_lm_dir)!r}, *{TINY_TRAINING!r}])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    registry = AdapterRegistry(data / "adapters")
    assert registry.versions() == ["v0001"] and store.adapters() == []  # a folder, no row
    done = train_once(tiny_lm_dir, data)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Registered v0001 as a candidate" in done.stdout
    assert [(a["version"], a["status"]) for a in store.adapters()] == [("v0001", "candidate"), ("v0002", "live")]
    conn = sqlite3.connect(data / "rlhf_live.db")
    assert conn.execute("SELECT status FROM training_runs ORDER BY id").fetchall() == [("interrupted",), ("ok",)]
    store.close()
