"""Each source's influence on a round: the cap on its share of training weight, the evidence that it votes against all.

Knows sources as opaque strings and votes as numbers (a weight, the probability the others' model gives it); knows
no SQL, no tensors and no model: the store says who voted, the reward model says how likely each vote was.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

UNKNOWN = ""
"""The source of a vote recorded before sources existed, or imported: not a person, so it is never capped or flagged."""


def capped_weights(sources: Sequence[str], max_share: float, zeroed: frozenset[str] = frozenset()) -> list[float]:
    """A weight per vote (mean 1 over those kept) so that no source holds more than `max_share` of the total."""
    # A source over the cap keeps all its votes at a lower weight each (down-weighted, not dropped); sources in
    # `zeroed` (flagged or banned) weigh 0; with too few sources for the cap every source gets an equal share.
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], not {max_share}")
    counts = Counter(s for s in sources if s not in zeroed)
    people = sorted((n for s, n in counts.items() if s != UNKNOWN), reverse=True)  # votes per person, largest first
    free = counts.get(UNKNOWN, 0)  # unknown-source votes weigh 1 each and count in the total
    level = _level(people, free, max_share)
    raw = [0.0 if s in zeroed else 1.0 if s == UNKNOWN or counts[s] <= level else level / counts[s] for s in sources]
    total = sum(raw)
    n_kept = sum(1 for s in sources if s not in zeroed)
    return [w * n_kept / total if total else 0.0 for w in raw]


def _level(people: list[int], free: int, max_share: float) -> float:
    """The most weight one source may carry: the largest L <= max_share * (free + sum of min(n, L)) (water-filling)."""
    # `people` is each source's vote count, largest first. The k largest are cut to L, the rest keep their count;
    # the first k (from 0) whose L falls between the two groups is the least cut.
    if not people:
        return math.inf
    for k in range(len(people) + 1):
        rest = free + sum(people[k:])
        if k == 0:
            if people[0] <= max_share * rest:
                return math.inf  # nobody is over the cap
            continue
        if max_share * k >= 1:
            break
        level = max_share * rest / (1 - max_share * k)
        if (k == len(people) or people[k] <= level) and level <= people[k - 1]:
            if level > 0:
                return level
            break
    # Too few sources for the cap (two people and a 25% cap): the fairest weights left are equal shares.
    return float(people[-1])


def shares(sources: Sequence[str], weights: Sequence[float]) -> dict[str, float]:
    """Each known source's share of the total weight (unknown-source votes count in the total, not as a source)."""
    total = sum(weights)
    out: dict[str, float] = {}
    for s, w in zip(sources, weights):
        if s != UNKNOWN and w > 0:
            out[s] = out.get(s, 0.0) + w / total
    return out


@dataclass(frozen=True)
class Evidence:
    """How a source's votes sit with everyone else's: its votes, how many the others agree with, the log odds."""

    votes: int
    agree: float
    """Share of its votes the others' model casts the same way (a vote at exactly 0.5 counts half)."""
    log_odds: float
    """log P(its votes | it votes against the others) - log P(its votes | it votes as a typical source): > 0 leans
    contrarian."""


def agreement(probs: Sequence[float]) -> float:
    """Share of votes a model fitted without their source casts the same way (each p is the vote's probability)."""
    return sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in probs) / len(probs) if probs else 0.5


def typical_agreement(probs_by_source: dict[str, Sequence[float]], min_votes: int = 2) -> float:
    """How often the others' model agrees with a typical source: the median over sources with `min_votes` votes."""
    # The median, not the pooled rate: a contrarian casting half of all votes still is one source of several.
    # Clamped to [0.5, 0.95]: a model no better than chance can accuse nobody, and no agreement is ever certain.
    rates = sorted(agreement(p) for p in probs_by_source.values() if len(p) >= min_votes)
    if not rates:
        return 0.5
    mid = len(rates) // 2
    median = rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2
    return min(max(median, 0.5), 0.95)


def evidence(probs: Sequence[float], typical: float) -> Evidence:
    """A source's votes as a sequential probability-ratio test: agrees as often as a typical source, or its mirror."""
    # Wald 1945: "agrees with the others' model as often as a typical source" (`typical`) vs "as often as its mirror
    # image" (1 - typical). It counts agreements instead of multiplying the model's own probabilities: on the real
    # model, a probe fitted on ~60 votes was confidently wrong often enough that honest voters scored as contrarians
    # (bench/RESULTS.md, Crowd). Chatbot Arena's malicious-user test also scores each vote under the other voters'
    # model (Chiang et al. 2024, arXiv 2403.04132, section 5.1).
    n, agree = len(probs), agreement(probs)
    typical = min(max(typical, 0.5), 0.95)
    log_odds = n * (1 - 2 * agree) * math.log(typical / (1 - typical))  # (disagreements - agreements) * log-ratio
    return Evidence(n, agree, log_odds)


def is_contrarian(ev: Evidence, min_votes: int, odds: float) -> bool:
    """Flag a source once it has `min_votes` votes and contrarian is `odds` times likelier than typical."""
    return ev.votes >= min_votes and ev.log_odds >= math.log(odds)
