"""The OpenAI-compatible API against the app's own `/chat`: time to the first streamed text and chars/s, one app.

Starts `python app.py` (default model, no trainer), then asks the same questions alternately through gradio_client's
`/chat` and the official `openai` client's streaming `/v1/chat/completions`, as clients do.
Usage: python bench/openai_stream.py [--chats 3] [--tokens 256] [--out bench/openai_stream.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import openai
from api_stream import QUESTION, ask
from gradio_client import Client
from load import start_app


def ask_v1(client: openai.OpenAI, question: str, tokens: int) -> dict:
    """One streamed completion: seconds to the first content delta, to the end, and the answer's length."""
    start, first, text = time.perf_counter(), None, ""
    stream = client.chat.completions.create(
        model="rlhf-live", messages=[{"role": "user", "content": question}], max_tokens=tokens, stream=True
    )
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            first = first if first is not None else time.perf_counter() - start
            text += delta
    total = time.perf_counter() - start
    return {"first_text_s": first if first is not None else total, "total_s": total, "chars": len(text)}


def summary(name: str, runs: list[dict]) -> dict:
    return {
        "client": name,
        "first_text_s": statistics.median(r["first_text_s"] for r in runs),
        "total_s": statistics.median(r["total_s"] for r in runs),
        "chars_per_s": statistics.median(r["chars"] / r["total_s"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).with_name("openai_stream.json")))
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as data:
        proc = start_app(
            "smollm2-135m-instruct", Path(data), port, ["--max-new-tokens", str(args.tokens), "--no-train"]
        )
        try:
            chat = Client(f"http://127.0.0.1:{port}/", verbose=False)
            v1 = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            ask(chat, "Hello!")  # warm-up
            ask_v1(v1, "Hello!", args.tokens)
            runs: dict[str, list[dict]] = {"/chat (gradio_client)": [], "/v1 (openai client)": []}
            for i in range(args.chats):  # alternated, so a busy moment hurts both alike
                runs["/chat (gradio_client)"].append(ask(chat, f"{QUESTION} ({i})"))
                runs["/v1 (openai client)"].append(ask_v1(v1, f"{QUESTION} ({i})", args.tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    rows = [summary(name, r) for name, r in runs.items()]
    print("| client | first text s | answer s | chars/s | vs /chat |\n|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["chars_per_s"] / rows[0]["chars_per_s"]
        print(
            f"| {r['client']} | {r['first_text_s']:.3f} | {r['total_s']:.2f} | {r['chars_per_s']:.0f} | {ratio:.2f}x |"
        )
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
