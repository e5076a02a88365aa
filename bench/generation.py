"""Generation speed: time to first token and decode tokens/s, batch 1, 128 new tokens, per precision.

Every variant serves through `Policy.stream` (LoRA attached, as users get it) in one run, so ratios compare.
Usage: python bench/generation.py [--runs 5] [--tokens 128] [--out bench/generation.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from rlhf_live.config import Config
from rlhf_live.models import resolve
from rlhf_live.policy import GenerationSettings, Policy

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
    ("llama.cpp, NF4 values f16 + LoRA", dict(engine="llamacpp", engine_weights="f16")),
    ("llama.cpp, NF4 values q8_0 + LoRA", dict(engine="llamacpp", engine_weights="q8_0")),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default="bench/generation.json")
    parser.add_argument("--adapter", default="", help="a trained adapter folder to serve (default: a fresh LoRA)")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = resolve(Config().model, Config().cache_dir)
    rows = []
    for name, overrides in VARIANTS:
        model = Config().model if overrides.get("engine") == "llamacpp" else source  # llama.cpp needs the GGUF
        cfg = Config(model=model, max_new_tokens=args.tokens, **overrides)
        policy = Policy.from_config(cfg, args.adapter or None)
        measure(policy, 8)  # warm-up: first call pays one-off allocation costs
        runs = [measure(policy, args.tokens) for _ in range(args.runs)]
        long_runs = [measure(policy, 8, LONG) for _ in range(max(1, args.runs // 2))]
        rows.append(
            {
                "variant": name,
                "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                "tokens": statistics.median(r["tokens"] for r in runs),
                "long_prompt_tokens": long_runs[0]["prompt"],
                "long_ttft_s": statistics.median(r["ttft_s"] for r in long_runs),
                "memory_mb": policy.model.get_memory_footprint() / 1e6,
                "runs": runs,
            }
        )
        del policy
    base = rows[0]["decode_tok_s"]
    long_n = rows[0]["long_prompt_tokens"]
    long_head = f"TTFT@{long_n}"
    print(f"{'variant':<34} {'TTFT s':>8} {'decode tok/s':>13} {'vs NF4':>8} {'tokens':>7} {'MB':>7} {long_head:>10}")
    for r in rows:
        r["decode_vs_nf4"] = r["decode_tok_s"] / base
        print(
            f"{r['variant']:<34} {r['ttft_s']:>8.3f} {r['decode_tok_s']:>13.1f} {r['decode_vs_nf4']:>7.2f}x "
            f"{r['tokens']:>7.0f} {r['memory_mb']:>7.0f} {r['long_ttft_s']:>10.2f}"
        )
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
