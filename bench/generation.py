"""Generation speed: time to first token and decode tokens/s, batch 1, 128 new tokens, per precision.

Every variant serves through `Policy.stream` (LoRA attached, as users get it) in one run, so ratios compare.
Usage: python bench/generation.py [--runs 5] [--tokens 128] [--out bench/generation.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rlhf_live.config import Config
from rlhf_live.model.base import resolve, source_gguf
from rlhf_live.serving.engine_files import served_base
from rlhf_live.serving.gguf_export import cached_model_gguf
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.settings import GenerationSettings

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread."}]
LONG = [  # ~1,000 prompt tokens: a conversation with history, where prefill dominates the first token
    *[
        {"role": r, "content": f"Turn {i}: " + "Tell me more about the history of bread baking in Europe. " * 6}
        for i, r in enumerate(["user", "assistant"] * 6)
    ],
    PROMPT[0],
]
VARIANTS = [
    ("NF4 + LoRA, bf16 compute", dict(load_in_4bit=True, compute_dtype="bfloat16")),
    ("NF4 + LoRA, fp32 compute", dict(load_in_4bit=True, compute_dtype="float32")),
    ("bf16 + LoRA", dict(load_in_4bit=False, compute_dtype="bfloat16")),
    ("fp32 + LoRA", dict(load_in_4bit=False, compute_dtype="float32")),
    ("llama.cpp, runtime LoRA, f16", dict(engine="llamacpp", engine_weights="f16", engine_merge=False)),
    ("llama.cpp, runtime LoRA, q8_0", dict(engine="llamacpp", engine_weights="q8_0", engine_merge=False)),
    ("llama.cpp, merged, f16", dict(engine="llamacpp", engine_weights="f16", engine_merge=True)),
    ("llama.cpp, merged, q8_0", dict(engine="llamacpp", engine_weights="q8_0", engine_merge=True)),
]
"""The llama.cpp rows serve the same NF4 weights as the first row (exported once), from the embedded GGUF's metadata."""


def measure(policy: Policy, tokens: int, prompt: list[dict] = PROMPT) -> dict:
    """One greedy answer: seconds to the first token, then decode tokens per second."""
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0)
    start = time.perf_counter()
    first = None
    stream = policy.stream(prompt, settings)
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    n = len(stream.answers[0].token_ids)
    return {
        "ttft_s": first - start,
        "decode_tok_s": (n - 1) / (end - first),
        "tokens": n,
        "prompt": stream.prompt_tokens,
    }


def short(i: int) -> list[dict]:
    """PROMPT, new to every cache (llama.cpp would otherwise reuse the previous run's prompt)."""
    return [{"role": "user", "content": f"{PROMPT[0]['content']} ({i})"}]


def long_history(i: int) -> list[dict]:
    """LONG, made new to every cache by its first words (a history the engine has not seen)."""
    first = {**LONG[0], "content": f"Conversation {i}. {LONG[0]['content']}"}
    return [first, *LONG[1:]]


def measure_next_turn(policy: Policy, i: int) -> dict:
    """A chat's next turn after a ~1,000-token history: the history and its answer were the previous request."""
    history = long_history(1000 + i)
    (answer,) = policy.stream(history, GenerationSettings(max_new_tokens=64, temperature=0.0)).wait()
    turn = [*history, {"role": "assistant", "content": answer.text}, {"role": "user", "content": "And in Asia?"}]
    stream = policy.stream(turn, GenerationSettings(max_new_tokens=8, temperature=0.0))
    start = time.perf_counter()
    next(iter(stream))
    ttft = time.perf_counter() - start
    (reply,) = stream.wait()
    return {"ttft_s": ttft, "prompt": stream.prompt_tokens, "cached": reply.cached_prompt_tokens}


