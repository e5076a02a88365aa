"""The HTTP API of the real app (`python app.py` in a subprocess, tiny model) through gradio_client.

Every vote must land in the DB and in the exports; every bad request must come back as a readable AppError and
leave the DB exactly as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from apphelpers import ROOT, counts, rows, shared_tiny_app, snapshot
from gradio_client import Client
from gradio_client.exceptions import AppError

from rlhf_live.store import Store

ENDPOINTS = {"/chat", "/feedback", "/compare", "/choose", "/status"}


@pytest.fixture(scope="module")
def tiny_app(request, tiny_lm_dir, tmp_path_factory):
    return shared_tiny_app(request, tiny_lm_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def client(tiny_app) -> Client:
    return Client(tiny_app.url, verbose=False)


@pytest.fixture(scope="module")
def other(tiny_app) -> Client:
    """A second client: another session, so another voter."""
    return Client(tiny_app.url, verbose=False)


@pytest.fixture(scope="module")
def store(tiny_app):
    s = Store(tiny_app.db_path)
    yield s
    s.close()


def export(app, fmt: str, tmp_path) -> list[dict]:
    """Run the CLI's export against the running app's data dir, as a user would."""
    out = tmp_path / f"{fmt}.jsonl"
    cmd = [sys.executable, "-m", "rlhf_live", "export", "--format", fmt, "--data-dir", str(app.data_dir)]
    done = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert done.stdout.strip() == f"wrote {len(lines)} rows to {out}"
    return lines


def test_named_endpoints_are_exactly_the_public_api(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == ENDPOINTS
    params = {
        name: [p["parameter_name"] for p in api["named_endpoints"][name]["parameters"]] for name in sorted(ENDPOINTS)
    }
    assert params == {
        "/chat": ["message", "conversation_id"],
        "/choose": ["pair_id", "choice", "reason"],
        "/compare": ["message", "conversation_id"],
        "/feedback": ["response_id", "value", "reason"],
        "/status": [],
    }
    # The UI's own events (submit, like, retry, ...) are not public endpoints.
    assert api["unnamed_endpoints"] == {}


def test_chat_feedback_compare_choose_status_round_trip(tiny_app, client, store, tmp_path):
    db = tiny_app.db_path
    first = client.predict("Hello from the API", "", api_name="/chat")
    assert set(first) == {"conversation_id", "response_id", "text", "adapter_version"}
    assert first["adapter_version"] == "base"
    cid = first["conversation_id"]
    second = client.predict("A second turn", cid, api_name="/chat")
    assert second["conversation_id"] == cid
    msgs = store.conversation(cid)["messages"]
    assert [(m["role"], m["content"]) for m in msgs] == [
        ("user", "Hello from the API"),
        ("assistant", first["text"]),
        ("user", "A second turn"),
        ("assistant", second["text"]),
    ]
    assert [m["id"] for m in msgs if m["role"] == "assistant"] == [first["response_id"], second["response_id"]]
    assert msgs[1]["adapter_version"] == "base" and msgs[1]["settings"]["max_new_tokens"] == 16
    assert msgs[2]["parent_id"] == first["response_id"]

    # Thumbs: up, then down with a reason, on two answers.
    assert client.predict(first["response_id"], "up", "", api_name="/feedback") == {"ok": True}
    assert client.predict(second["response_id"], "up", "", api_name="/feedback") == {"ok": True}
    assert client.predict(second["response_id"], "down", "too short", api_name="/feedback") == {"ok": True}
    fb = {
        r["response_id"]: (r["value"], r["reason"])
        for r in rows(
            db, "SELECT * FROM feedback WHERE response_id IN (?, ?)", (first["response_id"], second["response_id"])
        )
    }
    assert fb == {first["response_id"]: ("up", ""), second["response_id"]: ("down", "too short")}

    # A/B: two answers, sources hidden; choose B; sources revealed.
    pair = client.predict("Compare this", "", api_name="/compare")
    assert set(pair) == {"pair_id", "a", "b"} and set(pair["a"]) == set(pair["b"]) == {"response_id", "text"}
    row = store.comparison(pair["pair_id"])
    assert (row["a_id"], row["b_id"], row["choice"]) == (pair["a"]["response_id"], pair["b"]["response_id"], None)
    assert store.message(pair["a"]["response_id"])["content"] == pair["a"]["text"]
    assert store.message(pair["b"]["response_id"])["content"] == pair["b"]["text"]
    out = client.predict(pair["pair_id"], "B", "clearer", api_name="/choose")
    assert out == {"ok": True, "a_version": "base", "b_version": "base"}
    row = store.comparison(pair["pair_id"])
    assert (row["choice"], row["reason"]) == ("B", "clearer")

    # A pair in an existing conversation hangs under its last answer.
    cont = client.predict("Compare in context", cid, api_name="/compare")
    assert store.comparison(cont["pair_id"])["conversation_id"] == cid
    assert client.predict(cont["pair_id"], "both_bad", "", api_name="/choose")["ok"] is True

    status = client.predict(api_name="/status")
    assert status["live_version"] == "base"
    assert status["trainer"] == {"state": "not running", "running": False}
    db_counts = counts(db)
    for table in ("conversations", "messages", "feedback", "comparisons"):
        assert status["counts"][table] == db_counts[table], table
    assert status["choices"]["B"] >= 1 and status["choices"]["both_bad"] >= 1
    assert status["votes"]["up"] >= 1 and status["votes"]["down"] >= 1

    # Every vote is in the exports, with the exact text.
    kto = export(tiny_app, "kto", tmp_path)
    labelled = {(r["completion"][0]["content"], r["label"]) for r in kto}
    assert (first["text"], True) in labelled
    assert (second["text"], False) in labelled
    assert (pair["b"]["text"], True) in labelled and (pair["a"]["text"], False) in labelled
    assert (cont["a"]["text"], False) in labelled and (cont["b"]["text"], False) in labelled  # both bad
    mine = [r for r in kto if r["completion"][0]["content"] == first["text"]]
    assert mine[0]["prompt"][-1] == {"role": "user", "content": "Hello from the API"}
    pref = export(tiny_app, "preference", tmp_path)
    assert {
        "prompt": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Compare this"},
        ],
        "chosen": [{"role": "assistant", "content": pair["b"]["text"]}],
        "rejected": [{"role": "assistant", "content": pair["a"]["text"]}],
    } in pref


def test_bad_requests_raise_a_readable_error_and_change_nothing(tiny_app, client, other):
    mine = client.predict("Mine", "", api_name="/chat")
    pair = client.predict("My pair", "", api_name="/compare")
    locked = client.predict("Locked pair", "", api_name="/compare")
    client.predict(locked["pair_id"], "A", "", api_name="/choose")
    before = snapshot(tiny_app.db_path)
    cases = [
        # (client, args, api_name, expected message)
        (client, ("nope", "up", ""), "/feedback", "No answer with id 'nope' exists."),
        (client, (mine["response_id"], "like", ""), "/feedback", "A vote is 'up', 'down' or 'clear', not 'like'."),
        (client, ("", "", ""), "/feedback", "The answer id must be a non-empty string"),
        (client, ("", ""), "/chat", "Please type a message first: it is empty."),
        (client, ("   ", mine["conversation_id"]), "/chat", "Please type a message first: it is empty."),
        (client, ("x" * 4001, ""), "/chat", "the limit is 4,000"),
        (client, ("", ""), "/compare", "Please type a message first: it is empty."),
        (client, ("Hi", "no-such-conversation"), "/chat", "No conversation with id 'no-such-conversation' exists."),
        (client, (pair["pair_id"], "C", ""), "/choose", "The choice is one of A, B, tie, both_bad, not 'C'."),
        (client, ("no-such-pair", "A", ""), "/choose", "No comparison with id 'no-such-pair' exists."),
        (client, (locked["pair_id"], "B", ""), "/choose", "already has its answer (A); it cannot change."),
        (client, (pair["pair_id"], "A", "x" * 1001), "/choose", "at most 1000 are accepted"),
        # Another client (another session) cannot touch this client's conversation, answers or pairs.
        (other, ("Hijack", mine["conversation_id"]), "/chat", "belongs to another session"),
        (other, ("Hijack", mine["conversation_id"]), "/compare", "belongs to another session"),
        (other, (mine["response_id"], "down", ""), "/feedback", "belongs to another session"),
        (other, (pair["pair_id"], "A", ""), "/choose", "shown to another session"),
    ]
    for who, args, api_name, message in cases:
        with pytest.raises(AppError) as info:
            who.predict(*args, api_name=api_name)
        assert message in str(info.value), (api_name, args[:2], str(info.value))
    assert snapshot(tiny_app.db_path) == before
    # The pair that was refused is still open for its own client.
    assert client.predict(pair["pair_id"], "tie", "", api_name="/choose")["ok"] is True
    assert rows(tiny_app.db_path, "SELECT choice FROM comparisons WHERE id = ?", (pair["pair_id"],)) == [
        {"choice": "tie"}
    ]


def test_chat_streams_to_api_clients_as_the_browser_sees_it(tiny_app, client):
    job = client.submit("Stream to me, please", "", api_name="/chat")
    final = job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) > 2  # partial answers arrived before the whole one (16 tokens: one per token)
    assert all(o["response_id"] is None for o in outputs[:-1]) and outputs[-1] == final
    texts = [o["text"] for o in outputs[:-1]]
    assert all(final["text"].startswith(t) for t in texts if t) and final["response_id"]
    pair_job = client.submit("Two streamed answers", "", api_name="/compare")
    pair = pair_job.result(timeout=120)
    assert pair["pair_id"] and [o["pair_id"] for o in pair_job.outputs()][-1] == pair["pair_id"]
