"""What the Training and Data tabs say: the status sentence in every trainer state, readable times, which learning-
curve values are plotted, the leaderboard's rows, the new-version notice and a visitor's own data."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from rlhf_live.serving.service import Service
from rlhf_live.store import Store
from rlhf_live.ui.dashboard_figures import board_rows, curve_rows
from rlhf_live.ui.dashboard_text import readable_time, short_time, status_text
from rlhf_live.ui.data import data_summary
from rlhf_live.ui.training import notice_text

NOW = datetime(2026, 12, 2, 14, 8, 30, tzinfo=timezone.utc).timestamp()
AT_1403 = "2026-12-02T14:03:12.123456+00:00"  # 5 min before NOW, as the store writes times


def status(trainer: dict | None = None, **over) -> dict:
    """A Service.status() with a trainer in this app, idle, v0002 live, 5 of 8 votes towards the next round."""
    base = {
        "live_version": "v0002",
        "live_since": AT_1403,
        "live_trained_on": 16,
        "trainer": {"state": "idle", "running": True, "progress": "", "watermark": 16, **(trainer or {})},
        "round_running_since": None,
        "last_round": {"status": "ok", "finished": AT_1403, "error": ""},
        "last_round_s": None,
        "votes_since_last_round": 5,
        "votes_per_round": 8,
    }
    return {**base, **over}


LIVE = "**Live:** v0002 since 2026-12-02 14:03 UTC, 5 min ago, trained on 16 votes."


def test_waiting_for_votes_says_how_many_more():
    assert status_text(status(), NOW) == (
        "**Now:** waiting for 3 more votes (👍/👎 or Compare choices) before the next training round (5 of 8 so far)."
        f"\n\n{LIVE}"
    )
    assert status_text(status(votes_since_last_round=9), NOW).startswith(
        "**Now:** 9 new votes since the last round, enough for a round: it starts shortly.\n\n"
    )


def test_a_running_round_says_its_stage_of_n_and_the_time_left_from_its_own_pace():
    # PPO update 3 of 8 started; updates 1 and 2 took 100 s: 6 more at 50 s = 5 min. No earlier round to go by.
    running = {"state": "PPO", "progress": "update 3/8", "stage": 2, "stages": 5, "step": 3, "steps": 8}
    running |= {"round_started": NOW - 160, "stage_started": NOW - 100}
    assert status_text(status(running), NOW) == (
        "**Now:** a training round is running: stage 2 of 5, PPO: improving the model against the reward model "
        f"(update 3/8); about 5 min left.\n\n{LIVE}"
    )
    # The last round took 10 min and this one has run 160 s: about 8 min left (the longer of the two estimates).
    assert "(update 3/8); about 8 min left." in status_text(status(running, last_round_s=600.0), NOW)
    # Fitting the reward model, the first round ever: no promise.
    first = {"state": "fitting reward model", "progress": "loading", "stage": 1, "stages": 5, "round_started": NOW}
    assert status_text(status(first), NOW).startswith(
        "**Now:** a training round is running: stage 1 of 5, fitting the reward model to the votes (loading); "
        "no estimate of the time left yet (no earlier round to go by).\n\n"
    )
    gate = {"state": "gate", "progress": "checking the new version", "stage": 4, "stages": 5, "round_started": NOW - 50}
    assert "stage 4 of 5, checking the new version against the gate (checking the new version); less than a minute" in (
        status_text(status(gate, last_round_s=80.0), NOW)
    )


def test_a_refused_round_says_why_until_a_later_one_goes_live():
    why = "mean KL to the base model 31.20 nats per answer is over the gate of 20: the version stays a candidate."
    refused = status(last_round={"status": "failed", "finished": "2026-12-02T14:06:00+00:00", "error": why})
    assert status_text(refused, NOW).split("\n\n")[1] == (
        f"**Last round** (2026-12-02 14:06 UTC, 2 min ago) did not go live: {why}"
    )
    # A failure from before the live version went live is old news.
    older = status(last_round={"status": "failed", "finished": "2026-12-02T13:00:00+00:00", "error": why})
    assert "Last round" not in status_text(older, NOW)


def test_the_original_model_live_and_no_trainer_in_this_app():
    text = status_text(
        status({"state": "not running", "running": False}, live_version="base", live_since=None, live_trained_on=None),
        NOW,
    )
    assert text == (
        "**Now:** training runs separately from this page; 5 new votes since the last round are waiting for the next "
        "round.\n\n**Live:** the original model; no trained version has gone live yet."
    )
    elsewhere = status(
        {"state": "not running", "running": False},
        round_running_since="2026-12-02T14:06:30+00:00",
        last_round_s=300.0,
    )
    assert status_text(elsewhere, NOW).startswith(
        "**Now:** a training round is running (started 2026-12-02 14:06 UTC, 2 min ago); about 3 min left.\n\n"
    )


def test_times_read_as_minutes_not_microseconds():
    assert short_time(AT_1403) == "2026-12-02 14:03 UTC"
    assert short_time(None) == ""
    seconds = {"2026-12-02T14:08:00+00:00": "just now", AT_1403: "5 min ago"}
    seconds |= {"2026-12-02T11:00:00+00:00": "3 h ago", "2026-11-30T14:00:00+00:00": "2 days ago"}
    for iso, ago in seconds.items():
        assert readable_time(iso, NOW) == f"{short_time(iso)}, {ago}"


def test_values_from_fewer_than_the_minimum_votes_are_not_plotted_and_empty_series_not_listed():
    curve = [
        {"round": 1, "reward_accuracy": 0.0, "reward_pairs": 1, "kl": 3.1, "ppo_score": 0.4},
        {"round": 2, "reward_accuracy": 0.75, "reward_pairs": 12, "win_rate_vs_base": 1.0, "votes_vs_base": 2},
        {"round": 3, "reward_accuracy": 0.5, "reward_pairs": None, "kl": 2.0},  # from before the count was stored
    ]
    quality, drift, notes = curve_rows(curve)
    assert quality == {"reward model: agreement with held-out votes": [(2, 0.75)]}  # no people's series: no data
    assert drift == {
        "KL to the original model (nats per answer)": [(1, 3.1), (3, 2.0)],
        "PPO score (reward model, normalised)": [(1, 0.4)],
    }
    assert notes == [
        "agreement with held-out votes (held-out A/B pairs: 1 in round 1, ? in round 3)",
        "win-rate vs the original model (Compare votes: 2 in round 2)",
    ]


def test_leaderboard_rows_show_an_interval_only_from_the_minimum_votes():
    rows = board_rows(
        [
            {"version": "v0002", "status": "live", "rating": 1104.6, "lower": 1020.2, "upper": 1190.9, "battles": 14,
             "win_rate": 0.643},
            {"version": "v0001", "status": "retired", "rating": 1091.7, "lower": None, "upper": None, "battles": 1,
             "win_rate": 1.0},
            {"version": "v0003", "status": "live", "rating": None, "lower": None, "upper": None, "battles": 0,
             "win_rate": None},
        ]
    )  # fmt: skip
    assert rows == [
        ["v0002", "live", "1105", "1020 – 1191", 14, "64%"],
        ["v0001", "retired", "1092", "needs 10 votes (1 so far)", 1, "100%"],
        ["v0003", "live", "–", "no votes yet", 0, "–"],
    ]


def test_counts_say_they_are_everyones():
    counts = {"conversations": 3, "messages": 9}
    text = data_summary(
        {"counts": counts, "votes": {"up": 2, "down": 1, "cleared": 0}, "choices": {"A": 1, "pending": 1}}
    )
    assert text == (
        "All visitors together: **3** conversations with **9** messages · **thumbs:** 👍 2 / 👎 1 · **A/B choices:** "
        "A 1, B 0, tie 0, both bad 0 · 1 pair shown and not voted on yet"
    )


def _pair(store: Store, voter: str, text: str, a: str = "base", b: str = "base", choice: str | None = "A") -> str:
    cid = store.new_conversation(voter)
    q = store.add_message(cid, "user", text)
    x = store.add_message(cid, "assistant", f"{text}: first", parent_id=q, adapter_version=a)
    y = store.add_message(cid, "assistant", f"{text}: second", parent_id=q, adapter_version=b)
    pid = store.new_comparison(cid, x, y, a_source=a, b_source=b, voter=voter)
    if choice:
        store.choose(pid, voter, choice, "because")
    return x


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    yield s
    s.close()


def test_the_notice_counts_the_rounds_votes_and_says_whether_yours_were_in_it(store, tiny_cfg):
    for i in range(3):
        _pair(store, "valice", f"alice {i}")
    answer = _pair(store, "vbob", "bob", choice=None)
    store.record_feedback(answer, "vbob", "up", session_id="vbob")
    store.add_adapter("v0001", "/x/v0001", status="live", metrics={"watermark": store.watermark()})
    _pair(store, "vcarol", "carol, after the round")
    service = Service(SimpleNamespace(version="v0001"), store, tiny_cfg)
    assert service.dashboard.live_notice("valice") == {"version": "v0001", "votes": 4, "yours": True}
    assert service.dashboard.live_notice("vcarol") == {"version": "v0001", "votes": 4, "yours": False}
    assert notice_text(service.dashboard.live_notice("valice")) == (
        "🆕 **v0001 is live**: trained on 4 votes, yours included. Its answers are marked “written by v0001”."
    )
    assert notice_text(service.dashboard.live_notice("vcarol")).startswith(
        "🆕 **v0001 is live**: trained on 4 votes. Its"
    )
    # DPO/KTO on new votes only: a round from watermark 4 to 5 trained on carol's vote alone.
    store.add_adapter("v0002", "/x/v0002", status="live", metrics={"watermark": 5, "votes_since": 4})
    service.policy.version = "v0002"
    assert service.dashboard.live_notice("valice") == {"version": "v0002", "votes": 1, "yours": False}
    assert service.dashboard.live_notice("vcarol") == {"version": "v0002", "votes": 1, "yours": True}
    service.policy.version = "base"
    assert service.dashboard.live_notice("valice") == {"version": "base", "votes": None, "yours": None}


def test_the_leaderboard_lists_every_live_and_retired_version(store, tiny_cfg):
    _pair(store, "valice", "v1 against base", a="v0001", b="base")
    for version, state in (("v0001", "retired"), ("v0002", "retired"), ("v0003", "candidate"), ("v0004", "live")):
        store.add_adapter(version, f"/x/{version}", status=state)
    board = Service(SimpleNamespace(version="v0004"), store, tiny_cfg).dashboard.leaderboard()
    assert [(r["version"], r["status"], r["battles"], r["lower"]) for r in board] == [
        ("v0001", "retired", 1, None),
        ("base", "original", 1, None),
        ("v0004", "live", 0, None),
        ("v0002", "retired", 0, None),
    ]
    assert board[2]["rating"] is None and board[0]["rating"] > board[1]["rating"]


def test_a_voters_own_data_holds_their_rows_and_never_anyone_elses(store):
    mine = _pair(store, "valice", "Alice's question")
    store.record_feedback(mine, "valice", "down", "too short", session_id="valice")
    store.record_feedback(mine, "valice", "up", "", session_id="valice")
    bobs = _pair(store, "vbob", "Bob's question")
    store.record_feedback(bobs, "vbob", "up", "Bob's reason", session_id="vbob")
    data = store.voter_data("valice")
    assert data["voter"] == "valice"
    (conv,) = data["conversations"]
    assert [m["content"] for m in conv["messages"]] == [
        "Alice's question",
        "Alice's question: first",
        "Alice's question: second",
    ]
    assert [(t["response_id"], t["value"]) for t in data["thumbs"]] == [(mine, "up")]
    assert [(c["value"], c["reason"]) for c in data["thumb_changes"]] == [("down", "too short"), ("up", "")]
    assert [(c["choice"], c["reason"]) for c in data["comparisons"]] == [("A", "because")]
    assert "Bob" not in repr(data) and "vbob" not in repr(data)
    assert store.voter_data("vnobody") == {
        "voter": "vnobody",
        "conversations": [],
        "thumbs": [],
        "thumb_changes": [],
        "comparisons": [],
    }
    store.delete_voter("valice")
    assert store.voter_data("valice")["conversations"] == []


def test_a_trainer_round_reports_stage_k_of_n_in_order(tiny_cfg):
    from votes import seed_votes

    from rlhf_live.learning.learners import round_stages
    from rlhf_live.learning.trainer import Trainer
    from rlhf_live.serving.policy import Policy

    cfg = replace(tiny_cfg, ppo_batch_size=2, ppo_max_new_tokens=6, ppo_updates_per_round=2, ppo_epochs=1)
    cfg = replace(cfg, ppo_minibatches=1, reward_epochs=1)
    store = Store.from_config(cfg)
    seed_votes(store, 4)
    trainer = Trainer(cfg, store, Policy.from_config(cfg))
    seen, report = [], trainer._progress

    def record(state: str, detail: str) -> None:
        report(state, detail)
        s = trainer.status()
        seen.append((s["state"], s["stage"], s["stages"], s["step"], s["steps"], s["round_started"] is not None))

    trainer._progress = record
    trainer.run_once()
    stages = [(state, stage) for state, stage, *_ in seen]
    assert list(dict.fromkeys(stages)) == [(s, k) for k, s in enumerate(round_stages("ppo"), start=1)]
    assert all(n == 5 and started for _, _, n, *_, started in seen)
    assert ("PPO", 2, 5, 2, 2, True) in seen  # 'update 2/2'
    after = trainer.status()
    assert (after["state"], after["stage"], after["round_started"]) == ("idle", 0, None)
    store.close()


def test_the_sentence_names_a_trainer_on_another_machine():
    from rlhf_live.ui.dashboard_text import _now_sentence

    status = {
        "trainer": {"state": "not running", "running": False},
        "votes_since_last_round": 0,
        "votes_per_round": 8,
        "round_running_since": "2026-12-07T10:00:00+00:00",
        "last_round_s": None,
        "remote_trainer": {"owner": "gpu-box:4242", "at": 1_796_637_600.0 - 12, "stage": "PPO", "detail": ""},
    }
    sentence = _now_sentence(status, now=1_796_637_600.0)
    assert sentence.startswith(
        "a training round is running on gpu-box:4242, PPO: improving the model against the "
        "reward model, last heard 12 s ago (started"
    )
