"""A long first message, new to every cache: seconds to the first token per engine setting, against plain transformers.

The issue's yardstick is plain transformers fp32 `generate` on the same machine in the same run; every row answers the
same ~1,100-token message (pasted meeting notes) with greedy decoding. llama.cpp rows start a fresh server each time
(nothing cached); "next turn after a swap" is a chat's second turn on a version that went live after its first, with
and without the swap's prefill of recent chats (`engine_warm_conversations`).
Usage: python bench/cold_start.py [--runs 3] [--out bench/cold_start.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import queue
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer

from rlhf_live.config import Config
from rlhf_live.model.base import resolve
from rlhf_live.serving import llamacpp as llama
from rlhf_live.serving.engine_files import engine_options
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.settings import GenerationSettings

TOPICS = ["budget", "hiring", "the launch date", "customer feedback", "the office move", "security review"]


def meeting_notes(n_items: int = 40) -> str:
    """~1,100 tokens of varied meeting notes, then a question about them."""
    lines = ["Meeting notes, product team, Tuesday."]
    for i in range(n_items):
        topic = TOPICS[i % len(TOPICS)]
        lines.append(
            f"{i + 1}. On {topic}, person {chr(65 + i % 26)} said item {i * 7 % 13} needs a decision by week"
            f" {i % 9 + 1}, and the group agreed to revisit it after {i % 4 + 2} days."
        )
    lines.append("Summarise the decisions above in three bullet points.")
    return "\n".join(lines)


def first_token_engine(path: Path, ids: list[int], options: dict) -> float:
    """Seconds to the first token of a fresh llama.cpp server (nothing cached) on these prompt ids."""
    engine = llama.LlamaCppEngine(path, threads=os.cpu_count() or 1, parallel=4, n_ctx=2048, options=options)
    sink: queue.Queue = queue.Queue()
    start = time.perf_counter()
    engine.submit(ids, llama.Sampling(8, 0.0, 1.0), None, threading.Event(), sink)
    while sink.get()[1] != "token":
        pass
    elapsed = time.perf_counter() - start
    while sink.get()[1] != "done":
        pass
    return elapsed


def decode_rate(path: Path, ids: list[int], options: dict, tokens: int = 200) -> float:
    """Tokens/s of a greedy answer after `ids` on a fresh llama.cpp server (what a setting costs every later token)."""
    engine = llama.LlamaCppEngine(path, threads=os.cpu_count() or 1, parallel=4, n_ctx=2048, options=options)
    sink: queue.Queue = queue.Queue()
    engine.submit(ids, llama.Sampling(tokens, 0.0, 1.0, 0, 1.1, 64), None, threading.Event(), sink)
    times = []
    while (item := sink.get())[1] != "done":
        if item[1] == "token":
            times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def first_token_transformers(model, tokenizer, ids: list[int]) -> float:
    """Seconds to the first token of plain transformers fp32 generate (greedy)."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    start = time.perf_counter()
    thread = threading.Thread(
        target=model.generate,
        kwargs=dict(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, streamer=streamer),
    )
    thread.start()
    for text in streamer:
        if text:
            break
    elapsed = time.perf_counter() - start
    thread.join()
    return elapsed


def first_token_policy(policy: Policy, messages: list[dict]) -> tuple[float, int]:
    """Seconds to the first streamed text through Policy.stream, and the prompt tokens the engine reused."""
    start = time.perf_counter()
    stream = policy.stream(messages, GenerationSettings(max_new_tokens=8, temperature=0.0))
    first = None
    for (text,) in stream:
        if first is None and text:
            first = time.perf_counter() - start
    return first, stream.answers[0].cached_prompt_tokens


