"""Votes and stand-ins several test files share: seeded A/B choices, marker pairs a reward model can learn, a policy
stand-in with no model, and the tiny-training flags of app processes."""

from __future__ import annotations

import random

from rlhf_live.store import Store

TINY_TRAINING = [
    *("--no-load-in-4bit", "--compute-dtype", "float32", "--lora-r", "4", "--lora-alpha", "8"),
    *("--max-context-tokens", "256", "--ppo-batch-size", "2", "--ppo-max-new-tokens", "6"),
    *("--ppo-updates-per-round", "1", "--ppo-epochs", "1", "--ppo-minibatches", "1"),
]


WORDS = ["apple", "banana", "cherry", "weather", "sunny", "warm", "paris", "france", "help", "today"]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def marker_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose chosen answer ends in 'thank you' and rejected in 'hello'; the rest of the answer is shared."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(5))
        out.append(
            {
                "prompt": user(f"question {i}: " + " ".join(rng.choice(WORDS) for _ in range(4))),
                "chosen": body + " thank you",
                "rejected": body + " hello",
                "conversation_id": f"c{i}",
            }
        )
    return out


def seed_votes(store: Store, n: int = 4) -> None:
    for i in range(n):
        cid = store.new_conversation("s")
        q = store.add_message(cid, "user", f"Tell me about apples {i}")
        a = store.add_message(cid, "assistant", "Red.", parent_id=q)
        b = store.add_message(cid, "assistant", "They grow on trees in autumn.", parent_id=q)
        store.choose(store.new_comparison(cid, a, b, a_source="base", b_source="base", voter="s"), "s", "A")


class FakePolicy:
    """Only what the request checks and the status need (no model: these tests are about who asks)."""

    version = "base"
    generating = False
    engine_name = engine_note = ""
