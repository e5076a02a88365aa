"""Open WebUI's rating export as votes: thumbs on our own stored answers, imported thumbs and arena pairs otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_live.store import InvalidInput, Store
from rlhf_live.store.openwebui import read_openwebui

EXPORT = Path(__file__).resolve().parents[1] / "support" / "data" / "openwebui_export.json"
"""Three records in Open WebUI's export shape: a thumbs-up on an rlhf-live answer (two turns, a chat system prompt),
a thumbs-down on llama3:8b with a reason, and an arena win of rlhf-live over gpt-4o (currentId on the loser)."""


def _ours(store: Store, rating) -> str:
    """Store the rated conversation as if this server had answered it (our answer carries a version)."""
    system = rating.prompt[0]["content"] if rating.prompt[0]["role"] == "system" else ""
    cid = store.new_conversation("api-session", system_prompt=system)
    parent = None
    for m in rating.prompt[1 if system else 0 :]:
        parent = store.add_message(cid, m["role"], m["content"], parent_id=parent)
    return store.add_message(cid, "assistant", rating.answer, parent_id=parent, adapter_version="base")


def test_the_export_is_read_from_the_tree_not_from_the_branch_shown_last():
    ratings, skipped = read_openwebui(EXPORT)
    assert skipped == 0 and [(r.model, r.up) for r in ratings] == [
        ("rlhf-live", True),
        ("llama3:8b", False),
        ("rlhf-live", True),
    ]
    first, _, arena = ratings
    assert first.prompt[0] == {
        "role": "system",
        "content": "You are a concise Python tutor. Answer in at most three sentences.",
    }
    assert [m["role"] for m in first.prompt] == ["system", "user", "assistant", "user"] and first.siblings == []
    assert arena.answer.endswith("**408**.") and [m for _, m in arena.siblings] == ["gpt-4o"]  # not the currentId


def test_ratings_of_our_answers_become_thumbs_on_them_and_the_rest_imported_votes(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    ratings, _ = read_openwebui(EXPORT)
    ours = [_ours(store, ratings[0]), _ours(store, ratings[2])]
    mark = store.watermark()
    out = store.import_openwebui(EXPORT)
    assert {k: out[k] for k in ("ratings", "matched", "imported_thumbs", "imported_pairs")} == {
        "ratings": 3,
        "matched": 2,
        "imported_thumbs": 1,
        "imported_pairs": 1,
    }
    thumbs = {t.response_id: t for t in store.pointwise_labels(mark)}
    assert thumbs[ours[0]].label is True and thumbs[ours[1]].label is True  # on-policy: our stored answers
    assert thumbs[ours[0]].voter_source and thumbs[ours[0]].voter_source == thumbs[ours[1]].voter_source  # one user
    (llama,) = [t for t in thumbs.values() if t.response_id not in ours]
    assert llama.label is False and llama.completion.startswith(ratings[1].answer[:20])
    (pair,) = store.preference_pairs(mark)
    assert pair.chosen == ratings[2].answer and pair.rejected == ratings[2].siblings[0][0] and pair.origin == "import"
    # Importing the same export again (a scheduled import) adds no vote.
    after = store.watermark()
    again = store.import_openwebui(EXPORT)
    assert store.watermark() == after and again["already_imported"] == 2 and again["matched"] == 2


def test_a_file_that_is_not_an_export_is_refused_and_writes_nothing(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    bad = tmp_path / "bad.json"
    for text in ("{not json", json.dumps({"feedbacks": 3})):
        bad.write_text(text)
        with pytest.raises(InvalidInput, match="not an Open WebUI feedback export"):
            store.import_openwebui(bad)
    assert store.stats()["counts"]["messages"] == 0
    records = json.loads(EXPORT.read_text())
    del records[0]["snapshot"]  # an export without snapshots (some versions): skipped, counted
    records[1]["data"]["rating"] = 0  # a draw carries no thumb
    bad.write_text(json.dumps(records))
    assert read_openwebui(bad)[1] == 2
