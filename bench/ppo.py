"""Seconds per PPO update on the real default model (NF4 + LoRA), split rollout / scoring / optimisation.

Usage: python bench/ppo.py [--updates 3] [--dtype bfloat16 float32] [--threads 1 2] [--base nf4 dequantized]
                           [--out bench/ppo.json]
`--base nf4` trains on bitsandbytes' packed NF4 linears; `dequantized` on the same values as plain linears
(`models.dequantize_cpu_4bit`, what the trainer does on CPU).
Defaults are the Config's: 8 prompts x 64 new tokens, 4 epochs of 2 minibatches. The reward is a cheap
programmatic one (shorter answers score higher), so the timing is PPO's alone, not a reward model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rlhf_live.config import Config
from rlhf_live.learning import ppo
from rlhf_live.learning.rollout import load_seed_prompts
from rlhf_live.model import base as models
from rlhf_live.model.lora import attach_adapter

KEYS = ("seconds_rollout", "seconds_scoring", "seconds_optimisation", "seconds_total")


def brevity_reward(prompts: list[list[dict]], answers: list[str]) -> torch.Tensor:
    """1 for an empty answer, falling to 0 at 400 characters (a stand-in for a reward model)."""
    return torch.tensor([max(0.0, 1 - len(a) / 400) for a in answers])


def bench(dtype: str, threads: int, base_kind: str, updates: int, cfg_overrides: dict) -> dict:
    """Load the model in NF4 with `dtype` compute, run `updates` PPO updates, return timings and metrics."""
    torch.set_num_threads(threads)
    cfg = Config(compute_dtype=dtype, **cfg_overrides)
    t = time.perf_counter()
    base, tok = models.load_base(cfg)
    if base_kind == "dequantized":
        models.dequantize_cpu_4bit(base)
    model = attach_adapter(base, cfg, trainable=True)
    load_s = time.perf_counter() - t
    trainer = ppo.PPOTrainer(model, tok, cfg, brevity_reward)
    prompts = load_seed_prompts()
    runs = []
    for i in range(updates):
        batch = [prompts[(i * cfg.ppo_batch_size + j) % len(prompts)] for j in range(cfg.ppo_batch_size)]
        m = trainer.step(batch)
        runs.append(m)
        print(
            f"  [{dtype}, {threads} thr, {base_kind}] update {i + 1}: total {m['seconds_total']:.1f}s "
            f"(rollout {m['seconds_rollout']:.1f}, "
            f"scoring {m['seconds_scoring']:.1f}, optimisation {m['seconds_optimisation']:.1f}); "
            f"answer {m['answer_tokens']:.0f} tok, eos {m['eos_rate']:.2f}, kl {m['kl']:.3f}",
            flush=True,
        )
    median = {k: statistics.median(r[k] for r in runs) for k in KEYS}
    return {
        "compute_dtype": dtype,
        "threads": threads,
        "base": base_kind,
        "load_seconds": load_s,
        "median": median,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--base", nargs="+", default=["nf4", "dequantized"], choices=["nf4", "dequantized"])
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).with_name("ppo.json")))
    args = parser.parse_args()
    overrides = {} if args.max_new_tokens is None else {"ppo_max_new_tokens": args.max_new_tokens}
    cfg = Config(**overrides)
    results = [bench(d, n, b, args.updates, overrides) for d in args.dtype for n in args.threads for b in args.base]
    print(
        f"\nPPO update, SmolLM2-135M-Instruct NF4 + LoRA r{cfg.lora_r} {cfg.lora_target}, {cfg.ppo_batch_size} prompts "
        f"x {cfg.ppo_samples_per_prompt} answers x {cfg.ppo_max_new_tokens} tokens, "
        f"{cfg.ppo_epochs} epochs x {cfg.ppo_minibatches} minibatches, "
        f"median of {args.updates}"
    )
    first = results[0]["median"]["seconds_total"]
    print(
        "| compute dtype | threads | base | rollout s | scoring s | optimisation s | total s | total vs first row |\n"
        "|---|---|---|---:|---:|---:|---:|---:|"
    )
    for r in results:
        m = r["median"]
        print(
            f"| {r['compute_dtype']} | {r['threads']} | {r['base']} | {m['seconds_rollout']:.1f} | "
            f"{m['seconds_scoring']:.1f} | {m['seconds_optimisation']:.1f} | {m['seconds_total']:.1f} | "
            f"{m['seconds_total'] / first:.2f}x |"
        )
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "config": {
            k: getattr(cfg, k)
            for k in (
                "ppo_batch_size",
                "ppo_samples_per_prompt",
                "ppo_max_new_tokens",
                "ppo_epochs",
                "ppo_minibatches",
                "lora_r",
                "lora_target",
            )
        },
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
