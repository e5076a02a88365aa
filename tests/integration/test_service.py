"""Service: the request logic behind the UI, the HTTP API and the simulated rater (tiny model, in-process)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from apphelpers import snapshot

from rlhf_live.model.lora import BASE
from rlhf_live.serving import service as service_mod
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.service import COMPARE_UNAVAILABLE, Service
from rlhf_live.serving.settings import GenerationSettings, InvalidRequest
from rlhf_live.store import AlreadyVoted, Forbidden, InvalidInput, Store, UnknownId

ALICE, BOB = "v-alice", "v-bob"


@pytest.fixture(scope="module")
def policy(tiny_lm_dir, tmp_path_factory):
    """One tiny policy for the module (loading it is the slow part); each test gets its own store."""
    from rlhf_live.config import Config

    cfg = Config(
        model=str(tiny_lm_dir),
        load_in_4bit=False,
        compute_dtype="float32",
        data_dir=str(tmp_path_factory.mktemp("unused")),
        max_new_tokens=16,
        max_context_tokens=256,
        lora_r=4,
        lora_alpha=8,
    )
    return Policy.from_config(cfg)


@pytest.fixture
def service(policy, tiny_cfg):
    store = Store(tiny_cfg.db_path)
    yield Service(policy, store, tiny_cfg)
    store.close()


def chat(service, voter, message, cid="", **kw) -> dict:
    *_, last = service.chat(voter, message, cid, **kw)
    return last


def compare(service, voter, message, cid="") -> dict:
    *_, last = service.compare(voter, message, cid)
    return last


def test_chat_stores_user_and_assistant_turns_with_version_and_settings(service, tiny_cfg):
    updates = list(service.chat(ALICE, "  Hello there  "))
    last = updates[-1]
    # Streamed updates carry no id; only the final one (after the answer is stored) does.
    assert all(u["response_id"] is None for u in updates[:-1])
    assert last["response_id"] and last["user_message_id"] and last["adapter_version"] == BASE
    conv = service.store.conversation(last["conversation_id"], session_id=ALICE)
    assert conv["session_id"] == ALICE and conv["system_prompt"] == tiny_cfg.system_prompt
    user, answer = conv["messages"]
    assert (user["id"], user["role"], user["content"], user["parent_id"]) == (
        last["user_message_id"],
        "user",
        "Hello there",
        None,
    )
    assert (answer["id"], answer["role"], answer["content"], answer["parent_id"]) == (
        last["response_id"],
        "assistant",
        last["text"],
        user["id"],
    )
    assert answer["adapter_version"] == BASE
    assert answer["settings"] == GenerationSettings.from_config(tiny_cfg).as_dict()
    assert answer["finish_reason"] in {"eos", "length", "loop"}  # the random tiny model may end with EOS
    assert 0 <= answer["n_tokens"] <= tiny_cfg.max_new_tokens

    # A second turn continues the same conversation under the answer, with per-request settings.
    settings = replace(GenerationSettings.from_config(tiny_cfg), temperature=0.0, max_new_tokens=4)
    second = chat(service, ALICE, "And now?", last["conversation_id"], settings=settings)
    assert second["conversation_id"] == last["conversation_id"]
    msgs = service.store.conversation(last["conversation_id"])["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["parent_id"] == last["response_id"] and msgs[3]["id"] == second["response_id"]
    assert msgs[3]["settings"]["temperature"] == 0.0 and msgs[3]["settings"]["max_new_tokens"] == 4
    assert msgs[3]["n_tokens"] <= 4


def test_conversation_of_another_voter_is_refused_and_nothing_written(service):
    mine = chat(service, ALICE, "Hello")
    before = snapshot(service.cfg.db_path)
    with pytest.raises(Forbidden, match="another session"):
        chat(service, BOB, "Let me in", mine["conversation_id"])
    with pytest.raises(Forbidden, match="another session"):
        compare(service, BOB, "Let me in", mine["conversation_id"])
    with pytest.raises(Forbidden, match="another session"):
        list(service.retry(BOB, mine["response_id"]))
    with pytest.raises(Forbidden, match="another session"):
        service.history(BOB, mine["conversation_id"])
    with pytest.raises(Forbidden, match="another session"):
        service.feedback(BOB, mine["response_id"], "up")
    assert snapshot(service.cfg.db_path) == before


def test_retry_creates_a_sibling_and_keeps_the_old_answer(service):
    first = chat(service, ALICE, "Tell me a joke")
    *_, again = service.retry(ALICE, first["response_id"])
    assert again["response_id"] != first["response_id"]
    assert again["user_message_id"] == first["user_message_id"]
    msgs = service.store.conversation(first["conversation_id"])["messages"]
    assert len(msgs) == 3  # one user message, two answers
    answers = [m for m in msgs if m["role"] == "assistant"]
    assert {m["id"] for m in answers} == {first["response_id"], again["response_id"]}
    assert {m["parent_id"] for m in answers} == {first["user_message_id"]}
    # The history of the newest branch shows the retry, not the old answer.
    assert [t["id"] for t in service.history(ALICE, first["conversation_id"])] == [
        first["user_message_id"],
        again["response_id"],
    ]
    with pytest.raises(InvalidRequest, match="Only an answer"):
        list(service.retry(ALICE, first["user_message_id"]))


def test_feedback_up_down_clear_ends_as_one_cleared_row(service):
    ans = chat(service, ALICE, "Hi")
    rid = ans["response_id"]
    assert service.feedback(ALICE, rid, "up") == {"ok": True, "response_id": rid, "value": "up"}
    assert service.history(ALICE, ans["conversation_id"])[-1]["feedback"] == "up"
    assert service.feedback(ALICE, rid, "down", "rude")["value"] == "down"
    assert service.feedback(ALICE, rid, "clear")["value"] == "cleared"
    rows = service.store.db().conn.execute("SELECT response_id, voter, value, reason FROM feedback").fetchall()
    assert rows == [(rid, ALICE, "cleared", "")]
    assert [e["value"] for e in service.store.feedback_history(rid)] == ["up", "down", "cleared"]
    assert service.history(ALICE, ans["conversation_id"])[-1]["feedback"] is None


def test_compare_then_choose_records_choice_and_reveals_sources(service):
    updates = list(service.compare(ALICE, "Which fruit?"))
    last = updates[-1]
    assert all(u["pair_id"] is None for u in updates[:-1])
    # Sources stay hidden until the vote.
    assert set(last) == {"conversation_id", "pair_id", "a", "b"}
    assert set(last["a"]) == set(last["b"]) == {"response_id", "text"}
    msgs = service.store.conversation(last["conversation_id"])["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "assistant"]
    assert {m["id"]: m["content"] for m in msgs[1:]} == {
        last["a"]["response_id"]: last["a"]["text"],
        last["b"]["response_id"]: last["b"]["text"],
    }
    row = service.store.comparison(last["pair_id"])
    assert row["choice"] is None and row["voter"] == ALICE
    out = service.choose(ALICE, last["pair_id"], "B", "more concise")
    assert out == {"ok": True, "a_version": BASE, "b_version": BASE, "choice": "B"}
    row = service.store.comparison(last["pair_id"])
    assert (row["choice"], row["reason"], row["a_id"], row["b_id"]) == (
        "B",
        "more concise",
        last["a"]["response_id"],
        last["b"]["response_id"],
    )


def test_second_choose_is_refused_and_the_row_unchanged(service):
    pair = compare(service, ALICE, "Pick one")
    service.choose(ALICE, pair["pair_id"], "A")
    before = snapshot(service.cfg.db_path)
    with pytest.raises(AlreadyVoted, match=r"already has its answer \(A\)"):
        service.choose(ALICE, pair["pair_id"], "B", "changed my mind")
    with pytest.raises(Forbidden, match="another session"):
        service.choose(BOB, pair["pair_id"], "B")
    assert snapshot(service.cfg.db_path) == before


def test_choose_by_another_voter_is_refused_before_any_vote(service):
    pair = compare(service, ALICE, "Pick one")
    with pytest.raises(Forbidden, match="another session"):
        service.choose(BOB, pair["pair_id"], "A")
    assert service.store.comparison(pair["pair_id"])["choice"] is None


@pytest.mark.parametrize(
    "message, match",
    [("", "empty"), ("   \n\t ", "empty"), ("x" * 4001, "limit is 4,000")],
    ids=["empty", "blank", "over-limit"],
)
def test_bad_messages_are_refused_and_nothing_written(service, message, match):
    existing = chat(service, ALICE, "Hello")
    before = snapshot(service.cfg.db_path)
    for cid in ("", existing["conversation_id"]):
        with pytest.raises(InvalidRequest, match=match):
            chat(service, ALICE, message, cid)
        with pytest.raises(InvalidRequest, match=match):
            compare(service, ALICE, message, cid)
    assert snapshot(service.cfg.db_path) == before


def test_message_at_the_limit_is_accepted(service, tiny_cfg):
    last = chat(service, ALICE, "a" * tiny_cfg.max_message_chars)
    assert len(service.store.message(last["user_message_id"])["content"]) == tiny_cfg.max_message_chars


def test_invalid_values_are_refused_and_nothing_written(service):
    ans = chat(service, ALICE, "Hello")
    pair = compare(service, ALICE, "Pick")
    before = snapshot(service.cfg.db_path)
    for choice in ("C", "a", "", "both bad"):
        with pytest.raises(InvalidInput, match="The choice is one of A, B, tie, both_bad"):
            service.choose(ALICE, pair["pair_id"], choice)
    for value in ("like", "", "UP"):
        with pytest.raises(InvalidInput, match="'up', 'down' or 'clear'"):
            service.feedback(ALICE, ans["response_id"], value)
    with pytest.raises(InvalidInput, match="Only answers"):
        service.feedback(ALICE, ans["user_message_id"], "up")
    with pytest.raises(InvalidRequest, match="Unknown comparison mode"):
        list(service.compare(ALICE, "Pick", mode="nonsense"))
    with pytest.raises(InvalidRequest, match="still the base model"):
        list(service.compare(ALICE, "Pick", mode="base"))
    with pytest.raises(InvalidRequest, match="Needs an earlier trained version"):
        list(service.compare(ALICE, "Pick", mode="previous"))
    # The UI learns the same before any request.
    assert service.compare_modes() == {"samples": "", **COMPARE_UNAVAILABLE}
    assert snapshot(service.cfg.db_path) == before


def test_unknown_ids_are_refused_and_nothing_written(service):
    chat(service, ALICE, "Hello")
    before = snapshot(service.cfg.db_path)
    with pytest.raises(UnknownId, match="No conversation with id 'nope'"):
        chat(service, ALICE, "Hi", "nope")
    with pytest.raises(UnknownId, match="No conversation with id 'nope'"):
        compare(service, ALICE, "Hi", "nope")
    with pytest.raises(UnknownId, match="No answer with id 'nope'"):
        service.feedback(ALICE, "nope", "up")
    with pytest.raises(UnknownId, match="No comparison with id 'nope'"):
        service.choose(ALICE, "nope", "A")
    with pytest.raises(UnknownId, match="No message with id 'nope'"):
        list(service.retry(ALICE, "nope"))
    with pytest.raises(InvalidInput, match="must be a non-empty string"):
        service.choose(ALICE, "", "A")
    assert snapshot(service.cfg.db_path) == before


def test_votes_through_the_service_appear_in_exports_with_exact_text(service, tmp_path):
    liked = chat(service, ALICE, "Say something nice")
    disliked = chat(service, ALICE, "Now something else", liked["conversation_id"])
    service.feedback(ALICE, liked["response_id"], "up")
    service.feedback(ALICE, disliked["response_id"], "down")
    pair = compare(service, BOB, "Which is better?")
    service.choose(BOB, pair["pair_id"], "B")
    tied = compare(service, BOB, "A tie")
    service.choose(BOB, tied["pair_id"], "tie")
    system = {"role": "system", "content": service.cfg.system_prompt}

    def read(fmt):
        out = tmp_path / f"{fmt}.jsonl"
        n = service.store.export(fmt, out)
        lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert n == len(lines)
        return lines

    def completion(text):
        return [{"role": "assistant", "content": text}]

    assert read("kto") == [
        {
            "prompt": [system, {"role": "user", "content": "Say something nice"}],
            "completion": completion(liked["text"]),
            "label": True,
        },
        {
            "prompt": [
                system,
                {"role": "user", "content": "Say something nice"},
                {"role": "assistant", "content": liked["text"]},
                {"role": "user", "content": "Now something else"},
            ],
            "completion": completion(disliked["text"]),
            "label": False,
        },
        # The A/B choice split into a desirable and an undesirable row; the tie carries no label.
        {
            "prompt": [system, {"role": "user", "content": "Which is better?"}],
            "completion": completion(pair["b"]["text"]),
            "label": True,
        },
        {
            "prompt": [system, {"role": "user", "content": "Which is better?"}],
            "completion": completion(pair["a"]["text"]),
            "label": False,
        },
    ]
    assert read("preference") == [
        {
            "prompt": [system, {"role": "user", "content": "Which is better?"}],
            "chosen": completion(pair["b"]["text"]),
            "rejected": completion(pair["a"]["text"]),
        }
    ]
    # A cleared thumb leaves the KTO export.
    service.feedback(ALICE, liked["response_id"], "clear")
    assert [r["completion"][0]["content"] for r in read("kto")] == [
        disliked["text"],
        pair["b"]["text"],
        pair["a"]["text"],
    ]


def test_learning_curve_counts_compare_votes_between_versions(tiny_cfg, tmp_path):
    from rlhf_live.ui import dashboard as _dashboard

    store = Store(tiny_cfg.db_path)
    policy = Policy.from_config(tiny_cfg)
    service = Service(policy, store, replace(tiny_cfg, train_min_new_votes=5))
    text = _dashboard(service)[0]
    assert service.dashboard.learning_curve() == []
    assert "no trained version has gone live yet" in text and "more votes" not in text  # no trainer: no promise
    policy.model.save_pretrained(tmp_path / "v0001")
    store.add_adapter("v0001", str(tmp_path / "v0001"), status="live", metrics={"reward/accuracy": 0.75, "ppo/kl": 1.5})
    policy.swap(tmp_path / "v0001", "v0001")
    service._rng.shuffle = lambda pair: None  # A is the live version, B the base
    for choice in ("A", "A", "B"):
        *_, pair = service.compare(ALICE, "Which is better?", mode="base")
        assert service.choose(ALICE, pair["pair_id"], choice, "")["a_version"] == "v0001"
    (row,) = service.dashboard.learning_curve()
    assert row["version"] == "v0001" and row["round"] == 1
    assert (row["win_rate_vs_base"], row["votes_vs_base"]) == (pytest.approx(2 / 3), 3)
    assert (row["win_rate_vs_earlier"], row["votes_vs_earlier"]) == (pytest.approx(2 / 3), 3)
    assert (row["reward_accuracy"], row["kl"], row["learner"]) == (0.75, 1.5, "ppo")
    store.close()


def test_dashboard_says_how_many_votes_start_the_first_round(tiny_cfg):
    from rlhf_live.ui import dashboard as _dashboard

    class Idle:
        def status(self):
            return {"state": "idle", "running": True, "watermark": 0, "last_error": ""}

    store = Store(tiny_cfg.db_path)
    service = Service(Policy.from_config(tiny_cfg), store, replace(tiny_cfg, train_min_new_votes=5), Idle())
    *_, last = service.chat(ALICE, "Hello")
    service.feedback(ALICE, last["response_id"], "up")
    text, curve, *_ = _dashboard(service)
    assert "waiting for 4 more votes (👍/👎 or Compare choices) before the next training round (1 of 5" in text
    assert curve.visible is False
    store.close()


def test_compare_from_several_candidates_shows_the_pair_the_reward_model_picks(policy, tiny_cfg, monkeypatch):
    # The pick by tokens is under test here; on a loaded machine the 0.6 s fallback would pick on shorter texts.
    monkeypatch.setattr(service_mod, "PICK_WITHIN_S", 60.0)

    class Picker:  # stands in for the trainer's reward model: always asks about answers 3 and 1
        def __init__(self):
            self.seen = []

        def pick_pair(self, prompt, answers, rng):
            self.seen.append(list(answers))
            return 3, 1

    class Trainer:
        def __init__(self, model):
            self.model = model

        def reward_model(self):
            return self.model

        def status(self):
            return {"state": "idle", "running": True, "watermark": 0, "last_error": ""}

    store = Store(tiny_cfg.db_path)
    picker = Picker()
    service = Service(policy, store, replace(tiny_cfg, compare_candidates=5), Trainer(picker))
    *partial, last = service.compare(ALICE, "Tell me a fruit.", settings=GenerationSettings(max_new_tokens=8, seed=3))
    notes = [u for u in partial if u["note"]]
    assert notes and all(u["pair_id"] is None and u["a"]["text"] == u["b"]["text"] == "" for u in notes)
    assert partial[0]["note"].startswith("Writing 5 answers to pick the two worth your vote… (")
    (candidates,) = picker.seen
    assert len(candidates) == 5
    assert (last["a"]["text"], last["b"]["text"]) == (candidates[3], candidates[1])
    # Only the two shown answers are stored, as siblings under the user's message, with the pair.
    row = store.comparison(last["pair_id"])
    assert (row["a_id"], row["b_id"]) == (last["a"]["response_id"], last["b"]["response_id"])
    assert store.stats()["counts"]["messages"] == 3
    # Longer answers: the pick comes after PICK_AFTER_TOKENS tokens, then the two picked stream and the rest stop.
    picker.seen.clear()
    n = service_mod.PICK_AFTER_TOKENS
    settings = GenerationSettings(max_new_tokens=4 * n, seed=5, stop_loops=False)
    updates = list(service.compare(ALICE, "A long one.", settings=settings))
    (candidates,) = picker.seen
    streamed = [u for u in updates if u["pair_id"] is None and not u["note"]]
    assert len(streamed) > n  # the pair streams token by token after the pick
    assert streamed[0]["a"]["text"].startswith(candidates[3]) and streamed[0]["b"]["text"].startswith(candidates[1])
    last = updates[-1]
    assert len(last["a"]["text"]) > len(candidates[3])
    # Without a reward model (no round yet), two distinct candidates at random.
    service = Service(policy, store, replace(tiny_cfg, compare_candidates=5), Trainer(None))
    *_, last = service.compare(ALICE, "Another fruit?")
    assert last["a"]["response_id"] != last["b"]["response_id"]
    store.close()


def test_limits_refuse_with_a_clear_message_and_write_nothing(policy, tiny_cfg):
    store = Store(tiny_cfg.db_path)
    cfg = replace(tiny_cfg, max_system_prompt_chars=40, max_turns=2, max_requests_per_minute=4)
    service = Service(policy, store, cfg)
    long_prompt = GenerationSettings(max_new_tokens=4, system_prompt="s" * 41)
    before = snapshot(tiny_cfg.db_path)
    with pytest.raises(InvalidRequest, match="The system prompt is 41 characters long; the limit is 40"):
        list(service.chat(ALICE, "Hi", settings=long_prompt))
    assert snapshot(tiny_cfg.db_path) == before
    *_, first = service.chat(ALICE, "One", settings=GenerationSettings(max_new_tokens=4))
    *_, second = service.chat(ALICE, "Two", first["conversation_id"], settings=GenerationSettings(max_new_tokens=4))
    before = snapshot(tiny_cfg.db_path)
    with pytest.raises(InvalidRequest, match="reached 2 turns, the limit: please start a new one"):
        list(service.chat(ALICE, "Three", first["conversation_id"]))
    assert snapshot(tiny_cfg.db_path) == before
    # Four requests a minute: the fourth was refused above only for its turn; the fifth is over the rate.
    with pytest.raises(InvalidRequest, match=r"Too many requests: at most 4 a minute. Please wait \d+ s."):
        service.feedback(ALICE, second["response_id"], "up")
    assert snapshot(tiny_cfg.db_path) == before
    *_, other = service.chat(BOB, "Someone else is not limited by Alice's requests")
    assert other["response_id"]
    store.close()


def test_the_queue_has_a_bounded_size(tiny_cfg, policy):
    from rlhf_live.ui import build

    store = Store(tiny_cfg.db_path)
    cfg = replace(tiny_cfg, queue_max_size=7, generation_concurrency=3)
    demo = build(Service(policy, store, cfg), cfg)
    assert demo._queue.max_size == 7 and demo._queue.default_concurrency_limit == 3
    limits = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values()}
    assert limits["chat"] == limits["compare"] == 3  # torch generates generation_concurrency answers at once
    engine, policy.engine = policy.engine, object()  # as if llama.cpp served: its slots batch, nobody waits
    try:
        demo = build(Service(policy, store, replace(cfg, engine_parallel=5)), replace(cfg, engine_parallel=5))
    finally:
        policy.engine = engine
    limits = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values()}
    assert limits["chat"] == limits["compare"] == 5
    store.close()


def test_the_leaderboard_is_computed_when_votes_change_not_on_every_read(service, monkeypatch):
    import rlhf_live.serving.dashboard as service_module

    calls = []
    real = service_module.leaderboard
    monkeypatch.setattr(service_module, "leaderboard", lambda battles: calls.append(1) or real(battles))
    for _ in range(5):
        service.dashboard.leaderboard()
    assert len(calls) == 1
    *_, pair = service.compare(ALICE, "Which?")
    service.choose(ALICE, pair["pair_id"], "A")  # a vote moves the watermark: the next read recomputes
    service.dashboard.leaderboard()
    service.dashboard.leaderboard()
    assert len(calls) == 2


def test_delete_my_data_removes_exactly_that_voters_rows_and_the_export_never_has_them(service, tmp_path):
    *_, a1 = service.chat(ALICE, "Alice's secret plan")
    service.feedback(ALICE, a1["response_id"], "up")
    *_, pair = service.compare(ALICE, "Alice compares")
    service.choose(ALICE, pair["pair_id"], "A")
    *_, b1 = service.chat(BOB, "Bob's question")
    service.feedback(BOB, b1["response_id"], "down")
    *_, bob_pair = service.compare(BOB, "Bob compares")
    service.choose(BOB, bob_pair["pair_id"], "B")
    db = service.store.path
    bob_before = {
        t: [r for r in rows if "Bob" in json.dumps(r) or BOB in json.dumps(r)] for t, rows in snapshot(db).items()
    }
    note = service.delete_my_data(ALICE)
    assert note.startswith("Deleted 2 conversation(s) with 5 message(s), 1 thumb(s) and 1 comparison(s).")
    after = snapshot(db)
    assert "Alice" not in json.dumps(after) and ALICE not in json.dumps(after)
    assert {
        t: [r for r in rows if "Bob" in json.dumps(r) or BOB in json.dumps(r)] for t, rows in after.items()
    } == bob_before
    for fmt in ("preference", "kto", "conversations"):
        service.store.export(fmt, tmp_path / f"{fmt}.jsonl")
        text = (tmp_path / f"{fmt}.jsonl").read_text()
        assert "Alice" not in text and ("Bob" in text or fmt != "conversations")
    assert service.delete_my_data(ALICE).startswith("Deleted 0 conversation(s)")
