"""Property-based: whatever arrives at an endpoint (wrong types, huge, empty, control characters, unknown or other
people's ids, double votes), the answer is a clear message and nothing is written (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from apphelpers import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_live.serving.policy import Policy
from rlhf_live.serving.service import USER_ERRORS, Service
from rlhf_live.serving.settings import GenerationSettings
from rlhf_live.store import Store

ALICE, MALLORY = "v-alice", "v-mallory"
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs"]), max_size=20),  # control chars
    st.sampled_from(["", " ", "\x00", "A", "up", "tie", "x" * 5000, "x" * 300_000]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
LIMITS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def app(tiny_lm_dir, tmp_path_factory):
    """Alice's conversation, answer and voted pair, to aim bad requests at; the same service for every example."""
    from rlhf_live.config import Config

    data = tmp_path_factory.mktemp("bad-input")
    cfg = Config(model=str(tiny_lm_dir), load_in_4bit=False, compute_dtype="float32", data_dir=str(data))
    cfg = replace(cfg, max_new_tokens=4, max_context_tokens=256, lora_r=4, lora_alpha=8, max_requests_per_minute=0)
    store = Store.from_config(cfg)
    service = Service(Policy.from_config(cfg), store, cfg)
    *_, answer = service.chat(ALICE, "Hello", settings=GenerationSettings(max_new_tokens=4))
    *_, pair = service.compare(ALICE, "Which?", settings=GenerationSettings(max_new_tokens=4))
    service.choose(ALICE, pair["pair_id"], "A")
    yield service, cfg.db_path, answer, pair
    store.close()


def refused_and_unchanged(db_path, call) -> None:
    before = snapshot(db_path)
    with pytest.raises(USER_ERRORS) as info:
        out = call()
        if hasattr(out, "__next__"):
            list(out)
    assert str(info.value).strip() and "Traceback" not in str(info.value)
    assert snapshot(db_path) == before


@LIMITS
@given(message=junk, conversation=junk)
def test_chat(app, message, conversation):
    service, db, answer, _ = app
    if isinstance(message, str) and message.strip() and len(message) <= 4000 and conversation in ("", None):
        return  # a valid new chat: answered, not refused
    refused_and_unchanged(db, lambda: service.chat(MALLORY, message, conversation))


@LIMITS
@given(response_id=junk, value=junk, reason=junk)
def test_feedback(app, response_id, value, reason):
    service, db, answer, _ = app
    refused_and_unchanged(db, lambda: service.feedback(MALLORY, response_id, value, reason))


@LIMITS
@given(value=st.sampled_from(["up", "down", "clear"]), reason=junk)
def test_feedback_on_another_persons_answer(app, value, reason):
    service, db, answer, _ = app
    refused_and_unchanged(db, lambda: service.feedback(MALLORY, answer["response_id"], value, reason))


@LIMITS
@given(message=junk, conversation=junk)
def test_compare(app, message, conversation):
    service, db, answer, _ = app
    if isinstance(message, str) and message.strip() and len(message) <= 4000 and conversation in ("", None):
        return
    refused_and_unchanged(db, lambda: service.compare(MALLORY, message, conversation))


@LIMITS
@given(pair_id=junk, choice=junk, reason=junk, who=st.sampled_from([ALICE, MALLORY]))
def test_choose_including_double_votes_and_other_peoples_pairs(app, pair_id, choice, reason, who):
    service, db, _, pair = app
    target = pair["pair_id"] if isinstance(pair_id, bool) else pair_id  # sometimes aim at the real, voted pair
    refused_and_unchanged(db, lambda: service.choose(who, target, choice, reason))
