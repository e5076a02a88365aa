"""How good is a version, as a rater sees it: win-rate against the base with an interval, KL, length, fluency.

Knows the statistics (Wilson interval, distinct-n) and one evaluation pass of a served version on held-out prompts
against fixed base answers; knows nothing of SQL, training or Gradio.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence

from rlhf_live.learning.gate import distinct_n, is_answer
from rlhf_live.model.lora import BASE
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.samplers import Answer
from rlhf_live.serving.settings import GenerationSettings

FLUENCY_MARGINS = {"distinct2": 0.05, "eos_rate": 0.10, "answered_rate": 0.05}
"""How much lower than the base's a version's distinct-2, EOS rate and share of real answers may be and still count
as fluent (a blank or parroted answer ends with EOS and has perfect distinct-2: only the last one catches it)."""


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate p over n trials (a tie counts as half a win)."""
    if n == 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def answer_stats(answers: Sequence[Answer], prompts: Sequence[list[dict]] | None = None) -> dict:
    """Mean words and tokens per answer, EOS rate, share of real answers (`is_answer`) and mean distinct-2."""
    n = max(1, len(answers))
    prompts = prompts if prompts is not None else [[]] * len(answers)
    return {
        "answer_words": sum(len(a.text.split()) for a in answers) / n,
        "answer_tokens": sum(len(a.token_ids) for a in answers) / n,
        "eos_rate": sum(a.finish_reason == "eos" for a in answers) / n,
        "distinct2": sum(distinct_n(a.text) for a in answers) / n,
        "answered_rate": sum(is_answer(p, a.text) for p, a in zip(prompts, answers)) / n,
    }


class Evaluator:
    """Scores the live version on held-out prompts against base answers sampled once (the same for every round)."""

    def __init__(
        self,
        policy: Policy,
        rater: Callable[[list[dict], str, str], str],
        prompts: list[list[dict]],
        settings: GenerationSettings,
        seed: int = 0,
    ):
        self.policy, self.rater, self.prompts, self.seed = policy, rater, prompts, seed
        # Base answers with one seed, live answers with another: at round 0 (live = base) the evaluation measures
        # its own noise instead of comparing identical samples.
        self.settings = dataclasses.replace(settings, seed=seed)
        self.base_answers = policy.generate_many(prompts, self.settings, versions=[BASE] * len(prompts))
        self.live_settings = dataclasses.replace(settings, seed=seed + 1)
        self.base = answer_stats(self.base_answers, prompts)

    def evaluate(self, reward_model=None) -> dict:
        """Win-rate of the live version vs the base (ties half, Wilson 95%), KL, length, EOS rate, distinct-2."""
        version = self.policy.version
        answers = self.policy.generate_many(self.prompts, self.live_settings, versions=[version] * len(self.prompts))
        order = random.Random(self.seed).choices((True, False), k=len(self.prompts))  # live shown first or second
        outcomes = []
        for prompt, live, base, live_first in zip(self.prompts, answers, self.base_answers, order):
            a, b = (live.text, base.text) if live_first else (base.text, live.text)
            choice = self.rater(prompt, a, b)
            won = {"A": live_first, "B": not live_first}.get(choice)
            outcomes.append(0.5 if won is None else float(won))
        win_rate = sum(outcomes) / len(outcomes)
        kl = self.policy.kl_to_base(self.prompts, answers, self.settings) if version != BASE else [0.0] * len(answers)
        stats = answer_stats(answers, self.prompts)
        result = {
            "version": version,
            "win_rate": win_rate,
            "win_rate_ci": list(wilson_interval(win_rate, len(outcomes))),
            "ties": outcomes.count(0.5),
            "kl": sum(kl) / len(kl),
            **stats,
            "fluent": all(stats[k] >= self.base[k] - margin for k, margin in FLUENCY_MARGINS.items()),
            "reward_accuracy_on_rater": None,
        }
        if reward_model is not None:
            result["reward_accuracy_on_rater"] = self._reward_accuracy(reward_model, answers, outcomes)
        result["samples"] = [
            {"prompt": p[-1]["content"], "live": a.text, "base": b.text, "outcome": o}
            for p, a, b, o in zip(self.prompts, answers, self.base_answers, outcomes)
        ]
        return result

    def _reward_accuracy(self, reward_model, answers: list[Answer], outcomes: list[float]) -> float | None:
        """How often the reward model orders live vs base answers as the rater did (pairs the rater did not tie)."""
        decided = [i for i, o in enumerate(outcomes) if o != 0.5]
        if not decided:
            return None
        prompts = [self.prompts[i] for i in decided]
        r = reward_model.score(
            prompts + prompts, [answers[i].text for i in decided] + [self.base_answers[i].text for i in decided]
        )
        r_live, r_base = r[: len(decided)], r[len(decided) :]
        right = [
            (1.0 if (rl > rb) == (outcomes[i] == 1.0) else 0.0) if rl != rb else 0.5
            for i, rl, rb in zip(decided, r_live.tolist(), r_base.tolist())
        ]
        return sum(right) / len(right)