def measure_concurrent(policy: Policy, tokens: int, n: int = 4) -> dict:
    """`n` chats at once (threads, as n people): aggregate decode tokens/s and each chat's time to first token."""
    import threading

    results: list[dict] = [None] * n  # type: ignore[list-item]
    prompts = [[{"role": "user", "content": f"{PROMPT[0]['content']} Version {i}."}] for i in range(n)]

    def one(i: int) -> None:
        results[i] = measure(policy, tokens, prompts[i])

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - start
    return {
        "chats": n,
        "aggregate_tok_s": sum(r["tokens"] for r in results) / took,
        "max_ttft_s": max(r["ttft_s"] for r in results),
    }


def measure_trainer_busy(policy: Policy, runs: int = 5) -> dict:
    """Time to first token of short chats while the in-app trainer runs a PPO round, against the same idle."""
    import tempfile

    from rlhf_live.learning.trainer import Trainer
    from rlhf_live.store import Store

    short = [{"role": "user", "content": "Name three fruits."}]
    idle = [measure(policy, 4, short)["ttft_s"] for _ in range(runs)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(policy.cfg, data_dir=tmp, ppo_updates_per_round=50)
        store = Store.from_config(cfg)
        for i in range(16):  # a few A/B votes so a round has something to fit
            cid = store.new_conversation("bench")
            q = store.add_message(cid, "user", f"Question {i}: tell me about fruit.")
            a = store.add_message(cid, "assistant", "Apples.", parent_id=q)
            b = store.add_message(cid, "assistant", "Fruit grows on trees and bushes everywhere.", parent_id=q)
            store.choose(store.new_comparison(cid, a, b, a_source="base", b_source="base", voter="b"), "b", "A")
        trainer = Trainer(cfg, store, policy)
        trainer.start()
        trainer.request_round()
        while trainer.status()["state"] != "PPO":  # past loading and the reward fit: PPO updates are running
            time.sleep(0.2)
        time.sleep(2)
        busy = []
        for _ in range(runs):
            busy.append(measure(policy, 4, short)["ttft_s"])
            time.sleep(1)  # the trainer gets the cores back between chats, as between people's messages
        trainer.stop()
        trainer.join(600)  # the next measurement gets the cores back
    return {"idle_ttft_s": statistics.median(idle), "busy_ttft_s": statistics.median(busy), "busy": busy}


def measure_plain(policy: Policy, tokens: int, prompt: list[dict], model: Path) -> dict:
    """The same greedy answer from plain llama.cpp on a GGUF file, no adapter, no Policy: the issue's yardstick."""
    import queue
    import threading

    from rlhf_live.serving.llamacpp import LlamaCppEngine, Sampling

    engines = measure_plain.__dict__.setdefault("engines", {})
    if model not in engines:
        threads = policy.cfg.engine_threads or os.cpu_count() or 1
        engines[model] = LlamaCppEngine(model, threads=threads, parallel=1, n_ctx=2048)
    engine = engines[model]
    ids, _ = policy.build_prompt(prompt, GenerationSettings(max_new_tokens=tokens))
    sink: queue.Queue = queue.Queue()
    start, first, n = time.perf_counter(), None, 0
    engine.submit(ids, Sampling(tokens, 0.0, 1.0), None, threading.Event(), sink)
    while (item := sink.get())[1] != "done":
        if item[1] == "token":
            n += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": first - start, "decode_tok_s": (n - 1) / (end - first), "tokens": n, "prompt": len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default="bench/generation.json")
    parser.add_argument("--adapter", default="", help="a trained adapter folder to serve (default: a fresh LoRA)")
    parser.add_argument("--concurrent", type=int, default=4, help="also N chats at once per variant (0: skip)")
    parser.add_argument("--busy", action="store_true", help="also time to first token while a PPO round trains")
    parser.add_argument("--only", default="", help="comma-separated substrings: run the variants whose name has one")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = resolve(Config().model, Config().cache_dir)
    rows = []
    wanted = [w for w in args.only.split(",") if w]
    variants = [v for v in VARIANTS if not wanted or any(w in v[0] for w in wanted)]
    policy = Policy.from_config(Config(model=source, engine="torch"))  # for the plain row's tokenizer and template
    plain = [
        ("plain llama.cpp, served NF4 values q8_0, no adapter", dict(engine="plain", weights="q8_0")),
        ("plain llama.cpp, shipped Q4_1, no adapter", dict(engine="plain")),
    ]
    for name, overrides in [*variants, *plain]:
        if overrides.get("engine") == "plain":  # measured through the last policy's tokenizer and template
            model = source_gguf(policy.cfg)
            if "weights" in overrides:  # the file the llama.cpp rows serve, before any adapter is merged in
                weights = overrides["weights"]
                model = cached_model_gguf(
                    served_base(policy.model), policy.model.config.to_dict(), model, policy.cfg.cache_dir, weights
                )
            runs = [measure_plain(policy, args.tokens, short(i), model) for i in range(args.runs + 1)][1:]
            long_runs = [measure_plain(policy, 8, long_history(i), model) for i in range(max(1, args.runs // 2))]
            rows.append(_row(name, runs, long_runs, model.stat().st_size))
            continue
        model = Config().model if overrides.get("engine") == "llamacpp" else source  # llama.cpp needs the GGUF
        cfg = Config(model=model, max_new_tokens=args.tokens, **overrides)
        policy = Policy.from_config(cfg, args.adapter or None)
        measure(policy, 8)  # warm-up: first call pays one-off allocation costs
        runs = [measure(policy, args.tokens, short(i)) for i in range(args.runs)]
        long_runs = [measure(policy, 8, long_history(i)) for i in range(max(1, args.runs // 2))]
        rows.append(_row(name, runs, long_runs, policy.model.get_memory_footprint()))
        turns = [measure_next_turn(policy, i) for i in range(max(1, args.runs // 2))]
        rows[-1]["next_turn"] = {k: statistics.median(t[k] for t in turns) for k in ("ttft_s", "prompt", "cached")}
        if args.concurrent:
            rows[-1]["concurrent"] = measure_concurrent(policy, args.tokens, args.concurrent)
        if args.busy:
            rows[-1]["trainer_busy"] = measure_trainer_busy(policy)
    base = rows[0]["decode_tok_s"]
    long_n = rows[0]["long_prompt_tokens"]
    long_head = f"TTFT@{long_n}"
    head = f"{'variant':<42} {'TTFT s':>8} {'decode tok/s':>13} {'vs NF4':>8} {'vs plain':>8} {'tokens':>7} {'MB':>7}"
    print(f"{head} {long_head:>10} {'next turn':>10}")
    plain_tok_s = rows[-1]["decode_tok_s"]
    for r in rows:
        r["decode_vs_nf4"] = r["decode_tok_s"] / base
        r["decode_vs_plain"] = r["decode_tok_s"] / plain_tok_s
        turn = f"{r['next_turn']['ttft_s']:>10.3f}" if r.get("next_turn") else f"{'-':>10}"
        c = r.get("concurrent")
        together = ""
        if c:
            ratio = c["aggregate_tok_s"] / r["decode_tok_s"]
            together = f"  {c['chats']} at once: {c['aggregate_tok_s']:.1f} tok/s ({ratio:.2f}x)"
            together += f", max TTFT {c['max_ttft_s']:.2f} s"
        if r.get("trainer_busy"):
            b = r["trainer_busy"]
            together += f"  training: TTFT {b['busy_ttft_s']:.3f} s vs {b['idle_ttft_s']:.3f} idle"
        print(
            f"{r['variant']:<42} {r['ttft_s']:>8.3f} {r['decode_tok_s']:>13.1f} {r['decode_vs_nf4']:>7.2f}x "
            f"{r['decode_vs_plain']:>7.2f}x {r['tokens']:>7.0f} {r['memory_mb']:>7.0f} {r['long_ttft_s']:>10.2f}"
            f"{turn}{together}"
        )
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def _row(name: str, runs: list[dict], long_runs: list[dict], memory: float) -> dict:
    return {
        "variant": name,
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "tokens": statistics.median(r["tokens"] for r in runs),
        "long_prompt_tokens": long_runs[0]["prompt"],
        "long_ttft_s": statistics.median(r["ttft_s"] for r in long_runs),
        "memory_mb": memory / 1e6,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
