"""Each source's influence on a round: the cap on its share of training weight, the evidence that it votes against all.

Knows sources as opaque strings and votes as numbers (a weight, the probability the others' model gives it); knows
no SQL, no tensors and no model: the store says who voted, the reward model says how likely each vote was.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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


def calibration(probs_by_source: dict[str, Sequence[float]]) -> float:
    """How far to trust the others' model: beta in P(a typical vote as cast) = sigmoid(beta * logit p), by MLE."""
    # Platt scaling with no intercept (Platt 1999), fitted on the typical sources' own held-out votes: a consensus as
    # sure as it is right keeps beta = 1, an overconfident one (a probe on tens of votes) gets beta < 1, and one no
    # better than chance gets 0 and accuses nobody. The log-likelihood is concave in beta: bisect its derivative.
    logits = [_logit(p) for ps in probs_by_source.values() for p in ps]
    if not logits or sum(logits) <= 1e-9 * len(logits):  # no better than chance (up to rounding)
        return 0.0

    def slope(beta: float) -> float:
        return sum(x * (1 - 1 / (1 + math.exp(-beta * x))) for x in logits)

    if slope(1.0) >= 0:
        return 1.0  # never surer than the model itself: a few votes the others' model happens to fit seem certain
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def evidence(probs: Sequence[float], beta: float) -> Evidence:
    """A source's votes as a sequential probability-ratio test: cast as a typical source would, or as its mirror."""
    # Wald 1945: each vote is as likely as the calibrated consensus says (q = sigmoid(beta * logit p), H0: a typical
    # source) or as its mirror image says (1 - q, H1: votes against the others); the log-ratio of one vote is
    # log((1 - q) / q) = -beta * logit p, capped at log 19 either way since no vote is surer than 95%. Chatbot Arena's
    # malicious-user test also scores each vote under the other voters' model (Chiang et al. 2024, arXiv
    # 2403.04132, section 5.1); beta is what keeps an overconfident consensus from accusing honest voters
    # (bench/RESULTS.md, Crowd: uncalibrated probabilities flagged 2 of 5 honest sources).
    cap = math.log(19)
    log_odds = sum(min(max(-beta * _logit(p), -cap), cap) for p in probs)
    return Evidence(len(probs), agreement(probs), log_odds)


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def is_contrarian(ev: Evidence, min_votes: int, odds: float) -> bool:
    """Flag a source once it has `min_votes` votes and contrarian is `odds` times likelier than typical."""
    return ev.votes >= min_votes and ev.log_odds >= math.log(odds)


@dataclass
class Test:
    """One round's contrarian test: the sources it flagged with their evidence, the calibration, the top evidence."""

    flagged: dict[str, Evidence] = field(default_factory=dict)
    beta: float = 0.0
    """The calibration of the last consensus tested against (`calibration`)."""
    most: float | None = None
    """The evidence of the least typical source tested (None when nobody had enough votes)."""
    tested: int = 0
    """Sources with enough votes to test (cleared ones aside)."""


def trimmed_test(
    held_out: Callable[[frozenset[str]], dict[str, list[float]]],
    exempt: frozenset[str],
    min_votes: int,
    odds: float,
    statistic: Callable[[Sequence[float], dict[str, list[float]]], Evidence] | None = None,
) -> Test:
    """Flag contrarians one at a time, each tested against a consensus fitted without it and those flagged before."""
    # A trimmed consensus: the least typical source is tested against how its votes sit with a model fitted without it
    # and calibrated on the others when it is left out of every fit too. Otherwise a contrarian holding 25% of the
    # weight sits in every honest source's leave-out model and pulls the consensus to chance (bench/RESULTS.md, Crowd).
    # held_out(without) -> {source: each vote's probability under a model fitted on everyone else, `without` left out}.
    test, left_out = Test(), frozenset()
    probs = held_out(left_out)
    big = [s for s, p in probs.items() if len(p) >= min_votes and s not in exempt]
    test.tested = len(big)
    while big:
        worst = max(big, key=lambda s: evidence(probs[s], 1.0).log_odds)  # the most contrarian by the raw model
        others = held_out(left_out | {worst})
        test.beta = calibration(others)
        ev = statistic(probs[worst], others) if statistic else evidence(probs[worst], test.beta)
        test.most = ev.log_odds if test.most is None else test.most
        if not is_contrarian(ev, min_votes, odds):
            break  # the least typical source is typical enough: so is everyone who sits better with the others
        test.flagged[worst] = ev
        left_out |= {worst}
        probs = others  # the next test's leave-out models skip it
        big = [s for s in big if s != worst and s in probs]
    return test
