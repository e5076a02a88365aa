"""Open WebUI's ratings as votes: its admin feedback export (thumbs, arena picks) turned into thumbs on our own stored
answers where the rated answer was written here, and into imported thumbs and A/B pairs otherwise.

Knows the export's shape (a JSON array of feedback records: data.rating, meta.message_id, a snapshot of the chat as a
message tree; Open WebUI's models/feedbacks.py and routers/evaluations.py) and how to match a rated answer to a stored
one (the same text answering the same user turn); knows nothing of models or training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_live.store.base import Database, InvalidInput, _new_id, _now, source_id, voter_id

_DETAILS = re.compile(r"<details\b.*?</details>\s*", re.S)  # reasoning and tool-call blocks newer versions embed


@dataclass(frozen=True)
class Rating:
    """One rated answer from an export: the conversation before it, the answer, +1/-1, and any arena opponents."""

    record: str
    user: str
    prompt: list[dict]
    """The path from the first message to the user turn the answer answers (a system prompt first, if any)."""
    answer: str
    model: str
    up: bool
    reason: str = ""
    siblings: list[tuple[str, str]] = field(default_factory=list)
    """(text, model) of the other answers to the same user turn (arena or side by side), in the export's order."""


def read_openwebui(path: str | Path) -> tuple[list[Rating], int]:
    """The export's usable ratings, and how many records were skipped (no snapshot, no rating, no such message)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(
            f"{path} is not an Open WebUI feedback export (JSON): {exc}. Nothing was imported."
        ) from None
    records = data.get("items") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise InvalidInput(f"{path} is not an Open WebUI feedback export: expected a JSON array of records.")
    ratings = [r for r in (_rating(rec) for rec in records) if r is not None]
    return ratings, len(records) - len(ratings)


def _rating(rec) -> Rating | None:
    """One record as a Rating, or None where it cannot be one."""
    if not isinstance(rec, dict):
        return None
    data, meta = rec.get("data") or {}, rec.get("meta") or {}
    chat = ((rec.get("snapshot") or {}).get("chat") or {}).get("chat") or {}
    messages = (chat.get("history") or {}).get("messages") or {}
    answer = messages.get(meta.get("message_id"))
    if str(data.get("rating")) not in ("1", "-1") or not isinstance(answer, dict) or answer.get("role") != "assistant":
        return None
    path, cur = [], answer.get("parentId")  # the parentId chain, never chat.messages (the branch shown last)
    while cur is not None and cur in messages and len(path) < 10_000:
        path.append(messages[cur])
        cur = messages[cur].get("parentId")
    path.reverse()
    if not path or path[-1].get("role") != "user":
        return None
    system = (chat.get("params") or {}).get("system") or chat.get("system") or ""
    prompt = [{"role": "system", "content": system}] if system else []
    prompt += [
        {"role": m["role"], "content": _text(m)} for m in path if m.get("role") in ("system", "user", "assistant")
    ]
    siblings = [
        (_text(messages[i]), messages[i].get("selectedModelId") or messages[i].get("model") or "")
        for i in path[-1].get("childrenIds") or []
        if i != answer.get("id") and i in messages and messages[i].get("role") == "assistant"
    ]
    return Rating(
        record=str(rec.get("id") or meta.get("message_id")),
        user=str(rec.get("user_id") or ""),
        prompt=prompt,
        answer=_text(answer),
        model=str(data.get("model_id") or answer.get("selectedModelId") or answer.get("model") or ""),
        up=str(data.get("rating")) == "1",
        reason=" ".join(str(x) for x in (data.get("reason"), data.get("comment")) if x),
        siblings=[s for s in siblings if s[0]],
    )


def _text(message: dict) -> str:
    content = message.get("content")
    return _DETAILS.sub("", content).strip() if isinstance(content, str) else ""


class OpenWebUI(Database):
    """`import_openwebui`: an Open WebUI export into thumbs on our answers, imported thumbs and A/B pairs."""

    def import_openwebui(self, path: str | Path, ours: tuple[str, ...] = ("rlhf-live",)) -> dict:
        """Import an Open WebUI feedback export; counts of what became what. Importing it again adds nothing."""
        ratings, skipped = read_openwebui(path)
        salt = self.voter_salt()
        counts = {"ratings": len(ratings), "skipped": skipped, "matched": 0, "imported_thumbs": 0, "imported_pairs": 0}
        counts["already_imported"] = 0
        for r in ratings:
            who = f"openwebui:{r.user}"  # each Open WebUI user is a voter and a source of their own (share caps apply)
            voter, source = voter_id(who, who, salt), source_id("", who, salt)
            mine = self._our_answer(r) if r.model in ours or r.model.startswith(tuple(f"{o}-" for o in ours)) else None
            if mine is not None:  # written here: an on-policy vote on the stored answer
                self.record_feedback(mine, voter, "up" if r.up else "down", r.reason[:1000], source=source)
                counts["matched"] += 1
                if not r.siblings:
                    continue
            key = f"openwebui:{r.record}"
            if self._imported(key):
                counts["already_imported"] += 1
                continue
            answer_id, sibling_ids = self._import_conversation(key, r, voter)
            if mine is None:
                self.record_feedback(answer_id, voter, "up" if r.up else "down", r.reason[:1000], source=source)
                counts["imported_thumbs"] += 1
            for sibling in sibling_ids:  # arena: the rated answer won (+1) or lost (-1) against each opponent
                pair = self.new_comparison(
                    self.message(answer_id)["conversation_id"],
                    answer_id,
                    sibling,
                    a_source="import",
                    b_source="import",
                    voter=voter,
                    origin="import",
                )
                self.choose(pair, voter, "A" if r.up else "B", r.reason[:1000], source=source)
                counts["imported_pairs"] += 1
        return {**counts, "file": str(path)}

    def _our_answer(self, r: Rating) -> str | None:
        """The stored answer of ours with the rated text, answering the same user turn (newest first)."""
        question = r.prompt[-1]["content"]
        with self._read() as conn:
            row = conn.execute(
                "SELECT a.id FROM messages a JOIN messages u ON u.id = a.parent_id WHERE a.role = 'assistant'"
                " AND a.adapter_version IS NOT NULL AND a.content = ? AND u.content = ? ORDER BY a.rowid DESC LIMIT 1",
                (r.answer, question),
            ).fetchone()
        return row[0] if row else None

    def _imported(self, key: str) -> bool:
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM conversations WHERE source = ? LIMIT 1", (key,)).fetchone() is not None

    def _import_conversation(self, key: str, r: Rating, voter: str) -> tuple[str, list[str]]:
        """A conversation (origin 'import') with the prompt, the rated answer and its opponents; their ids."""
        system = r.prompt[0]["content"] if r.prompt and r.prompt[0]["role"] == "system" else ""
        turns = r.prompt[1:] if system else r.prompt
        now, cid = _now(), _new_id()
        rows, parent = [], None
        for m in turns:
            mid = _new_id()
            rows.append((mid, cid, parent, m["role"], self._content(m["content"], "message"), now))
            parent = mid
        answers = [_new_id() for _ in range(1 + len(r.siblings))]
        for mid, text in zip(answers, [r.answer, *(t for t, _ in r.siblings)]):
            rows.append((mid, cid, parent, "assistant", self._content(text, "message"), now))
        with self._write() as conn:
            conn.execute(
                "INSERT INTO conversations (id, session_id, system_prompt, origin, source, created)"
                " VALUES (?, ?, ?, 'import', ?, ?)",
                (cid, voter, self._content(system, "system prompt"), key, now),
            )
            conn.executemany(
                "INSERT INTO messages (id, conversation_id, parent_id, role, content, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        return answers[0], answers[1:]
