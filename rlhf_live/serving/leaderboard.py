"""Human win-rate per adapter version from A/B votes between versions: a Bradley-Terry fit with bootstrap intervals.

Knows battles (version a, version b, outcome) and ratings, as in Chatbot Arena's leaderboard
(https://lmsys.org/blog/2023-12-07-leaderboard/); knows nothing of SQL, models or the UI.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

SCALE, BASE_RATING = 400.0, 1000.0
"""Elo-style display: a 400-point gap means 10:1 odds of winning; the mean rating is 1000."""
MIN_BATTLES = 10
"""Fewest battles a version's 95% interval is given for: resampling one or two votes gives a point, not a range."""
MIN_VOTES = 10
"""Fewest votes a win-rate or an accuracy is plotted from (one vote makes a rate of 0 or 1)."""


@dataclass
class Battle:
    """One A/B vote between two different versions; winner is 'a', 'b' or 'tie'."""

    a: str
    b: str
    winner: str


def _fit(battles: Sequence[Battle], players: list[str], iters: int = 200) -> dict[str, float]:
    """Bradley-Terry strengths by the MM algorithm (Hunter 2004); a tie counts half a win to each side."""
    wins = {p: 0.0 for p in players}
    games: dict[tuple[str, str], float] = {}
    for battle in battles:
        score_a = {"a": 1.0, "b": 0.0, "tie": 0.5}[battle.winner]
        wins[battle.a] += score_a
        wins[battle.b] += 1.0 - score_a
        key = tuple(sorted((battle.a, battle.b)))
        games[key] = games.get(key, 0.0) + 1.0
    # A small prior (one tie against a virtual average player) keeps strengths finite for undefeated versions.
    strength = {p: 1.0 for p in players}
    for _ in range(iters):
        new = {}
        for p in players:
            denom = 2.0 / (strength[p] + 1.0)  # prior: two half-games against strength 1
            for (x, y), n in games.items():
                if p in (x, y):
                    other = y if p == x else x
                    denom += n / (strength[p] + strength[other])
            new[p] = (wins[p] + 1.0) / denom
        mean_log = sum(math.log(v) for v in new.values()) / len(new)
        strength = {p: v / math.exp(mean_log) for p, v in new.items()}
    return {p: BASE_RATING + SCALE * math.log10(v) for p, v in strength.items()}


def leaderboard(battles: Sequence[Battle], *, rounds: int = 200, seed: int = 0) -> list[dict]:
    """Rows sorted by rating: version, rating, 95% interval (bootstrap over battles), battles, win rate.

    The interval (lower, upper) is None for a version with fewer than MIN_BATTLES battles.
    """
    battles = [b for b in battles if b.a != b.b and b.winner in {"a", "b", "tie"}]
    if not battles:
        return []
    players = sorted({b.a for b in battles} | {b.b for b in battles})
    point = _fit(battles, players)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {p: [] for p in players}
    for _ in range(rounds):
        resample = [battles[rng.randrange(len(battles))] for _ in battles]
        fitted = _fit(resample, players, iters=60)
        for p in players:
            samples[p].append(fitted[p])
    rows = []
    for p in players:
        s = sorted(samples[p])
        n = sum(1 for b in battles if p in (b.a, b.b))
        won = sum(
            (1.0 if (b.winner == "a") == (b.a == p) else 0.0) if b.winner != "tie" else 0.5
            for b in battles
            if p in (b.a, b.b)
        )
        enough = n >= MIN_BATTLES
        rows.append(
            {
                "version": p,
                "rating": round(point[p], 1),
                "lower": round(s[int(0.025 * (len(s) - 1))], 1) if enough else None,
                "upper": round(s[int(0.975 * (len(s) - 1))], 1) if enough else None,
                "battles": n,
                "win_rate": round(won / n, 3),
            }
        )
    return sorted(rows, key=lambda r: -r["rating"])


def head_to_head(battles: Sequence[Battle], version: str, opponents: set[str]) -> tuple[float | None, int]:
    """(win-rate of `version` against any of `opponents`, ties half; None without battles, number of battles)."""
    score, n = 0.0, 0
    for b in battles:
        if version not in (b.a, b.b) or ({b.a, b.b} - {version}).isdisjoint(opponents):
            continue
        n += 1
        score += 0.5 if b.winner == "tie" else float((b.winner == "a") == (b.a == version))
    return (score / n if n else None), n
