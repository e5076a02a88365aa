"""Does the repetition control cost correctness? One-fact questions answered by the served base, control on vs off.

Each question is answered once per seed by the served policy (as users get it), with the default repetition control
(penalty + loop stop) and without it, the same seeds for both; an answer counts when it names the fact (a regex).
Usage: python bench/facts.py [--seeds 12] [--tokens 64] [--out bench/facts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

from rlhf_live.config import Config
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.settings import GenerationSettings

QUESTIONS = [
    ("What is the capital of France?", r"\bParis\b"),
    ("What is the tallest mountain in the world?", r"Everest"),
    ("How many legs does a spider have?", r"\b(eight|8)\b"),
    ("What is the largest planet in our solar system?", r"Jupiter"),
    ("Who wrote Romeo and Juliet?", r"Shakespeare"),
    ("What is the boiling point of water in Celsius?", r"\b100\b"),
]
VARIANTS = {"control on (default)": {}, "control off": {"repetition_penalty": 1.0, "stop_loops": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="bench/facts.json")
    args = parser.parse_args()
    cfg = Config(train=False)
    policy = Policy.from_config(cfg)
    rows = []
    for name, overrides in VARIANTS.items():
        per_question, samples = [], []
        for question, pattern in QUESTIONS:
            right = 0
            for seed in range(args.seeds):
                settings = GenerationSettings.from_config(cfg, max_new_tokens=args.tokens, seed=seed, **overrides)
                (answer,) = policy.generate([{"role": "user", "content": question}], settings)
                right += bool(re.search(pattern, answer.text, re.IGNORECASE))
                samples.append({"question": question, "seed": seed, "answer": answer.text})
            per_question.append(right)
        total = args.seeds * len(QUESTIONS)
        rows.append(
            {
                "variant": name,
                "correct": sum(per_question),
                "of": total,
                "per_question": per_question,
                "samples": samples,
            }
        )
        print(f"{name:<22} {sum(per_question)}/{total} = {sum(per_question) / total:.2f}  per question {per_question}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    Path(args.out).write_text(json.dumps({**meta, "questions": [q for q, _ in QUESTIONS], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
