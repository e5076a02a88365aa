"""Load: N simulated people (each its own client session) chat, thumb, compare and choose against `python app.py`
while the trainer runs a round; errors, limit refusals, latency, file descriptors and the DB afterwards.

    python bench/load.py --users 20 --seconds 180                 # the real default model, 32-token answers
    python bench/load.py --model /path/to/tiny --users 20 --seconds 60

Prints a table and writes bench/load.json. `drive()` is also what tests/system/test_load.py runs against the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIMIT_MESSAGES = ("Too many requests", "busy")
"""Deliberate refusals (rate limit, full queue): counted, not errors."""


def _fds(pid: int) -> dict[str, int]:
    """Open file descriptors of `pid` by kind (sockets, pipes, SQLite files, other), its DB connections and threads."""
    kinds = {"socket": 0, "pipe": 0, "db": 0, "other": 0, "connections": 0}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed between listdir and readlink
            continue
        kind = target.split(":", 1)[0] if target.startswith(("socket:", "pipe:")) else "other"
        kinds["db" if ".db" in target else kind] += 1
        # Each SQLite connection holds one descriptor on the main file (the WAL and shm ones are shared or extra).
        kinds["connections"] += target.endswith(".db")
    kinds["threads"] = len(os.listdir(f"/proc/{pid}/task"))
    return kinds


def drive(url: str, *, users: int, seconds: float, server_pid: int | None = None, seed: int = 0) -> dict:
    """Every user loops chat -> thumb -> compare -> choose until time is up; what happened, and what was acked."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    latencies: dict[str, list[float]] = {k: [] for k in ("chat", "feedback", "compare", "choose")}
    acked = {"feedback": [], "choose": []}
    errors, limited, fds = [], [], []
    lock, deadline = threading.Lock(), time.monotonic() + seconds

    def call(client, kind: str, *args):
        t0 = time.perf_counter()
        try:
            out = client.predict(*args, api_name=f"/{kind}")
        except AppError as exc:
            with lock:
                (limited if any(m in str(exc) for m in LIMIT_MESSAGES) else errors).append(f"{kind}: {exc}")
            return None
        except Exception as exc:  # transport errors count as errors too
            with lock:
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            return None
        with lock:
            latencies[kind].append(time.perf_counter() - t0)
        return out

    def person(k: int) -> None:
        rng, client = random.Random(seed + k), Client(url, verbose=False)
        while time.monotonic() < deadline:
            reply = call(client, "chat", f"Person {k} asks question {rng.randrange(10**6)}", "")
            if reply and call(client, "feedback", reply["response_id"], rng.choice(["up", "down"]), ""):
                with lock:
                    acked["feedback"].append(reply["response_id"])
            pair = call(client, "compare", f"Person {k} compares {rng.randrange(10**6)}", "")
            if pair and call(client, "choose", pair["pair_id"], rng.choice(["A", "B", "tie"]), ""):
                with lock:
                    acked["choose"].append(pair["pair_id"])

    def sample_fds() -> None:
        while time.monotonic() < deadline and server_pid:
            fds.append(_fds(server_pid))
            time.sleep(2)

    threads = [threading.Thread(target=person, args=(k,), daemon=True) for k in range(users)]
    threading.Thread(target=sample_fds, daemon=True).start()
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - start
    done = sum(len(v) for v in latencies.values())
    every = sorted(x for v in latencies.values() for x in v)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    return {
        "users": users,
        "seconds": round(took, 1),
        "requests": done,
        "requests_per_s": round(done / took, 2),
        "p50_s": pct(every, 0.5),
        "p95_s": pct(every, 0.95),
        "by_kind": {
            k: {"n": len(v), "p50_s": pct(sorted(v), 0.5), "p95_s": pct(sorted(v), 0.95)} for k, v in latencies.items()
        },
        "errors": errors,
        "limited": len(limited),
        "acked": acked,
        "fds": fds,
    }


def check_db(db_path: Path, acked: dict) -> dict:
    """Whether every acknowledged vote is in the DB, and SQLite's own integrity check."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    thumbs = {r for (r,) in conn.execute("SELECT response_id FROM feedback WHERE value != 'cleared'")}
    chosen = {r for (r,) in conn.execute("SELECT id FROM comparisons WHERE choice IS NOT NULL")}
    out = {
        "missing_thumbs": sorted(set(acked["feedback"]) - thumbs),
        "missing_choices": sorted(set(acked["choose"]) - chosen),
        "integrity": conn.execute("PRAGMA integrity_check").fetchone()[0],
        "rounds": conn.execute("SELECT status, count(*) FROM training_runs GROUP BY status").fetchall(),
    }
    conn.close()
    return out


def vote_shorter(client, question: str, n: int) -> None:
    """`n` Compare choices through /compare and /choose, the shorter answer winning (a voter with a clear taste)."""
    for i in range(n):
        pair = client.predict(f"{question} ({i})", "", api_name="/compare")
        shorter = "A" if len(pair["a"]["text"]) <= len(pair["b"]["text"]) else "B"
        client.predict(pair["pair_id"], shorter, "shorter is better", api_name="/choose")


def start_app(model: str, data: Path, port: int, extra: list[str]) -> subprocess.Popen:
    """`python app.py` with the trainer on; returns once the page answers."""
    cmd = [sys.executable, str(HERE.parent / "app.py"), "--model", model, "--data-dir", str(data), "--port", str(port)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "app.log", "wb") as log:
        proc = subprocess.Popen([*cmd, *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the app did not start; see {data / 'app.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--data", default="/tmp/rlhf-live-bench-load")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    subprocess.run(["rm", "-rf", args.data], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app_args = ["--max-new-tokens", "32", "--train-min-new-votes", "40", "--train-check-s", "2", *extra]
    proc = start_app(args.model, Path(args.data), port, app_args)
    try:
        result = drive(f"http://127.0.0.1:{port}/", users=args.users, seconds=args.seconds, server_pid=proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result["db"] = check_db(Path(args.data) / "rlhf_live.db", result.pop("acked"))
    print("| users | seconds | requests | req/s | p50 s | p95 s | errors | limit refusals | fds min-max | rounds |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    f = [k["socket"] + k["pipe"] + k["db"] + k["other"] for k in result["fds"]] or [0]
    print(
        f"| {result['users']} | {result['seconds']} | {result['requests']} | {result['requests_per_s']} "
        f"| {result['p50_s']:.2f} | {result['p95_s']:.2f} | {len(result['errors'])} | {result['limited']} "
        f"| {min(f)}-{max(f)} | {result['db']['rounds']} |"
    )
    print(json.dumps({k: result[k] for k in ("by_kind", "db")}, indent=1))
    (HERE / "load.json").write_text(json.dumps(result, indent=1, default=str))
    print("errors:", result["errors"][:5])


if __name__ == "__main__":
    main()
