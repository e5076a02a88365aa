"""What an API client sees: `/chat` on `python app.py` per engine, time to the first streamed text and chars/s.

Starts the real app (default model, no trainer) once per engine, one after the other, and asks each the same
questions through gradio_client, polling the job's streamed outputs as a client would.
Usage: python bench/api_stream.py [--engines torch,auto] [--chats 3] [--tokens 256] [--out bench/api_stream.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

from gradio_client import Client
from load import start_app

QUESTION = "Write a long, detailed story about a dragon who learns to bake bread."


def ask(client: Client, question: str) -> dict:
    """One streamed /chat: seconds to the first partial text, to the end, and the answer's length."""
    start = time.perf_counter()
    job = client.submit(question, api_name="/chat")
    first = None
    while not job.done():
        if first is None and any(o.get("text") for o in job.outputs()):
            first = time.perf_counter() - start
        time.sleep(0.005)
    total = time.perf_counter() - start
    text = job.result()["text"]
    return {"first_text_s": first if first is not None else total, "total_s": total, "chars": len(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="torch,auto")
    parser.add_argument("--chats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).with_name("api_stream.json")))
    args = parser.parse_args()
    rows = []
    for engine in args.engines.split(","):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as data:
            extra = ["--engine", engine, "--max-new-tokens", str(args.tokens), "--no-train"]
            proc = start_app("smollm2-135m-instruct", Path(data), port, extra)
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                ask(client, "Hello!")  # warm-up
                chats = [ask(client, f"{QUESTION} ({i})") for i in range(args.chats)]
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        rows.append(
            {
                "engine": engine,
                "first_text_s": statistics.median(c["first_text_s"] for c in chats),
                "total_s": statistics.median(c["total_s"] for c in chats),
                "chars_per_s": statistics.median(c["chars"] / c["total_s"] for c in chats),
                "chats": chats,
            }
        )
    print(f"{'engine':<8} {'first text s':>13} {'answer s':>9} {'chars/s':>8} {'vs first row':>12}")
    for r in rows:
        ratio = r["chars_per_s"] / rows[0]["chars_per_s"]
        times = f"{r['first_text_s']:>13.3f} {r['total_s']:>9.2f}"
        print(f"{r['engine']:<8} {times} {r['chars_per_s']:>8.0f} {ratio:>11.2f}x")
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
