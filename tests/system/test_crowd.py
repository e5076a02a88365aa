"""Crowd-safe learning: where a vote comes from (source), per-source limits, rounds that need several sources."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import pytest
from apphelpers import rows, shared_tiny_app
from votes import FakePolicy

from bench.crowd import queue_call
from rlhf_live.learning.trainer import Trainer
from rlhf_live.serving.callers import Caller
from rlhf_live.serving.service import LOGIN_TO_VOTE, Service
from rlhf_live.serving.settings import InvalidRequest
from rlhf_live.store import Store, source_id
from rlhf_live.ui.dashboard_text import _now_sentence


def _vote(store: Store, voter: str, source: str) -> None:
    cid = store.new_conversation(voter)
    user = store.add_message(cid, "user", "hi")
    answer = store.add_message(cid, "assistant", "hello", parent_id=user, adapter_version="base")
    store.record_feedback(answer, voter, "up", session_id=voter, source=source)


def test_votes_store_their_source_and_rounds_count_distinct_sources(tiny_cfg):
    store = Store(tiny_cfg.db_path)
    for i in range(5):  # one person, five fresh sessions, one address
        _vote(store, f"v-session-{i}", "s-one")
    assert store.sources_between(0, store.watermark()) == 1
    _vote(store, "v-other", "s-two")
    _vote(store, "v-imported", "")  # unknown origin (an import, an old vote) is not a source
    assert store.sources_between(0, store.watermark()) == 2
    assert {r["source"] for r in store.db().query("SELECT source FROM feedback")} == {"s-one", "s-two", ""}


def test_source_ids_are_salted_and_prefer_the_account():
    assert source_id("1.2.3.4", None, "salt") == source_id("1.2.3.4", None, "salt")
    assert source_id("1.2.3.4", None, "salt") != source_id("1.2.3.4", None, "other")
    assert source_id("1.2.3.4", "alice", "salt") == source_id("5.6.7.8", "alice", "salt")
    assert "1.2.3.4" not in source_id("1.2.3.4", None, "salt")


def test_public_limits_requests_per_source_across_sessions(tiny_cfg):
    cfg = replace(tiny_cfg, public=True, max_source_requests_per_minute=3, max_requests_per_minute=60)
    service = Service(FakePolicy(), Store(cfg.db_path), cfg)
    sessions = [service.caller(f"session-{i}", "10.9.8.7") for i in range(4)]
    for who in sessions[:3]:
        service._limit(who)
    with pytest.raises(InvalidRequest, match="Too many requests from your address or account: at most 3 a minute"):
        service._limit(sessions[3])  # a fresh session from the same address shares the source's budget
    service._limit(service.caller("session-9", "10.9.8.6"))  # another address has its own
    local = Service(FakePolicy(), Store(cfg.db_path), replace(cfg, public=False))
    for who in sessions:  # off a public deployment only the per-voter limit applies, as before
        local._limit(who)


def test_vote_requires_login_refuses_anonymous_votes_and_writes_nothing(tiny_cfg):
    cfg = replace(tiny_cfg, vote_requires_login=True)
    store = Store(cfg.db_path)
    service = Service(FakePolicy(), store, cfg)
    cid = store.new_conversation("v-anon")
    user = store.add_message(cid, "user", "hi")
    answer = store.add_message(cid, "assistant", "hello", parent_id=user, adapter_version="base")
    with pytest.raises(InvalidRequest, match="need a Hugging Face sign-in") as err:
        service.feedback(Caller("v-anon", "s-x"), answer, "up")
    assert str(err.value) == LOGIN_TO_VOTE
    assert store.watermark() == 0
    signed = Caller("v-anon", "s-x", signed_in=True)
    assert service.feedback(signed, answer, "up")["value"] == "up"
    assert [r["source"] for r in store.db().query("SELECT source FROM feedback")] == ["s-x"]


def test_public_round_waits_for_enough_sources_and_says_so(tiny_cfg):
    cfg = replace(tiny_cfg, public=True, min_round_sources=2, max_source_share=0.5, train_min_new_votes=4)
    store = Store(cfg.db_path)
    trainer = Trainer(cfg, store, FakePolicy())
    for i in range(6):
        _vote(store, f"v-{i}", "s-stranger")
    assert not trainer._ready()  # six votes, one source
    assert Trainer(replace(cfg, public=False), store, FakePolicy())._ready()  # a laptop trains as before
    status = Service(FakePolicy(), store, cfg, trainer).dashboard.status()
    assert (status["sources_since_last_round"], status["sources_per_round"]) == (1, 2)
    trainer._status["running"] = True
    sentence = _now_sentence({**status, "trainer": trainer.status()}, time.time())
    assert "come from 1 different person" in sentence and "at least 2" in sentence
    _vote(store, "v-friend", "s-friend")
    assert trainer._ready()
    # A 25% cap needs four sources before the cap can hold (three people would carry a third each).
    assert not Trainer(replace(cfg, max_source_share=0.25), store, FakePolicy())._ready()
    store.flag_source("s-friend", votes=8, log_odds=9.0, agree=0.1)
    assert not trainer._ready()  # a flagged source does not count towards a round


def _queue_call(url: str, api_name: str, data: list, **kw) -> dict:
    ok, out = queue_call(url, api_name, data, **kw)
    assert ok, out
    return out


@pytest.fixture(scope="module")
def app(request, tiny_lm_dir, tmp_path_factory):
    return shared_tiny_app(request, tiny_lm_dir, tmp_path_factory)


def test_source_is_the_peer_address_and_a_spoofed_forwarded_header_is_ignored(app):
    spoof = {"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7"}
    # 127.0.0.1 is the peer uvicorn trusts by default: without Config.trusted_proxies it would believe the header.
    calls = (("127.0.0.1", spoof), ("127.0.0.2", {}), ("127.0.0.3", spoof))
    for address, headers in calls:
        session = uuid.uuid4().hex
        answer = _queue_call(app.url, "chat", ["Hi there", ""], session=session, address=address, headers=headers)
        _queue_call(app.url, "feedback", [answer["response_id"], "up", ""], session=session, address=address)
    db = app.data_dir / "rlhf_live.db"
    salt = rows(db, "SELECT value FROM meta WHERE key = 'voter_salt'")[0]["value"]
    votes = rows(db, "SELECT source FROM feedback ORDER BY seq DESC LIMIT 3")
    assert [v["source"] for v in votes] == [source_id(a, None, salt) for a, _ in reversed(calls)]
    assert source_id("203.0.113.7", None, salt) not in {v["source"] for v in rows(db, "SELECT source FROM feedback")}
    # The conversation records who asked (PPO's prompt pool is shared out by it), from the same peer address.
    askers = rows(db, "SELECT asker FROM conversations ORDER BY rowid DESC LIMIT 3")
    assert [a["asker"] for a in askers] == [source_id(a, None, salt) for a, _ in reversed(calls)]
