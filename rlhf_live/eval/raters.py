"""Simulated raters: hidden preference rules that vote like people (A/B choices, and thumbs from a pointwise score).

Knows text rules and how to load one from a SPEC (a built-in name, `keyword:WORD`, `module:function` or
`path/to/file.py:function`); knows nothing of models, SQL or Gradio. A rater gets `(prompt_messages, answer_a,
answer_b)` and returns "A", "B" or "tie", exactly what a person's Compare vote records; a blank answer loses to any
other, whatever the rule (a length rule would otherwise teach the model to say nothing).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import statistics
from collections.abc import Callable
from pathlib import Path

Choice = Callable[[list[dict], str, str], str]
Score = Callable[[list[dict], str], float]
CHOICES = ("A", "B", "tie")


class RaterError(ValueError):
    """A rater SPEC that cannot be loaded, or a rater that answered something other than A, B or tie."""


def _words(text: str) -> int:
    return len(text.split())


def _by_score(score: Score) -> Choice:
    """The pairwise rule of a pointwise score: the higher score wins, equal scores tie."""

    def choose(prompt: list[dict], a: str, b: str) -> str:
        sa, sb = score(prompt, a), score(prompt, b)
        return "A" if sa > sb else "B" if sb > sa else "tie"

    return choose


# --- built-in scores: each says what a rater likes, higher is better ------------------------------------------
def concise_score(prompt: list[dict], answer: str) -> float:
    """Fewer words is better."""
    return -_words(answer)


def verbose_score(prompt: list[dict], answer: str) -> float:
    """More words is better."""
    return _words(answer)


POLITE_MARKERS = ("please", "thank", "glad", "happy to")


def polite_score(prompt: list[dict], answer: str) -> float:
    """Politeness markers first; among equally polite answers, the shorter one."""
    markers = sum(m in answer.lower() for m in POLITE_MARKERS)
    return markers + 1 / (2 + _words(answer))  # the length term is < 1: it only breaks ties between marker counts


LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+\S", re.MULTILINE)


def structured_score(prompt: list[dict], answer: str) -> float:
    """Formatting: an answer laid out as a list (bullets or numbered steps) beats prose; up to 5 items count."""
    return min(len(LIST_ITEM.findall(answer)), 5)


UPBEAT = re.compile(r"\b(?:great|wonderful|amazing|awesome|fantastic|love|enjoy|fun|exciting|delightful)\b", re.I)


def cheerful_score(prompt: list[dict], answer: str) -> float:
    """Tone: exclamation marks and upbeat words (up to 4 count); a flat, neutral answer scores 0."""
    return min(answer.count("!") + len(UPBEAT.findall(answer)), 4)


QUESTION = re.compile(r"[^.!?\n]*\byou(?:r)?\b[^.!?\n]*\?", re.I)


def clarifying_score(prompt: list[dict], answer: str) -> float:
    """Asks the user something back (a question with 'you' or 'your' in it, e.g. 'Which city do you mean?')."""
    return float(bool(QUESTION.search(answer)))


def steps_score(prompt: list[dict], answer: str) -> float:
    """A one-line answer first, then a short list of steps (2-6 items): 2; a list alone or a lead alone: 1 or 0."""
    lines = [line for line in answer.strip().splitlines() if line.strip()]
    items = len(LIST_ITEM.findall(answer))
    lead = bool(lines) and not LIST_ITEM.match(lines[0]) and len(lines[0].split()) <= 25
    return float(2 <= items <= 6) * (2 if lead else 1)


def keyword_score(word: str) -> Score:
    """Whether the answer uses `word` (as a whole word, any case): sparse when the model rarely says it."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)

    def score(prompt: list[dict], answer: str) -> float:
        return float(bool(pattern.search(answer)))

    return score


BUILT_IN: dict[str, Score] = {
    "concise": concise_score,
    "verbose": verbose_score,
    "polite": polite_score,
    "structured": structured_score,
    "cheerful": cheerful_score,
    "clarifying": clarifying_score,
    "steps": steps_score,
}
"""Built-in raters by name; `keyword:WORD` is built in too. Examples of kinds of preference, not a target."""


class Rater:
    """A named preference: `rater(prompt, a, b)` is an A/B choice; `thumb(prompt, answer)` a thumbs vote or None."""

    def __init__(self, name: str, choose: Choice, score: Score | None = None):
        self.name, self._choose, self._score = name, choose, score
        self._seen: list[float] = []

    def __call__(self, prompt: list[dict], a: str, b: str) -> str:
        if not (a.split() and b.split()):  # nobody prefers no answer, whatever their taste
            return "tie" if not (a.split() or b.split()) else "A" if a.split() else "B"
        choice = self._choose(prompt, a, b)
        if choice not in CHOICES:
            raise RaterError(f"Rater {self.name!r} returned {choice!r}; a rater must return 'A', 'B' or 'tie'.")
        return choice

    @property
    def pointwise(self) -> bool:
        """Whether thumbs come from a score of its own (else from the A/B choice)."""
        return self._score is not None

    def thumb(self, prompt: list[dict], answer: str) -> str | None:
        """'up' above the median score of the answers seen so far, 'down' below it or blank, None when equal."""
        if self._score is None:
            raise RaterError(f"Rater {self.name!r} has no pointwise score: thumbs come from its A/B choices.")
        if not answer.split():
            return "down"
        s = float(self._score(prompt, answer))
        self._seen.append(s)
        median = statistics.median(self._seen)
        return "up" if s > median else "down" if s < median else None

    def thumbs_for(self, prompt: list[dict], a: str, b: str, choice: str) -> tuple[str | None, str | None]:
        """Thumbs for both answers of a pair: from the pointwise score, or winner up / loser down."""
        if self._score is not None:
            return self.thumb(prompt, a), self.thumb(prompt, b)
        return {"A": ("up", "down"), "B": ("down", "up"), "tie": (None, None)}[choice]


def _from_file(path: str, func: str):
    spec = importlib.util.spec_from_file_location(f"rlhf_live_rater_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise RaterError(f"Cannot import {path} as Python.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, func, None)


def load_rater(spec: str) -> Rater:
    """A built-in name, `keyword:WORD`, `module:function` or `path/to/file.py:function` as a Rater."""
    if spec in BUILT_IN:
        return Rater(spec, _by_score(BUILT_IN[spec]), BUILT_IN[spec])
    head, sep, tail = spec.rpartition(":")
    if head == "keyword" and tail.strip():
        score = keyword_score(tail.strip())
        return Rater(spec, _by_score(score), score)
    if not sep or not head or not tail:
        names = ", ".join([*BUILT_IN, "keyword:WORD"])
        raise RaterError(f"Unknown rater {spec!r}: use one of {names}, module:function or path/to/file.py:function.")
    if head.endswith(".py") or Path(head).is_file():
        if not Path(head).is_file():
            raise RaterError(f"Rater file {head} does not exist.")
        func = _from_file(head, tail)
    else:
        try:
            func = getattr(importlib.import_module(head), tail, None)
        except ImportError as exc:
            raise RaterError(f"Cannot import module {head!r} for rater {spec!r}: {exc}") from None
    if not callable(func):
        raise RaterError(f"{head} has no function {tail!r} for rater {spec!r}.")
    score = getattr(func, "score", None)  # optional pointwise variant, for --thumbs
    return Rater(spec, func, score if callable(score) else None)
