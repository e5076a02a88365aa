"""How often the base model's answers loop, per sampling setting: the share that repeats itself (and runs to the cap).

Every seed prompt (assets/seed_prompts.jsonl, which the evaluation's held-out prompts come from) is answered once per
variant by the served policy (llama.cpp on the NF4 weights, as users get it), plus one row for plain llama.cpp on
the shipped Q4_1 file (is it the re-quantized weights?). An answer *loops* when `sampling.loop_cut` finds 3+ copies of
the same tokens in it (or the loop stop cut it). Samples of each variant are written for reading.
Usage: python bench/loops.py [--prompts 320] [--tokens 256] [--variants base,rp1.1,...] [--out bench/loops.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import queue
import statistics
import threading
import time
from pathlib import Path

from rlhf_live.config import Config
from rlhf_live.eval.evaluation import is_answer
from rlhf_live.learning.rollout import load_seed_prompts
from rlhf_live.model.base import source_gguf
from rlhf_live.model.sampling import loop_cut
from rlhf_live.serving import llamacpp as llama
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.samplers import Answer, engine_sampling
from rlhf_live.serving.settings import GenerationSettings

OFF = {"repetition_penalty": 1.0, "stop_loops": False}
VARIANTS = {  # name -> (what it is, settings over Config's defaults)
    "before": ("T 0.7, top-p 0.9, no repetition control (the defaults until 2026-12-02)", OFF),
    "default": ("today's defaults: repetition penalty 1.1 + loop stop", {}),
    "stop": ("loop stop only", {**OFF, "stop_loops": True}),
    "rp1.1": ("repetition penalty 1.1 only", {**OFF, "repetition_penalty": 1.1}),
    "rp1.2": ("repetition penalty 1.2 only", {**OFF, "repetition_penalty": 1.2}),
    "rp1.3": ("repetition penalty 1.3 only", {**OFF, "repetition_penalty": 1.3}),
    "t0.3": ("T 0.3, no repetition control", {**OFF, "temperature": 0.3}),
    "t1.0": ("T 1.0, no repetition control", {**OFF, "temperature": 1.0}),
    "original": ("plain llama.cpp on the shipped Q4_1 file, no repetition control", OFF),
    "no-nf4": ("torch on the shipped weights in bf16 (no NF4 re-quantization), no repetition control", OFF),
}


def distinct2(tokens: list[int]) -> float:
    """Distinct bigrams / bigrams of one answer (1 = no bigram repeats)."""
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def summarise(answers: list[Answer], prompts: list[list[dict]], cap: int) -> dict:
    """Loop share, cap share and answer statistics of one variant."""
    looped = [a.finish_reason == "loop" or loop_cut(a.token_ids) is not None for a in answers]
    to_cap = [a.finish_reason == "length" or len(a.token_ids) >= cap for a in answers]
    n = len(answers)
    return {
        "loop_share": sum(looped) / n,
        "loop_to_cap_share": sum(lo and c for lo, c in zip(looped, to_cap)) / n,
        "cap_share": sum(to_cap) / n,
        "eos_share": sum(a.finish_reason == "eos" for a in answers) / n,
        "cut_share": sum(a.finish_reason == "loop" for a in answers) / n,
        "answered_share": sum(is_answer(p, a.text) for p, a in zip(prompts, answers)) / n,
        "mean_tokens": statistics.mean(len(a.token_ids) for a in answers),
        "mean_distinct2": statistics.mean(distinct2(a.token_ids) for a in answers),
    }


def plain_llamacpp(path: Path, policy: Policy, prompts: list[list[dict]], settings: GenerationSettings) -> list[Answer]:
    """Answers of plain llama.cpp on `path` (no adapter), with the same prompts and sampler settings."""
    engine = llama.LlamaCppEngine(path, threads=os.cpu_count() or 1, parallel=4, n_ctx=2048)
    sink: queue.Queue = queue.Queue()
    answers = [Answer() for _ in prompts]
    for i, p in enumerate(prompts):
        ids = policy.build_prompt(p, settings)[0]
        engine.submit(ids, engine_sampling(settings, i), None, threading.Event(), sink, i)
    running = len(prompts)
    while running:
        i, kind, value = sink.get()
        if kind == "token" and value != policy.tokenizer.eos_token_id:
            answers[i].token_ids.append(value)
        elif kind == "finish":
            answers[i].finish_reason = value
        elif kind == "done":
            running -= 1
    for a in answers:
        a.text = policy.tokenizer.decode(a.token_ids, skip_special_tokens=True)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=320)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--out", default="bench/loops.json")
    args = parser.parse_args()
    cfg = Config(train=False, seed=0)
    policy = Policy.from_config(cfg)
    prompts = load_seed_prompts()[: args.prompts]
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    rows, samples = [], {}
    for name in wanted:
        label, overrides = VARIANTS[name]
        settings = GenerationSettings.from_config(cfg, max_new_tokens=args.tokens, seed=0)
        settings = dataclasses.replace(settings, **overrides)
        start = time.perf_counter()
        if name == "original":
            answers = plain_llamacpp(source_gguf(cfg), policy, prompts, settings)
        elif name == "no-nf4":
            other = Policy.from_config(dataclasses.replace(cfg, engine="torch", load_in_4bit=False))
            answers = other.generate_many(prompts, settings)
            del other
        else:
            answers = policy.generate_many(prompts, settings)
        row = {
            "variant": name,
            "what": label,
            **summarise(answers, prompts, args.tokens),
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        samples[name] = [
            {"prompt": p[-1]["content"], "answer": a.text, "finish": a.finish_reason} for p, a in zip(prompts, answers)
        ]
        print(
            f"{name:<11} loop {row['loop_share']:.3f}  loop->cap {row['loop_to_cap_share']:.3f}"
            f"  cap {row['cap_share']:.3f}"
            f"  eos {row['eos_share']:.3f}  answered {row['answered_share']:.3f}  tokens {row['mean_tokens']:.0f}"
            f"  distinct-2 {row['mean_distinct2']:.3f}  ({row['seconds']:.0f} s)",
            flush=True,
        )
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    meta |= {"prompts": len(prompts), "tokens": args.tokens, "engine": policy.engine_name}
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    Path(args.out).with_suffix(".samples.json").write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    main()
