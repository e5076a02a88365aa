"""`rlhf-live reward-eval`: fit the reward model on a file of pairs and measure it on another, beside the length
baselines any reward model must beat (longer wins, shorter wins) and its accuracy where lengths are similar.

Knows files of pairs and these statistics; knows nothing of the store or serving.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf_live.config import Config
from rlhf_live.learning.reward.data import RewardDataError


def _length_accuracy(pairs: Sequence) -> float:
    """Accuracy of 'the longer answer wins' (characters; equal length counts half)."""
    right = [
        1.0 if len(p.chosen) > len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0 for p in pairs
    ]
    return sum(right) / len(right) if right else float("nan")


SIMILAR_LENGTH = 0.2
"""Pairs whose answers differ by at most this fraction of the longer one count as 'similar length'."""


def _similar_length(pairs: Sequence) -> list[bool]:
    """For each pair: do its answers differ by at most SIMILAR_LENGTH of the longer one (in characters)?"""
    return [abs(len(p.chosen) - len(p.rejected)) <= SIMILAR_LENGTH * max(len(p.chosen), len(p.rejected)) for p in pairs]


def length_baselines(pairs: Sequence) -> dict:
    """What the length rule ('the longer answer wins') scores on these pairs, and the sizes of the length subsets."""
    similar = [p for p, s in zip(pairs, _similar_length(pairs), strict=True) if s]
    return {
        "n_shorter_chosen": sum(len(p.chosen) < len(p.rejected) for p in pairs),
        "n_similar_length": len(similar),
        "length_baseline": _length_accuracy(pairs),
        "similar_length_baseline": _length_accuracy(similar) if similar else None,
    }


def accuracy_by_length(r_chosen: torch.Tensor, r_rejected: torch.Tensor, pairs: Sequence) -> dict:
    """Accuracy overall and split by length, to show what is learned beyond 'longer is better'.

    On pairs where the chosen answer is the shorter one the length rule scores 0; on similar-length pairs it has
    little to go on. Ties in reward count half. Subsets that are empty give None.
    """
    right = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()  # (N,)
    lc = torch.tensor([len(p.chosen) for p in pairs], dtype=torch.float)  # (N,)
    lr = torch.tensor([len(p.rejected) for p in pairs], dtype=torch.float)  # (N,)
    similar = torch.tensor(_similar_length(pairs), dtype=torch.bool)  # (N,)

    def mean(mask: torch.Tensor) -> float | None:
        return right[mask].mean().item() if mask.any() else None

    return {
        "accuracy": right.mean().item(),
        "shorter_chosen_accuracy": mean(lc < lr),
        "longer_chosen_accuracy": mean(lc > lr),
        "similar_length_accuracy": mean(similar),
        **length_baselines(pairs),
    }


def reward_eval(
    cfg: Config, train: str, tests: list[str], limit_train: int | None = None, limit_test: int | None = None
) -> dict:
    """Fit on the first `limit_train` pairs of `train`, report held-out accuracy on each test file.

    When a test file is the train file, its test pairs are the last `limit_test` ones not used for training.
    Also reports the length-only baseline and the accuracy on pairs where the chosen answer is the shorter one.
    """
    from rlhf_live.learning.reward import create_reward_model
    from rlhf_live.store.formats import read_pairs

    start = time.time()
    train_all = list(read_pairs(train))
    train_pairs = train_all[:limit_train] if limit_train else train_all
    if not tests:
        raise RewardDataError("reward-eval needs at least one --test file.")
    test_sets: dict[str, list] = {}
    for path in tests:
        if Path(path).resolve() == Path(train).resolve():
            pool = train_all[len(train_pairs) :]
            test_sets[path] = pool[-limit_test:] if limit_test else pool
        else:
            pool = list(read_pairs(path))
            test_sets[path] = pool[:limit_test] if limit_test else pool
        if not test_sets[path]:
            raise RewardDataError(f"No test pairs in {path} (all of them are used for training?).")

    rm = create_reward_model(cfg)  # the reward model the app trains (Config.reward_kind), not always the LoRA one
    fit = rm.fit(train_pairs)
    fit.pop("history", None)
    by_length, seconds_by_file = {}, {}
    for path, pairs in test_sets.items():
        t0 = time.time()
        prompts = [p.prompt for p in pairs]
        r = rm.score(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        by_length[path] = accuracy_by_length(r[: len(pairs)], r[len(pairs) :], pairs)
        seconds_by_file[path] = round(time.time() - t0, 2)
    first = tests[0]
    return {
        "accuracy": by_length[first]["accuracy"],
        "accuracy_by_file": {p: d["accuracy"] for p, d in by_length.items()},
        "length_baseline_by_file": {p: d["length_baseline"] for p, d in by_length.items()},
        "shorter_chosen_accuracy_by_file": {p: d["shorter_chosen_accuracy"] for p, d in by_length.items()},
        "by_length_by_file": by_length,
        "n_train": len(train_pairs),
        "n_test": len(test_sets[first]),
        "n_test_by_file": {p: len(v) for p, v in test_sets.items()},
        "fit": fit,
        "fit_seconds": fit["seconds"],
        "test_seconds_by_file": seconds_by_file,
        "seconds": round(time.time() - start, 2),
    }
