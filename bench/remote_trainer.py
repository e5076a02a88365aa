"""From the vote that starts a round to the new version serving: the in-process trainer against a trainer following
the app over HTTP (`train --watch --follow`), on the real default model, in one run.

    python bench/remote_trainer.py [--votes 8] [--tokens 48]

Each setup starts `python app.py` in a fresh data dir, casts `--votes` Compare choices (the shorter answer wins)
and times from the last vote to /status saying the new version is live, and to an answer written by it. The remote
trainer runs as its own process with its own data dir on this machine (loopback stands for the network between two
machines). Prints a table and writes bench/remote_trainer.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradio_client import Client
from load import start_app, vote_shorter

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(remote: bool, votes: int, tokens: int) -> dict:
    """One setup: seconds from the last vote to the version live and to its first answer."""
    with tempfile.TemporaryDirectory() as tmp:
        port, data = _port(), Path(tmp) / "serving"
        common = ["--max-new-tokens", str(tokens), "--train-min-new-votes", str(votes), "--train-check-s", "5"]
        extra = [*common, "--admin-token", TOKEN, "--follow-check-s", "5", *(["--no-train"] if remote else [])]
        app = start_app("smollm2-135m-instruct", data, port, extra)
        trainer = None
        try:
            url = f"http://127.0.0.1:{port}/"
            if remote:
                cmd = [sys.executable, "-m", "rlhf_live", "train", "--watch", "--follow", url, "--admin-token", TOKEN]
                cmd += ["--data-dir", str(Path(tmp) / "training"), *common]
                trainer = subprocess.Popen(cmd, cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = Client(url, verbose=False)
            vote_shorter(client, "What is a good name for a cat?", votes)
            voted = time.monotonic()
            while client.predict(api_name="/status")["live_version"] == "base":
                if time.monotonic() - voted > 1800:
                    raise RuntimeError("no version went live within 30 minutes")
                time.sleep(1)
            live = time.monotonic() - voted
            while client.predict("Hello", "", api_name="/chat")["adapter_version"] == "base":
                time.sleep(1)
            answered = time.monotonic() - voted
            status = client.predict(api_name="/status")
            round_s = status.get("last_round_s")
        finally:
            if trainer is not None:
                trainer.terminate()
                trainer.wait(60)
            app.terminate()
            app.wait(60)
    return {
        "trainer": "remote (--follow)" if remote else "in-process",
        "vote_to_live_s": live,
        "vote_to_answer_s": answered,
        "round_s": round_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--votes", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", default=str(HERE / "remote_trainer.json"))
    args = parser.parse_args()
    rows = [run(remote, args.votes, args.tokens) for remote in (False, True)]
    print("| trainer | round s | last vote -> live s | last vote -> its answer s | vs in-process |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["vote_to_live_s"] / rows[0]["vote_to_live_s"]
        print(
            f"| {r['trainer']} | {r['round_s'] or 0:.0f} | {r['vote_to_live_s']:.0f} | {r['vote_to_answer_s']:.0f} "
            f"| {ratio:.2f}x |"
        )
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
