"""The last check before a version goes live: drifted too far, shrank, repeats itself, or stopped answering.

Knows the gate's limits (Config) and how an answer is judged as text (distinct-n, says something); knows nothing of
tensors, the store or how the answers were sampled.
"""

from __future__ import annotations

import re

from rlhf_live.config import Config


class TrainingRejected(RuntimeError):
    """A round finished but its result failed a guardrail, so it was not made live; the message says which."""


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct n-grams / all n-grams of one answer's words (Li et al. 2016, arXiv 1510.03055); 1 for short ones."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _words_of(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def is_answer(prompt: list[dict], text: str) -> bool:
    """Whether `text` says something: not blank, and not just a piece of the conversation (question, system prompt)."""
    words = _words_of(text)
    # Found by reading answers: a version rewarded for brevity learned to answer "What is X?" with "What is X" or
    # with its system prompt; such answers end with EOS and never repeat, so no other statistic flags them.
    return bool(words) and not any(f" {words} " in f" {_words_of(m['content'])} " for m in prompt)


def mean_distinct2(answers: list[str]) -> float:
    """Mean per-answer distinct-2 of sampled answers (1.0 for none): the gate's degeneracy signal."""
    return sum(distinct_n(a) for a in answers) / len(answers) if answers else 1.0


def answered_rate(prompts: list[list[dict]], answers: list[str]) -> float:
    """Share of sampled answers that say something (`is_answer`; 1.0 for none): the gate's parroting signal."""
    return sum(is_answer(p, a) for p, a in zip(prompts, answers)) / len(answers) if answers else 1.0


def gate(cfg: Config, metrics: dict) -> None:
    """Refuse to make a round live when it drifted too far, or its answers collapsed or repeat (TrainingRejected)."""
    # (metric, refuse when it is over (+1) or under (-1) the limit, limit, why), checked in this order.
    checks = [
        (
            "sample/kl",
            +1,
            cfg.max_kl_per_answer,
            "mean KL to the base model {v:.2f} nats per answer is over the gate of {g}",
        ),
        # A reward model fitted on "shorter won" votes scores an empty answer highest; its KL can stay under the gate
        # (measured: 19.6 nats, 0 words, bench/RESULTS.md ## Simulated raters), so length is gated on its own.
        ("sample/answer_tokens", -1, cfg.min_answer_tokens, "answers shrank to {v:.1f} tokens on average (gate: {g})"),
        # Reward hacking by repetition ("I'm so glad! I'm so glad! ...") kept KL near the gate while distinct-2 fell
        # from 0.93 to 0.62 (bench/RESULTS.md ## Simulated raters, cheerful): a degenerate round is refused on its own.
        (
            "sample/distinct2",
            -1,
            cfg.min_distinct2,
            "answers repeat themselves: mean distinct-2 {v:.2f} is under the gate of {g}",
        ),
        # Rewarded for brevity, PPO went live answering "What is X?" with "What is X" or its system prompt for 11 of
        # 32 held-out prompts (bench/RESULTS.md ## Learners): short, fluent-looking, and not an answer.
        (
            "sample/answered_rate",
            -1,
            cfg.min_answered_rate,
            "only {v:.0%} of sampled answers say something (the rest are blank or repeat the question or "
            "system prompt; gate: {g:.0%})",
        ),
    ]
    for metric, side, limit, why in checks:
        value = metrics.get(metric)
        if value is not None and side * (value - limit) > 0:
            raise TrainingRejected(why.format(v=value, g=limit) + ": the version stays a candidate.")
