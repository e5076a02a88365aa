"""Serve on one machine, train on another: `train --watch --follow URL` reads the app's feed and hands versions back
over HTTP, with separate data dirs (two processes on loopback stand for the two machines)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

import pytest
from apphelpers import ROOT, free_port, rows, run_app
from gradio_client import Client
from votes import TINY_TRAINING

from rlhf_live.learning.remote import FeedError, RemoteStore
from rlhf_live.store import Store

TOKEN = "admin-secret"


def _http(app, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None and body[:1] == b"{":
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(app.url + path.lstrip("/"), data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_trainer_on_another_machine_trains_for_the_app_and_its_version_goes_live(tiny_lm_dir, tmp_path):
    serving, training = tmp_path / "serving", tmp_path / "training"
    extra = ("--admin-token", TOKEN, "--follow-check-s", "1")
    with run_app(tiny_lm_dir, serving / "data", extra=extra) as app:
        client = Client(app.url, verbose=False)
        for i in range(3):
            pair = client.predict(f"Tell me about apples {i}", "", api_name="/compare")
            client.predict(pair["pair_id"], "A", "", api_name="/choose")

        # What the feed hands out is what the store gives an in-process trainer, row for row.
        feed = RemoteStore(app.url, TOKEN, tmp_path / "cache")
        local = Store(serving / "data" / "rlhf_live.db")
        assert feed.preference_pairs() == local.preference_pairs() and len(local.preference_pairs()) == 3
        assert feed.pointwise_labels() == local.pointwise_labels() and feed.watermark() == local.watermark()
        assert feed.asked(50) == local.asked(50)
        with pytest.raises(FeedError, match="401"):
            RemoteStore(app.url, "wrong", tmp_path / "c2").watermark()

        cmd = [sys.executable, "-m", "rlhf_live", "train", "--watch", "--follow", app.url, "--admin-token", TOKEN]
        cmd += ["--data-dir", str(training / "data"), "--model", str(tiny_lm_dir), *TINY_TRAINING]
        cmd += ["--train-min-new-votes", "3", "--train-check-s", "1"]
        trainer = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            started = time.monotonic()
            while client.predict(api_name="/status")["live_version"] != "v0001":
                assert trainer.poll() is None, trainer.stdout.read()[-3000:]
                assert time.monotonic() - started < 300, "no remote version went live within 300 s"
                time.sleep(1)
        finally:
            trainer.terminate()
            trainer.wait(30)
        assert client.predict("Hello", "", api_name="/chat")["adapter_version"] == "v0001"
        (row,) = rows(serving / "data" / "rlhf_live.db", "SELECT version, status, metrics FROM adapters")
        assert row["status"] == "live" and json.loads(row["metrics"])["trained_by"] == "remote"
        (run,) = rows(serving / "data" / "rlhf_live.db", "SELECT status, owner FROM training_runs")
        assert run["status"] == "ok" and run["owner"]  # the round is the app's record too
        assert (serving / "data" / "adapters" / "v0001" / "adapter_model.safetensors").is_file()


def test_the_feed_refuses_strangers_bad_uploads_and_a_second_trainer(tiny_lm_dir, tmp_path):
    with run_app(tiny_lm_dir, tmp_path / "data", extra=("--admin-token", TOKEN)) as app:
        assert _http(app, "GET", "/trainer/state", token=None)[0] == 401
        assert _http(app, "GET", "/trainer/state", token="guess")[0] == 401
        db = tmp_path / "data" / "rlhf_live.db"
        # A cut-off upload, or one without adapter weights, publishes nothing and nothing else serves.
        status, body = _http(app, "PUT", "/trainer/versions/v0001", _tar({"adapter_config.json": b"{}"})[:40])
        assert status == 400 and "not a whole .tar.gz" in body["error"]
        status, body = _http(app, "PUT", "/trainer/versions/v0001", _tar({"adapter_config.json": b"{}"}))
        assert status == 400 and "adapter weights are missing" in body["error"]
        status, body = _http(app, "PUT", "/trainer/versions/v0001", _tar({"../evil": b"x"}))
        assert status == 400
        assert rows(db, "SELECT count(*) AS n FROM adapters")[0]["n"] == 0
        assert not any(p.name.startswith(("v0", ".tmp")) for p in (tmp_path / "data" / "adapters").iterdir())
        # A good folder once; the same bytes again (a retry after a lost reply) change nothing; others are refused.
        good = _tar(
            {
                "adapter_config.json": b"{}",
                "adapter_model.safetensors": b"weights",
                "meta.json": json.dumps({"parent": None, "metrics": {"sample/answer_tokens": 0.2}}).encode(),
            }
        )
        assert _http(app, "PUT", "/trainer/versions/v0001", good) == (
            200,
            {"ok": True, "version": "v0001", "already": False},
        )
        assert _http(app, "PUT", "/trainer/versions/v0001", good)[1]["already"] is True
        other = _tar({"adapter_config.json": b"{}", "adapter_model.safetensors": b"other weights"})
        assert _http(app, "PUT", "/trainer/versions/v0001", other)[0] == 409
        assert rows(db, "SELECT version, status FROM adapters") == [{"version": "v0001", "status": "candidate"}]
        # The app's own gate checks a version before it goes live.
        refused = _http(app, "POST", "/trainer/versions/v0001/status", json.dumps({"status": "live"}).encode())
        assert refused[0] == 400 and "answers shrank" in refused[1]["error"]  # its round sampled near-empty answers
        # One round at a time: a second trainer waits while the first is heard from.
        first = _http(app, "POST", "/trainer/runs", json.dumps({"owner": "gpu-a:1"}).encode())[1]["id"]
        status, body = _http(app, "POST", "/trainer/runs", json.dumps({"owner": "gpu-b:2"}).encode())
        assert status == 409 and "gpu-a:1" in body["error"]
        _http(app, "POST", f"/trainer/runs/{first}", json.dumps({"status": "failed", "error": "stopped"}).encode())
        assert _http(app, "POST", "/trainer/runs", json.dumps({"owner": "gpu-b:2"}).encode())[0] == 200


def test_a_trainer_killed_mid_round_loses_its_round_and_the_next_one_trains(tiny_lm_dir, tmp_path):
    """kill -9 of the trainer while its round runs: nothing half-published, its round interrupted, the next trains."""
    serving = tmp_path / "serving" / "data"
    extra = ("--admin-token", TOKEN, "--trainer-lease-s", "3", "--follow-check-s", "1")
    with run_app(tiny_lm_dir, serving, extra=extra) as app:
        client = Client(app.url, verbose=False)
        for i in range(3):
            pair = client.predict(f"Tell me about pears {i}", "", api_name="/compare")
            client.predict(pair["pair_id"], "B", "", api_name="/choose")
        cmd = [sys.executable, "-m", "rlhf_live", "train", "--watch", "--follow", app.url, "--admin-token", TOKEN]
        cmd += ["--model", str(tiny_lm_dir), *TINY_TRAINING, "--train-min-new-votes", "3", "--train-check-s", "1"]
        first = subprocess.Popen([*cmd, "--data-dir", str(tmp_path / "a")], cwd=ROOT, stdout=subprocess.DEVNULL)
        db = serving / "rlhf_live.db"
        started = time.monotonic()
        while not rows(db, "SELECT id FROM training_runs WHERE status = 'running'"):
            assert time.monotonic() - started < 120, "the first trainer never started a round"
            time.sleep(0.2)
        first.kill()  # mid-round: before its upload or right after it, never half of one
        first.wait()
        second = subprocess.Popen([*cmd, "--data-dir", str(tmp_path / "b")], cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            while client.predict(api_name="/status")["live_version"] == "base":
                assert time.monotonic() - started < 300 and second.poll() is None, "no version went live"
                time.sleep(1)
        finally:
            second.terminate()
            second.wait(30)
        runs = rows(db, "SELECT status FROM training_runs ORDER BY id")
        assert [r["status"] for r in runs] == ["interrupted", "ok"]  # the killed trainer's round, then the next
        versions = rows(db, "SELECT version, status FROM adapters ORDER BY version")
        assert versions[-1]["status"] == "live" and len({v["version"] for v in versions}) == len(versions)
        assert all((serving / "adapters" / v["version"]).is_dir() for v in versions)  # every row has its folder


def test_the_app_killed_mid_round_loses_nothing_and_the_round_goes_live_after_its_restart(tiny_lm_dir, tmp_path):
    """kill -9 of the app while a remote round runs: the trainer waits for it, then hands its version over once."""
    serving, port = tmp_path / "serving" / "data", free_port()
    extra = ("--admin-token", TOKEN, "--follow-check-s", "1")
    db = serving / "rlhf_live.db"
    cmd = [sys.executable, "-m", "rlhf_live", "train", "--watch", "--follow", f"http://127.0.0.1:{port}/"]
    cmd += ["--admin-token", TOKEN, "--model", str(tiny_lm_dir), *TINY_TRAINING, "--train-min-new-votes", "3"]
    cmd += ["--train-check-s", "1", "--data-dir", str(tmp_path / "training")]
    with run_app(tiny_lm_dir, serving, extra=extra, port=port) as app:
        client = Client(app.url, verbose=False)
        for i in range(3):
            pair = client.predict(f"Tell me about plums {i}", "", api_name="/compare")
            client.predict(pair["pair_id"], "A", "", api_name="/choose")
        trainer = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = time.monotonic()
        while not rows(db, "SELECT id FROM training_runs WHERE status = 'running'"):
            assert time.monotonic() - started < 120 and trainer.poll() is None, "the trainer never started a round"
            time.sleep(0.1)
        app.proc.kill()  # mid-round: the trainer's next request finds nobody
        app.proc.wait()
    assert rows(db, "SELECT count(*) AS n FROM adapters")[0]["n"] == 0  # the app died before the round's upload
    try:
        time.sleep(35)  # down longer than a dropped connection: the trainer keeps its round and waits for the app
        with run_app(tiny_lm_dir, serving, extra=extra, port=port) as app:
            client = Client(app.url, verbose=False)
            while client.predict(api_name="/status")["live_version"] != "v0001":
                assert trainer.poll() is None, trainer.stdout.read()[-3000:]
                assert time.monotonic() - started < 300, "the round never went live after the app came back"
                time.sleep(1)
    finally:
        trainer.terminate()
        out = trainer.communicate(timeout=30)[0]
    assert '"status": "failed"' not in out, out[-3000:]  # the same round finished: no round was lost
    runs = rows(db, "SELECT status FROM training_runs ORDER BY id")
    assert [r["status"] for r in runs] == ["ok"]
    assert rows(db, "SELECT version, status FROM adapters") == [{"version": "v0001", "status": "live"}]
    assert sorted(p.name for p in (serving / "adapters").iterdir() if p.name.startswith("v")) == ["v0001"]
