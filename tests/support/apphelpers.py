"""Helpers for the end-to-end tests: run the real app (`python app.py`) in a subprocess and read its database."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLES = ("conversations", "messages", "feedback", "feedback_events", "comparisons")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class App:
    url: str
    data_dir: Path
    proc: subprocess.Popen
    log: Path

    @property
    def db_path(self) -> Path:
        return self.data_dir / "rlhf_live.db"

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@contextlib.contextmanager
def run_app(
    model: Path, data_dir: Path, *, timeout: float = 120.0, extra: tuple[str, ...] = (), port: int | None = None
) -> Iterator[App]:
    """Start `python app.py` on `port` or a free one with `model` (full precision, no trainer); stop it on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = data_dir.parent / f"app-{port}.log"
    cmd = [
        sys.executable,
        str(ROOT / "app.py"),
        "--model",
        str(model),
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--no-train",
        "--no-load-in-4bit",
        "--compute-dtype",
        "float32",
        "--max-new-tokens",
        "16",
        *extra,
    ]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    app = App(f"http://127.0.0.1:{port}/", data_dir, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {proc.returncode} before answering:\n{app.log_tail()}")
            try:
                with urllib.request.urlopen(app.url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not answer on {app.url} within {timeout:.0f} s:\n{app.log_tail()}")
            time.sleep(0.3)
        yield app
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def rows(db_path: Path, sql: str, params: tuple = ()) -> list[dict]:
    """Rows of a query on the app's DB, read with plain sqlite3 (read-only) from the test process."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def counts(db_path: Path) -> dict[str, int]:
    """Row count of every table a request may write to: compare before/after to prove nothing was written."""
    return {t: rows(db_path, f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}


def snapshot(db_path: Path) -> dict[str, list[dict]]:
    """Every row of the written tables (ordered): compare before/after to prove nothing changed."""
    return {t: rows(db_path, f"SELECT * FROM {t} ORDER BY rowid") for t in TABLES}


_SHARED: dict[str, App] = {}


def shared_tiny_app(request, tiny_lm_dir: Path, tmp_path_factory) -> App:
    """The app on the tiny model, started once per test session and shared by the API and browser tests.

    Call it from a module fixture. Starting the app costs ~30 s, so one instance is kept here and stopped when
    pytest finishes (a session fixture imported into two test modules would be built once per module).
    """
    app = _SHARED.get("tiny")
    if app is None or app.proc.poll() is not None:
        stack = contextlib.ExitStack()
        # Every update streamed: the tiny model writes a whole answer within one Config.stream_interval_s, and the
        # tests check that partial answers reach clients (the coalescing itself is tested in test_streaming.py).
        data = tmp_path_factory.mktemp("tiny-app") / "data"
        app = stack.enter_context(run_app(tiny_lm_dir, data, extra=("--stream-interval-s", "0")))
        request.config.add_cleanup(stack.close)
        _SHARED["tiny"] = app
    return app


def shared_real_app(request, tmp_path_factory) -> App:
    """The app on the real default model with long answers (slow enough to watch them being written), shared."""
    from rlhf_live.config import DEFAULT_MODEL

    app = _SHARED.get("real")
    if app is None or app.proc.poll() is not None:
        stack = contextlib.ExitStack()
        data = tmp_path_factory.mktemp("real-app") / "data"
        app = stack.enter_context(run_app(DEFAULT_MODEL, data, timeout=300, extra=("--max-new-tokens", "512")))
        request.config.add_cleanup(stack.close)
        _SHARED["real"] = app
    return app


def app_config(url: str) -> dict:
    """The page's Gradio config (components and the event handlers the browser may call)."""
    with urllib.request.urlopen(url.rstrip("/") + "/config", timeout=10) as resp:
        return json.loads(resp.read())


def fn_index_of(config: dict, label: str, event: str = "click") -> int:
    """The queue index of the handler a component with this label (or button value) triggers, as a browser sends it."""
    ids = {
        c["id"]
        for c in config["components"]
        if label in (c.get("props", {}).get("label"), c.get("props", {}).get("value"))
    }
    for i, dep in enumerate(config["dependencies"]):
        if any(t[0] in ids and t[1] == event for t in dep.get("targets", [])):
            return dep.get("id", i)
    raise LookupError(f"no {event} handler on a component labelled {label!r}")


def raw_queue_call(url: str, fn_index: int, data: list, timeout: float = 60.0, event_data=None) -> dict:
    """Call a handler the way the browser's queue protocol does (no gradio_client): the final message."""
    session = uuid.uuid4().hex
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": event_data, "trigger_id": None}
    join = urllib.request.Request(
        url.rstrip("/") + "/gradio_api/queue/join",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(join, timeout=timeout) as resp:
        assert resp.status == 200
    stream = url.rstrip("/") + f"/gradio_api/queue/data?session_hash={session}"
    with urllib.request.urlopen(stream, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("the queue stream ended without a result")
