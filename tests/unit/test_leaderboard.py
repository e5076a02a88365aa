"""Leaderboard: Bradley-Terry ratings of adapter versions from A/B battles, with bootstrap 95% intervals."""

from __future__ import annotations

import pytest

from rlhf_live.serving.leaderboard import BASE_RATING, MIN_BATTLES, Battle, leaderboard


def by_version(rows: list[dict]) -> dict[str, dict]:
    return {r["version"]: r for r in rows}


def test_empty_input_gives_no_rows():
    assert leaderboard([]) == []
    # Battles a version against itself, or with an unknown outcome, are not battles between versions.
    assert leaderboard([Battle("v1", "v1", "a"), Battle("v1", "v2", "both_bad")]) == []


def test_a_version_winning_80_percent_rates_higher_with_separate_intervals():
    # v2 wins 160 of 200 battles against v1, on both sides of the screen.
    battles = [Battle("v2", "v1", "a")] * 80 + [Battle("v1", "v2", "b")] * 80
    battles += [Battle("v2", "v1", "b")] * 20 + [Battle("v1", "v2", "a")] * 20
    rows = leaderboard(battles)
    assert [r["version"] for r in rows] == ["v2", "v1"]  # sorted best first
    v2, v1 = rows
    assert (v2["battles"], v1["battles"]) == (200, 200)
    assert (v2["win_rate"], v1["win_rate"]) == (0.8, 0.2)
    assert v2["lower"] > v1["upper"]  # non-overlapping 95% intervals
    for r in rows:
        assert r["lower"] <= r["rating"] <= r["upper"]
    # Mean rating stays at 1000; 4:1 odds is ~240 points on the Elo scale (shrunk a little by the prior).
    assert (v2["rating"] + v1["rating"]) / 2 == pytest.approx(BASE_RATING, abs=0.1)
    assert 200 < v2["rating"] - v1["rating"] < 241


def test_symmetric_results_give_equal_ratings_near_1000():
    battles = [Battle("v1", "v2", "a"), Battle("v1", "v2", "b")] * 50
    rows = by_version(leaderboard(battles))
    assert set(rows) == {"v1", "v2"}
    for r in rows.values():
        assert r["rating"] == pytest.approx(BASE_RATING, abs=0.1)
        assert r["win_rate"] == 0.5 and r["battles"] == 100
        assert r["lower"] < BASE_RATING < r["upper"]


def test_ties_count_half():
    # 10 wins for v2 plus 10 ties is the same record as 15 wins and 5 losses out of 20.
    with_ties = by_version(leaderboard([Battle("v2", "v1", "a")] * 10 + [Battle("v1", "v2", "tie")] * 10))
    as_wins = by_version(leaderboard([Battle("v2", "v1", "a")] * 15 + [Battle("v2", "v1", "b")] * 5))
    assert with_ties["v2"]["win_rate"] == as_wins["v2"]["win_rate"] == 0.75
    assert with_ties["v1"]["win_rate"] == as_wins["v1"]["win_rate"] == 0.25
    for v in ("v1", "v2"):
        assert with_ties[v]["rating"] == pytest.approx(as_wins[v]["rating"], abs=0.1)
    assert with_ties["v2"]["rating"] > with_ties["v1"]["rating"]
    # Only ties: equal ratings.
    only_ties = by_version(leaderboard([Battle("v1", "v2", "tie")] * 30))
    assert only_ties["v1"]["rating"] == only_ties["v2"]["rating"] == pytest.approx(BASE_RATING, abs=0.1)
    assert only_ties["v1"]["win_rate"] == only_ties["v2"]["win_rate"] == 0.5


def test_three_versions_are_ordered_and_deterministic():
    battles = (
        [Battle("v3", "v2", "a")] * 30
        + [Battle("v3", "v2", "b")] * 10
        + [Battle("v2", "v1", "a")] * 30
        + [Battle("v2", "v1", "b")] * 10
    )
    rows = leaderboard(battles)
    assert [r["version"] for r in rows] == ["v3", "v2", "v1"]
    assert by_version(rows)["v2"]["battles"] == 80
    assert leaderboard(battles) == rows  # fixed seed: the same intervals every time


def test_an_interval_needs_the_minimum_number_of_battles():
    # One battle: its bootstrap is a single point ("1091.7 [1091.7-1091.7]"), so no interval is given.
    (winner, loser) = leaderboard([Battle("v1", "base", "a")])
    assert (winner["version"], winner["battles"], winner["lower"], winner["upper"]) == ("v1", 1, None, None)
    assert (loser["lower"], loser["upper"]) == (None, None) and winner["rating"] > loser["rating"]
    # v2 plays MIN_BATTLES times, v3 once fewer: only v2 gets an interval.
    battles = [Battle("v2", "base", "a" if i % 3 else "b") for i in range(MIN_BATTLES)]
    battles += [Battle("v3", "base", "a" if i % 2 else "b") for i in range(MIN_BATTLES - 1)]
    rows = by_version(leaderboard(battles))
    assert rows["v2"]["battles"] == MIN_BATTLES and rows["v2"]["lower"] < rows["v2"]["rating"] < rows["v2"]["upper"]
    assert rows["v3"]["battles"] == MIN_BATTLES - 1 and (rows["v3"]["lower"], rows["v3"]["upper"]) == (None, None)
    assert rows["base"]["battles"] == 2 * MIN_BATTLES - 1 and rows["base"]["lower"] is not None
