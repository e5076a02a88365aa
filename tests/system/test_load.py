"""Twenty people at once for three minutes while a round trains: no errors, every acknowledged vote kept, files flat."""

from __future__ import annotations

import pytest
from apphelpers import run_app
from votes import TINY_TRAINING

from bench.load import check_db, drive

pytestmark = pytest.mark.slow


def test_twenty_users_for_three_minutes_while_training(tiny_lm_dir, tmp_path):
    data = tmp_path / "data"
    # The random tiny model's babble is rarely "an answer" (evaluation.is_answer): CI once saw the only finished round
    # refused by that gate (50% < 80%). This test is about serving while a round runs, so that gate is off here.
    extra = (
        "--train",
        "--train-min-new-votes",
        "60",
        "--train-check-s",
        "2",
        "--min-answered-rate",
        "0",
        *TINY_TRAINING,
    )
    with run_app(tiny_lm_dir, data, extra=extra) as app:
        result = drive(app.url, users=20, seconds=180, server_pid=app.proc.pid)
        log = app.log_tail(3000)
    assert result["errors"] == [], (result["errors"][:5], log)
    assert result["requests"] > 200
    db = check_db(data / "rlhf_live.db", result["acked"])
    assert db["missing_thumbs"] == [] and db["missing_choices"] == [] and db["integrity"] == "ok"
    assert ("ok", 1) in db["rounds"] or any(status == "ok" for status, _ in db["rounds"]), db["rounds"]
    # Each worker thread holds one SQLite connection for its life and closes it when it ends, so connections never
    # outnumber live threads; the per-thread leak this guards against grew with requests from changing threads
    # (tests/unit/test_store.py, over 2,000 requests). A "connections stay flat" check failed in two of four fresh
    # clones (connections up 9 while live threads stayed at 26, never more connections than threads): pool threads
    # can touch the DB for the first time late in the run. Connections are held to live threads at every sample.
    samples = result["fds"][3:]
    assert all(s["connections"] <= s["threads"] for s in samples), samples
