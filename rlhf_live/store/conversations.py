"""Conversations and their message tree: turns under a parent (retries and A/B answers are siblings), contexts.

Knows the `conversations` and `messages` tables and how a message's context is rebuilt from its parent chain
(`MessageTree`, used by the training rows and the export too); knows nothing of votes or models.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from rlhf_live.store.base import ROLES, Database, Forbidden, InvalidInput, _chunks, _loads, _new_id, _now


class MessageTree:
    """Messages of some conversations in memory, to build many contexts without one query each."""

    def __init__(self, conn: sqlite3.Connection, conversation_ids: Iterable[str] | None):
        self.nodes: dict[str, tuple[str | None, str, str, str]] = {}
        self.system: dict[str, str] = {}
        self._cache: dict[str | None, list[dict]] = {}
        m_sql = "SELECT id, parent_id, role, content, conversation_id FROM messages"
        c_sql = "SELECT id, system_prompt FROM conversations"
        if conversation_ids is None:
            batches: list[tuple[str, list]] = [("", [])]
        else:
            ids = sorted(set(conversation_ids))
            batches = [(f" WHERE {{col}} IN ({','.join('?' * len(b))})", b) for b in _chunks(ids)]
        for where, params in batches:
            for mid, parent, role, content, conv in conn.execute(m_sql + where.format(col="conversation_id"), params):
                self.nodes[mid] = (parent, role, content, conv)
            self.system.update(conn.execute(c_sql + where.format(col="id"), params).fetchall())

    def path(self, message_id: str | None) -> list[dict]:
        """Messages from the root down to and including `message_id` (without the system prompt)."""
        if message_id is None:
            return []
        # Iterative, not recursive: a long conversation must not hit Python's recursion limit.
        chain, node = [], message_id
        while node is not None and node not in self._cache:
            chain.append(node)
            node = self.nodes[node][0]
        prefix = self._cache[node] if node is not None else []
        for mid in reversed(chain):
            _, role, content, _ = self.nodes[mid]
            prefix = [*prefix, {"role": role, "content": content}]
            self._cache[mid] = prefix
        return self._cache[message_id]

    def context(self, message_id: str) -> list[dict]:
        """What the model saw before writing `message_id`: system prompt (if any) then the parent chain."""
        parent, _, _, conv = self.nodes[message_id]
        system = self.system.get(conv) or ""
        head = [{"role": "system", "content": system}] if system else []
        return [*head, *[dict(m) for m in self.path(parent)]]


class Conversations(Database):
    """Conversations and messages: create, add turns, read one back, rebuild what the model saw."""

    def new_conversation(
        self, session_id: str, *, system_prompt: str = "", origin: str = "live", asker: str = ""
    ) -> str:
        """Start a conversation owned by `session_id` and asked from source `asker`; return its id."""
        if not isinstance(session_id, str) or not session_id:
            raise InvalidInput("A conversation needs a session id (a non-empty string).")
        system_prompt = self._content(system_prompt or "", "system prompt")
        if not isinstance(origin, str) or not origin:
            raise InvalidInput("The origin must be a non-empty string such as 'live' or 'import'.")
        cid = _new_id()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO conversations (id, session_id, system_prompt, origin, created, asker)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (cid, session_id, system_prompt, origin, _now(), asker if isinstance(asker, str) else ""),
            )
        return cid

    def conversation(self, conversation_id: str, session_id: str | None = None) -> dict:
        """The conversation row plus its `messages` (oldest first); Forbidden if it belongs to another session."""
        cid = self._id(conversation_id, "conversation")
        with self._read() as conn:
            row = self._get(conn, "conversations", cid, "conversation with id")
            if session_id is not None and row["session_id"] != session_id:
                raise Forbidden("This conversation belongs to another session; start a new one.")
            row["messages"] = [
                self._decode_message(m)
                for m in self._rows(conn, "SELECT * FROM messages WHERE conversation_id = ? ORDER BY rowid", (cid,))
            ]
        return row

    @staticmethod
    def _decode_message(row: dict) -> dict:
        row["settings"] = _loads(row["settings"]) if row.get("settings") else None
        return row

    def add_message(
        self,
        conversation_id: str,
        role: str,
        content: str,
        *,
        parent_id: str | None = None,
        adapter_version: str | None = None,
        settings: dict | None = None,
        finish_reason: str | None = None,
        n_tokens: int | None = None,
    ) -> str:
        """Add a turn under `parent_id` (None: the first turn); siblings under one parent are retries or A/B answers."""
        cid = self._id(conversation_id, "conversation")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidInput(f"The role must be one of {', '.join(ROLES)}, not {role!r}.")
        content = self._content(content)
        if settings is not None and not isinstance(settings, dict):
            raise InvalidInput("Generation settings must be a dict.")
        try:
            settings_json = None if settings is None else json.dumps(settings, sort_keys=True)
        except (TypeError, ValueError):
            raise InvalidInput("Generation settings must be JSON-serialisable.") from None
        if n_tokens is not None and (not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0):
            raise InvalidInput(f"n_tokens must be a non-negative integer, not {n_tokens!r}.")
        mid = _new_id()
        with self._write() as conn:
            self._get(conn, "conversations", cid, "conversation with id", columns="id")
            if parent_id is not None:
                pid = self._id(parent_id, "parent message")
                parent = self._get(conn, "messages", pid, "message with id", columns="conversation_id")
                if parent["conversation_id"] != cid:
                    raise InvalidInput(f"Message '{pid}' belongs to another conversation.")
            conn.execute(
                "INSERT INTO messages (id, conversation_id, parent_id, role, content, adapter_version, settings,"
                " finish_reason, n_tokens, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (mid, cid, parent_id, role, content, adapter_version, settings_json, finish_reason, n_tokens, _now()),
            )
        return mid

    def message(self, message_id: str) -> dict:
        """One message row (settings decoded)."""
        mid = self._id(message_id, "message")
        with self._read() as conn:
            row = self._get(conn, "messages", mid, "message with id")
        return self._decode_message(row)

    def context(self, message_id: str) -> list[dict]:
        """[{role, content}] the model saw before `message_id`: system prompt (if non-empty), then the parent chain."""
        mid = self._id(message_id, "message")
        with self._read() as conn:
            row = self._get(conn, "messages", mid, "message with id", columns="conversation_id")
            return MessageTree(conn, [row["conversation_id"]]).context(mid)
