"""Votes as the reward model's examples: validated, de-duplicated, weighted, split by conversation, batched by length.

Knows the shapes votes come in (dicts from the store, `formats.Pair` from files, strings or message lists as prompts)
and what makes one unusable; knows nothing of tensors, models or SQL.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field


class RewardDataError(ValueError):
    """The feedback given to the reward model cannot be used; the message says why and what is needed."""


PAIR, TIE, POINT = "pair", "tie", "point"


@dataclass
class Example:
    """One unit of feedback: a pair (seqs = chosen, rejected), a tie (a, b) or a thumb (answer; up)."""

    kind: str
    prompt: list[dict]
    answers: tuple[str, ...]
    group: str
    up: bool = False
    ids: list[list[int]] = field(default_factory=list)
    weight: float = 1.0
    """Its share of the loss (crowd.capped_weights: a source over its cap counts for less; flagged ones are dropped)."""
    source: str = ""
    """Who cast it (the store's voter_source; '' unknown): what the leave-one-source-out test groups by."""

    @property
    def length(self) -> int:
        return max(len(s) for s in self.ids)


def get_field(item, name: str, index: int, what: str):
    """`item.name` or `item[name]`; RewardDataError naming the item when absent."""
    if isinstance(item, dict):
        if name in item:
            return item[name]
    elif hasattr(item, name):
        return getattr(item, name)
    raise RewardDataError(f"{what} #{index} has no '{name}' (expected keys {_KEYS[what]}).")


_KEYS = {"pair": "prompt, chosen, rejected", "tie": "prompt, a, b", "thumb": "prompt, completion, label"}


def as_messages(prompt) -> list[dict]:
    """A conversation as chat messages: a list of {role, content} dicts, or a string (one user message)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and all(
        isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise RewardDataError("a prompt must be a string or a list of {role, content} messages")


def optional_field(item, name: str):
    """`item[name]` or `item.name`, None when absent."""
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def weight_of(item, index: int, what: str) -> float:
    """The item's training weight (1 when it has none); RewardDataError unless finite and >= 0."""
    weight = optional_field(item, "weight")
    if weight is None:
        return 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise RewardDataError(f"{what} #{index}: weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def group_of(item, messages: list[dict]) -> str:
    """Held-out unit: the conversation id when known, else the first user message (turns of one chat stay together)."""
    cid = optional_field(item, "conversation_id")
    if cid is None and not isinstance(item, dict):
        cid = (getattr(item, "meta", None) or {}).get("conversation_id")
    if cid not in (None, ""):
        return f"id:{cid}"
    first = next((m["content"] for m in messages if m["role"] == "user"), messages[0]["content"] if messages else "")
    return f"text:{first}"


def collect(pairs, ties, pointwise) -> tuple[list[Example], dict]:
    """Validate and de-duplicate the feedback; counts of what was dropped and why."""
    out: list[Example] = []
    seen: set[str] = set()
    counts = {"n_duplicates": 0, "n_identical_dropped": 0, "n_zero_weight": 0}

    def add(ex: Example) -> None:
        key = json.dumps([ex.kind, ex.prompt, ex.answers, ex.up], ensure_ascii=False)
        if key in seen:
            counts["n_duplicates"] += 1
            return
        seen.add(key)
        out.append(ex)

    for what, items, names in (
        ("pair", pairs, ("chosen", "rejected")),
        ("tie", ties, ("a", "b")),
        ("thumb", pointwise, ("completion",)),
    ):
        for i, item in enumerate(items or ()):
            prompt = as_messages(get_field(item, "prompt", i, what))
            answers = tuple(get_field(item, n, i, what) for n in names)
            if not all(isinstance(a, str) for a in answers):
                raise RewardDataError(
                    f"{what} #{i}: answers must be strings, got {[type(a).__name__ for a in answers]}"
                )
            group = group_of(item, prompt)
            weight, source = weight_of(item, i, what), optional_field(item, "voter_source") or ""
            if weight == 0:
                counts["n_zero_weight"] += 1  # a flagged or banned source's vote: not trained on, not evaluated on
                continue
            if what == "thumb":
                label = get_field(item, "label", i, what)
                if label not in (True, False, 0, 1):
                    raise RewardDataError(f"thumb #{i}: label must be True (up) or False (down), got {label!r}")
                add(Example(POINT, prompt, answers, group, up=bool(label), weight=weight, source=source))
            elif answers[0] == answers[1]:
                counts["n_identical_dropped"] += 1  # the same text on both sides says nothing about preference
            else:
                add(Example(PAIR if what == "pair" else TIE, prompt, answers, group, weight=weight, source=source))
    kinds = [e.kind for e in out]
    if PAIR not in kinds and POINT not in kinds:
        given = f"{len(list(pairs or ()))} pairs, {len(list(ties or ()))} ties, {len(list(pointwise or ()))} thumbs"
        if TIE in kinds:
            raise RewardDataError(
                f"Only ties were given ({given}): ties say two answers are equally good but not which answers are "
                "good. The reward model needs at least one A/B choice or one thumbs-up/down."
            )
        raise RewardDataError(
            f"No usable feedback ({given}; {counts['n_identical_dropped']} pairs had two identical answers). "
            "The reward model needs at least one A/B choice between different answers, or one thumbs-up/down."
        )
    return out, counts


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out whole conversations, drawn among those with A/B pairs (accuracy needs pairs) when there are any."""
    groups = sorted({e.group for e in examples})
    with_pairs = sorted({e.group for e in examples if e.kind == PAIR})
    pool = with_pairs or groups
    # Keep at least one conversation of the pool for training.
    n_eval = min(math.ceil(eval_fraction * len(pool)), len(pool) - 1) if eval_fraction > 0 else 0
    # Hash with the seed, so the split is stable when new feedback arrives (a conversation stays on its side).
    ranked = sorted(pool, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    held = set(ranked[:n_eval])
    return [e for e in examples if e.group not in held], [e for e in examples if e.group in held]


def split_counts(train: list[Example], held: list[Example]) -> dict:
    """How many examples of each kind were trained on and held out."""
    kinds = [e.kind for e in train]
    return {
        "n_train": len(train),
        "n_eval": len(held),
        "n_train_pairs": kinds.count(PAIR),
        "n_train_ties": kinds.count(TIE),
        "n_train_thumbs": kinds.count(POINT),
        "n_eval_pairs": sum(e.kind == PAIR for e in held),
    }


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices in batches of similar length: shuffle, sort within mega-batches of 16 batches, shuffle batches.

    Less padding while keeping randomness, like transformers' LengthGroupedSampler
    (https://github.com/huggingface/transformers/blob/main/src/transformers/trainer_pt_utils.py).
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 16
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def micro_batches(batch: list[Example], max_tokens: int) -> list[list[Example]]:
    """Consecutive slices of `batch` whose padded size (sequences x longest) stays within max_tokens."""
    out: list[list[Example]] = [[]]
    for ex in batch:
        trial = [*out[-1], ex]
        if out[-1] and sum(len(e.ids) for e in trial) * max(e.length for e in trial) > max_tokens:
            out.append([ex])
        else:
            out[-1] = trial
    return out