def app_first_text(cfg: Config, message: str, runs: int) -> list[float]:
    """Seconds to the first streamed text of `/chat` on a fresh `python app.py` (nothing cached but a warm-up)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from gradio_client import Client
    from load import start_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = []
    with tempfile.TemporaryDirectory() as data:
        extra = ["--no-train", "--max-new-tokens", "8", "--max-message-chars", str(len(message) + 100)]
        proc = start_app(cfg.model, Path(data), port, extra)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            client.predict("Hello!", "", api_name="/chat")
            for k in range(runs):
                start = time.perf_counter()
                job = client.submit(f"({k}) {message}", "", api_name="/chat")
                while not any(o.get("text") for o in job.outputs()) and not job.done():
                    time.sleep(0.005)
                out.append(time.perf_counter() - start)
                job.result()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="bench/cold_start.json")
    args = parser.parse_args()
    cfg = Config(train=False)
    policy = Policy.from_config(cfg)
    message = [{"role": "user", "content": meeting_notes()}]
    ids = policy.build_prompt(message, GenerationSettings(max_new_tokens=8, temperature=0.0))[0]
    plain = AutoModelForCausalLM.from_pretrained(resolve(cfg.model, cfg.cache_dir), dtype=torch.float32).eval()
    path = policy.engine.model
    rows: dict[str, list[float]] = {}
    default = engine_options(cfg)  # what the app starts its servers with
    variants = {
        f"llama.cpp q8_0, flash attention off, ubatch {cfg.engine_ubatch or 512} (default)": default,
        "llama.cpp q8_0, flash attention on": {**default, "flash_attn": 1},
        "llama.cpp q8_0, ubatch 256": {"ubatch": 256},
        "llama.cpp q8_0, ubatch 512 (llama.cpp's default)": {},
        "llama.cpp q8_0, ubatch 1024": {"ubatch": 1024},
    }
    for _ in range(args.runs):  # interleaved, so a busy moment of the machine hits every row alike
        rows.setdefault("plain transformers fp32 generate", []).append(
            first_token_transformers(plain, policy.tokenizer, ids)
        )
        for name, options in variants.items():
            rows.setdefault(name, []).append(first_token_engine(path, ids, options))
    # A chat's next turn after a hot swap: the new version's server has never seen the history, unless the swap
    # prefilled the chats in use (engine_warm_conversations) before it went live.
    folder = Path(tempfile.mkdtemp()) / "adapter"
    policy.model.save_pretrained(str(folder))  # a fresh LoRA: timing only, its values do not matter
    for k in range(args.runs):
        for warm in (0, cfg.engine_warm_conversations):
            policy.cfg = dataclasses.replace(cfg, engine_warm_conversations=warm)
            turn = [{"role": "user", "content": meeting_notes()}]
            (answer,) = policy.generate(turn, GenerationSettings(max_new_tokens=32, temperature=0.0))
            policy.swap(folder, f"v{k}{warm}")
            nxt = [*turn, {"role": "assistant", "content": answer.text}, {"role": "user", "content": "Who decides?"}]
            name = f"next turn after a swap, {'with' if warm else 'without'} the swap's prefill"
            rows.setdefault(name, []).append(first_token_policy(policy, nxt)[0])
    # What a person waits for: the app's /chat (no trainer), first streamed text of the same message.
    rows["python app.py /chat, first streamed text"] = app_first_text(cfg, meeting_notes(), args.runs)
    # What each engine setting costs later: decode speed after a short prompt and after the long one.
    short = policy.build_prompt([{"role": "user", "content": "Tell me a story."}], GenerationSettings())[0]
    decode = {
        name: {"short": decode_rate(path, short, options), "long": decode_rate(path, ids, options)}
        for name, options in variants.items()
    }
    table = [{"setting": k, "first_token_s": statistics.median(v), "runs": v} for k, v in rows.items()]
    for row in table:
        row["decode_tokens_per_s"] = decode.get(row["setting"])
    ref = table[0]["first_token_s"]
    print(f"{len(ids)} prompt tokens; median of {args.runs} runs")
    for row in table:
        row["vs_transformers"] = row["first_token_s"] / ref
        d = row["decode_tokens_per_s"]
        rates = f"  decode {d['short']:.0f} / {d['long']:.0f} tok/s (short / long prompt)" if d else ""
        print(f"{row['setting']:<50} {row['first_token_s']:6.2f} s  {row['vs_transformers']:.2f}x{rates}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    Path(args.out).write_text(json.dumps({**meta, "prompt_tokens": len(ids), "rows": table}, indent=1))


if __name__ == "__main__":
    main()
