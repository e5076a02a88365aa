"""The OpenAI-compatible API, driven by the official `openai` client against a running app (the tiny model)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest
from apphelpers import rows, run_app, shared_tiny_app

SYSTEM = "You are a pirate."


@pytest.fixture(scope="module")
def app(request, tiny_lm_dir, tmp_path_factory):
    return shared_tiny_app(request, tiny_lm_dir, tmp_path_factory)


def _client(app, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "v1", api_key=key, max_retries=0)


def test_models_list_the_live_version_and_the_original(app):
    names = [m.id for m in _client(app).models.list()]
    assert names[:2] == ["rlhf-live", "rlhf-live-base"]


def test_a_completion_is_stored_as_a_chat_answer_and_its_feedback_trains(app):
    client = _client(app)
    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr."},
        {"role": "user", "content": "Where is the treasure?"},
    ]
    done = client.chat.completions.create(model="rlhf-live", messages=history, max_tokens=8, n=2, seed=1)
    assert done.object == "chat.completion" and [c.index for c in done.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in done.choices)
    assert done.usage.completion_tokens > 0 and done.usage.prompt_tokens > 0
    db = app.data_dir / "rlhf_live.db"
    user = done.id.removeprefix("chatcmpl-")
    (conv,) = rows(
        db,
        "SELECT c.system_prompt FROM conversations c JOIN messages m ON m.conversation_id = c.id WHERE m.id = ?",
        (user,),
    )
    assert conv["system_prompt"] == SYSTEM  # the client's system prompt is the stored one: training renders it
    stored = rows(db, "SELECT content, adapter_version FROM messages WHERE parent_id = ? ORDER BY rowid", (user,))
    assert [s["content"] for s in stored] == [c.message.content for c in done.choices]
    assert all(s["adapter_version"] == "base" for s in stored)
    path = rows(
        db,
        "SELECT role, content FROM messages WHERE conversation_id = (SELECT conversation_id FROM "
        "messages WHERE id = ?) ORDER BY rowid",
        (user,),
    )
    assert [(p["role"], p["content"]) for p in path[:3]] == [
        ("user", "Hello"),
        ("assistant", "Arr."),
        ("user", "Where is the treasure?"),
    ]

    # Feedback by completion id and choice index: the vote lands on the stored answer and counts for the next round.
    mark = rows(db, "SELECT value FROM counters WHERE name = 'watermark'")
    up = client.post("/feedback", body={"id": done.id, "index": 1, "value": "up"}, cast_to=object)
    assert up == {"ok": True, "id": done.id, "index": 1, "value": "up"}
    (thumb,) = rows(
        db,
        "SELECT f.value, m.content, f.seq FROM feedback f JOIN messages m ON m.id = f.response_id "
        "WHERE m.parent_id = ?",
        (user,),
    )
    assert thumb["value"] == "up" and thumb["content"] == done.choices[1].message.content
    assert thumb["seq"] > (mark[0]["value"] if mark else 0)
    pair = client.post("/comparisons", body={"id": done.id, "a": 0, "b": 1, "choice": "B"}, cast_to=object)
    assert pair["ok"] and pair["choice"] == "B" and pair["a_version"] == pair["b_version"] == "base"
    (choice,) = rows(
        db, "SELECT choice FROM comparisons WHERE a_id IN (SELECT id FROM messages WHERE parent_id = ?)", (user,)
    )
    assert choice["choice"] == "B"


def test_streaming_sends_role_deltas_finish_usage_and_done(app):
    url = app.url + "v1/chat/completions"
    body = {
        "model": "rlhf-live",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line.decode().strip()[6:] for line in resp if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and chunks[-1]["usage"]["completion_tokens"] > 0 and chunks[-1]["choices"] == []
    db = app.data_dir / "rlhf_live.db"
    (stored,) = rows(
        db, "SELECT content FROM messages WHERE parent_id = ?", (chunks[0]["id"].removeprefix("chatcmpl-"),)
    )
    assert stored["content"] == text  # what streamed is what is stored

    # The official client reads the same stream.
    streamed = _client(app).chat.completions.create(
        model="rlhf-live", messages=[{"role": "user", "content": "Again"}], max_tokens=6, stream=True
    )
    parts = list(streamed)
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].choices[0].finish_reason is not None


def test_a_stop_sequence_ends_the_answer_before_it(app):
    client = _client(app)
    ask = {"model": "rlhf-live", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0}
    text = client.chat.completions.create(**ask).choices[0].message.content  # greedy: the same answer each time
    assert len(text) >= 4, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(**ask, stop=[stop, "never there"])
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_write_nothing(app):
    client = _client(app)
    db = app.data_dir / "rlhf_live.db"
    before = rows(db, "SELECT count(*) AS n FROM messages")[0]["n"]
    with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
        client.chat.completions.create(model="rlhf-live", messages=[{"role": "assistant", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="n must be between 1 and 8"):
        client.chat.completions.create(model="rlhf-live", messages=[{"role": "user", "content": "x"}], n=50)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="rlhf-live", messages=[{"role": "user", "content": "x"}], temperature=9)
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="not a completion id"):
        client.post("/feedback", body={"id": "nope", "value": "up"}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match="valid JSON"):
        client.post("/chat/completions", body=["not", "an", "object"], cast_to=object)
    assert rows(db, "SELECT count(*) AS n FROM messages")[0]["n"] == before


def test_with_keys_a_request_needs_one_and_a_key_is_its_own_voter(tiny_lm_dir, tmp_path):
    data = tmp_path / "data"
    with run_app(tiny_lm_dir, data, extra=("--api-keys", "alpha,beta")) as app:
        with pytest.raises(openai.AuthenticationError, match="valid API key"):
            _client(app, "wrong").models.list()
        alpha, beta = _client(app, "alpha"), _client(app, "beta")
        done = alpha.chat.completions.create(
            model="rlhf-live", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        with pytest.raises(openai.BadRequestError):  # another key's completion is not theirs to vote on
            beta.post("/feedback", body={"id": done.id, "value": "up"}, cast_to=object)
        alpha.post("/feedback", body={"id": done.id, "value": "down"}, cast_to=object)
        db = data / "rlhf_live.db"
        sources = {r["source"] for r in rows(db, "SELECT source FROM feedback")}
        assert len(sources) == 1 and "alpha" not in next(iter(sources))  # a salted id, never the key


def test_an_open_webui_rating_of_a_completion_becomes_a_vote_on_the_stored_answer(app, tmp_path):
    """The Open WebUI loop: it chats through /v1, its user rates the answer, the admin's export is imported."""
    from rlhf_live.cli import main

    messages = [{"role": "user", "content": "Name a colour."}]
    done = _client(app).chat.completions.create(model="rlhf-live", messages=messages, max_tokens=6)
    answer = done.choices[0].message.content
    record = json.loads((Path(__file__).parents[1] / "support" / "data" / "openwebui_export.json").read_text())[0]
    history = {
        "u1": {"id": "u1", "parentId": None, "childrenIds": ["a1"], "role": "user", "content": messages[0]["content"]},
        "a1": {
            "id": "a1",
            "parentId": "u1",
            "childrenIds": [],
            "role": "assistant",
            "content": answer,
            "model": "rlhf-live",
        },
    }
    record["snapshot"]["chat"]["chat"] = {"history": {"messages": history, "currentId": "a1"}, "params": {}}
    record["meta"]["message_id"], record["data"]["rating"] = "a1", -1
    export = tmp_path / "feedback-history-export.json"
    export.write_text(json.dumps([record]))
    assert main(["import", "--openwebui", str(export), "--data-dir", str(app.data_dir)]) == 0
    (thumb,) = rows(
        app.data_dir / "rlhf_live.db",
        "SELECT f.value FROM feedback f JOIN messages m ON m.id = f.response_id WHERE m.parent_id = ?",
        (done.id.removeprefix("chatcmpl-"),),
    )
    assert thumb["value"] == "down"  # on the answer this server wrote: an on-policy vote
