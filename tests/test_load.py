"""Twenty people at once for three minutes while a round trains: no errors, every acknowledged vote kept, files flat."""

from __future__ import annotations

import pytest
from apphelpers import run_app
from test_two_processes import TINY_TRAINING

from bench.load import check_db, drive

pytestmark = pytest.mark.slow


def test_twenty_users_for_three_minutes_while_training(tiny_lm_dir, tmp_path):
    data = tmp_path / "data"
    extra = ("--train", "--train-min-new-votes", "60", "--train-check-s", "2", *TINY_TRAINING)
    with run_app(tiny_lm_dir, data, extra=extra) as app:
        result = drive(app.url, users=20, seconds=180, server_pid=app.proc.pid)
        log = app.log_tail(3000)
    assert result["errors"] == [], (result["errors"][:5], log)
    assert result["requests"] > 200
    db = check_db(data / "rlhf_live.db", result["acked"])
    assert db["missing_thumbs"] == [] and db["missing_choices"] == [] and db["integrity"] == "ok"
    assert ("ok", 1) in db["rounds"] or any(status == "ok" for status, _ in db["rounds"]), db["rounds"]
    # Flat after warm-up: sockets come and go with requests in flight, but no upward trend (a leak grows with time;
    # tests/test_store.py shows the per-thread connection leak itself over 2,000 requests from changing threads).
    fds, third = result["fds"], len(result["fds"]) // 3
    middle, late = sorted(fds[third : 2 * third]), sorted(fds[2 * third :])
    assert late[len(late) // 2] <= middle[len(middle) // 2] + 5, fds
