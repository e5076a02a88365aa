"""The feedback store: conversations, answers, thumbs, A/B choices, adapter versions and training runs in SQLite.

Knows SQL, not tensors: it records what people (and importers) said about answers and hands out training rows
(`preference_pairs`, `ties`, `pointwise_labels`, `prompts`) after a watermark; it knows nothing of models, tokens,
Gradio or how the rows are used. It never imports torch or gradio.

Guarantees:
- One `sqlite_utils.Database` per thread (SQLite connections are bound to their creating thread), WAL mode so readers
  never block the writer, `synchronous=FULL` by default so an acknowledged write survives a crash or power cut.
- Every write method is one `BEGIN IMMEDIATE` transaction: it either happens entirely or not at all, and it validates
  its input first, so bad input raises a `StoreError` with a sentence a person understands and changes nothing.
- `feedback` holds one row per (answer, voter) with the final state (up / down / cleared); the full change history is
  kept in `feedback_events` (one row per write).
- No raw IP address or browser hash is stored: callers pass `voter_id(...)`, a salted hash.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from rlhf_live import migrations
from rlhf_live.formats import FormatError, read_pairs

VOTE_VALUES = {"up": "up", "down": "down", "clear": "cleared"}
CHOICES = ("A", "B", "tie", "both_bad")
ADAPTER_STATUSES = ("candidate", "live", "retired", "rolled_back")
ROLES = ("system", "user", "assistant")
EXPORT_FORMATS = ("preference", "kto", "conversations")
IMPORT_VOTER = "import"  # voter/session of imported rows: never a live user's id
_IN_CHUNK = 500  # ids per `IN (...)` query, well below SQLite's variable limit


class StoreError(ValueError):
    """A request the store refuses; the message is a sentence for the person who made it."""


class UnknownId(StoreError):
    """An id that names no row."""


class InvalidInput(StoreError):
    """A value of the wrong kind, size or shape (for a malformed import line, `line` is its 1-based number)."""

    def __init__(self, message: str, *, line: int | None = None):
        super().__init__(message)
        self.line = line


class AlreadyVoted(StoreError):
    """A comparison that already has its choice."""


class Forbidden(StoreError):
    """A conversation or comparison that belongs to another session."""


def voter_id(session_hash: str, username: str | None, salt: str) -> str:
    """Stable, salted, irreversible voter id: the username when logged in, else the browser session's hash."""
    if username:
        basis = "user:" + username
    elif session_hash:
        basis = "session:" + session_hash
    else:
        raise InvalidInput("A vote needs a session or a user name to count it once.")
    if not salt:
        raise InvalidInput("voter_id needs a non-empty salt (see Store.voter_salt()).")
    return "v" + hmac.new(salt.encode(), basis.encode(), hashlib.sha256).hexdigest()[:32]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _new_id() -> str:
    return uuid.uuid4().hex


def _loads(text: str | None) -> dict:
    return json.loads(text) if text else {}


def _chunks(items: list, size: int = _IN_CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Tree:
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


class Store:
    """The SQLite feedback DB; safe to share between threads (each thread gets its own connection)."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_reason_chars: int = 1000,
        max_content_chars: int = 200_000,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
    ):
        """Open (creating the parent folder and file if needed) and migrate the DB at `path`."""
        if str(path) in {"", ":memory:"}:
            # Each thread opens its own connection: an in-memory DB would be a different, empty DB per thread.
            raise InvalidInput("The store needs a file path; an in-memory database cannot be shared between threads.")
        self.path = Path(path)
        self.max_reason_chars = max_reason_chars
        self.max_content_chars = max_content_chars
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise InvalidInput(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}.")
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[sqlite_utils.Database] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self.db()
        db.enable_wal()  # persistent in the file; must run outside a transaction
        # Migrate under the write lock so two processes opening a new file at once do not both create tables.
        with self._write():
            migrations.apply(db)

    @classmethod
    def from_config(cls, cfg) -> Store:
        """Store at cfg.db_path with the limits from the Config."""
        return cls(
            cfg.db_path,
            max_reason_chars=cfg.max_reason_chars,
            max_content_chars=cfg.max_stored_message_chars,
            synchronous=cfg.db_synchronous,
        )

    # --- connections and transactions ---------------------------------------------------------

    def db(self) -> sqlite_utils.Database:
        """This thread's connection (opened on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            # check_same_thread=False only so that close() may close every thread's connection at shutdown;
            # each connection is still used by the one thread that opened it.
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout, check_same_thread=False)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            # 64 MiB page cache (default 2 MiB): ids are random uuids, so big imports touch pages all over the B-trees.
            conn.execute("PRAGMA cache_size = -65536")
            db = sqlite_utils.Database(conn)
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def close(self) -> None:
        """Close every thread's connection (call at shutdown, when no thread uses the store any more)."""
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so it waits instead of failing later."""
        conn = self.db().conn
        if conn.in_transaction:  # nested call: join the outer transaction through a savepoint
            with self.db().atomic():
                yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot across several SELECTs."""
        conn = self.db().conn
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    @staticmethod
    def _rows(conn: sqlite3.Connection, sql: str, params: Iterable = ()) -> list[dict]:
        cursor = conn.execute(sql, tuple(params))
        keys = [d[0] for d in cursor.description]
        return [dict(zip(keys, row)) for row in cursor]

    def _one(self, conn: sqlite3.Connection, sql: str, params: Iterable, missing: str) -> dict:
        rows = self._rows(conn, sql, params)
        if not rows:
            raise UnknownId(missing)
        return rows[0]

    @staticmethod
    def _bump(conn: sqlite3.Connection, by: int = 1) -> int:
        """Advance the watermark by `by` inside the caller's transaction; return the new value."""
        (value,) = conn.execute(
            "UPDATE counters SET value = value + ? WHERE name = 'watermark' RETURNING value", (by,)
        ).fetchone()
        return value

    # --- validation -------------------------------------------------------------------------------

    @staticmethod
    def _id(value, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(f"The {what} id must be a non-empty string, not {value!r}.")
        return value.strip()

    def _reason(self, reason) -> str:
        reason = "" if reason is None else reason
        if not isinstance(reason, str):
            raise InvalidInput("The reason must be text.")
        if len(reason) > self.max_reason_chars:
            raise InvalidInput(
                f"The reason is {len(reason)} characters long; at most {self.max_reason_chars} are accepted."
            )
        return reason

    def _content(self, content, what: str = "message") -> str:
        if not isinstance(content, str):
            raise InvalidInput(f"The {what} must be text.")
        if len(content) > self.max_content_chars:
            raise InvalidInput(
                f"The {what} is {len(content)} characters long; the store accepts at most {self.max_content_chars}."
            )
        return content

    @staticmethod
    def _voter(voter) -> str:
        if not isinstance(voter, str) or not voter:
            raise InvalidInput("A vote needs a voter id (a non-empty string).")
        return voter

    # --- conversations and messages -----------------------------------------------------------

    def new_conversation(self, session_id: str, *, system_prompt: str = "", origin: str = "live") -> str:
        """Start a conversation owned by `session_id`; return its id."""
        if not isinstance(session_id, str) or not session_id:
            raise InvalidInput("A conversation needs a session id (a non-empty string).")
        system_prompt = self._content(system_prompt or "", "system prompt")
        if not isinstance(origin, str) or not origin:
            raise InvalidInput("The origin must be a non-empty string such as 'live' or 'import'.")
        cid = _new_id()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO conversations (id, session_id, system_prompt, origin, created) VALUES (?, ?, ?, ?, ?)",
                (cid, session_id, system_prompt, origin, _now()),
            )
        return cid

    def conversation(self, conversation_id: str, session_id: str | None = None) -> dict:
        """The conversation row plus its `messages` (oldest first); Forbidden if it belongs to another session."""
        cid = self._id(conversation_id, "conversation")
        with self._read() as conn:
            row = self._one(
                conn,
                "SELECT * FROM conversations WHERE id = ?",
                (cid,),
                f"No conversation with id '{cid}' exists.",
            )
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
        if role not in ROLES:
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
            self._one(
                conn, "SELECT id FROM conversations WHERE id = ?", (cid,), f"No conversation with id '{cid}' exists."
            )
            if parent_id is not None:
                pid = self._id(parent_id, "parent message")
                parent = self._one(
                    conn,
                    "SELECT conversation_id FROM messages WHERE id = ?",
                    (pid,),
                    f"No message with id '{pid}' exists.",
                )
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
            row = self._one(conn, "SELECT * FROM messages WHERE id = ?", (mid,), f"No message with id '{mid}' exists.")
        return self._decode_message(row)

    def context(self, message_id: str) -> list[dict]:
        """[{role, content}] the model saw before `message_id`: system prompt (if non-empty), then the parent chain."""
        mid = self._id(message_id, "message")
        with self._read() as conn:
            row = self._one(
                conn, "SELECT conversation_id FROM messages WHERE id = ?", (mid,), f"No message with id '{mid}' exists."
            )
            return _Tree(conn, [row["conversation_id"]]).context(mid)

    # --- thumbs -----------------------------------------------------------------------------------

    def record_feedback(
        self, response_id: str, voter: str, value: str, reason: str = "", *, session_id: str | None = None
    ) -> dict:
        """Set `voter`'s thumb on an answer to up/down/clear (one row per answer and voter, updated in place)."""
        rid = self._id(response_id, "answer")
        voter = self._voter(voter)
        if value not in VOTE_VALUES:
            raise InvalidInput(f"A vote is 'up', 'down' or 'clear', not {value!r}.")
        stored = VOTE_VALUES[value]
        reason = self._reason(reason)
        with self._write() as conn:
            msg = self._one(
                conn,
                "SELECT m.role, c.session_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                " WHERE m.id = ?",
                (rid,),
                f"No answer with id '{rid}' exists.",
            )
            if msg["role"] != "assistant":
                raise InvalidInput("Only answers can be voted on; this message was written by the user.")
            if session_id is not None and msg["session_id"] != session_id:
                raise Forbidden("This answer belongs to another session's conversation.")
            seq, now = self._bump(conn), _now()
            conn.execute(
                "INSERT INTO feedback (response_id, voter, value, reason, seq, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (response_id, voter) DO UPDATE SET"
                " value = excluded.value, reason = excluded.reason, seq = excluded.seq, updated = excluded.updated",
                (rid, voter, stored, reason, seq, now, now),
            )
            conn.execute(
                "INSERT INTO feedback_events (response_id, voter, value, reason, seq, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (rid, voter, stored, reason, seq, now),
            )
            return self._rows(conn, "SELECT * FROM feedback WHERE response_id = ? AND voter = ?", (rid, voter))[0]

    def feedback_value(self, response_id: str, voter: str) -> str | None:
        """'up', 'down', or None (never voted, or cleared)."""
        row = (
            self.db()
            .conn.execute("SELECT value FROM feedback WHERE response_id = ? AND voter = ?", (response_id, voter))
            .fetchone()
        )
        return row[0] if row and row[0] != "cleared" else None

    def feedback_history(self, response_id: str, voter: str | None = None) -> list[dict]:
        """Every thumb write on an answer (oldest first), optionally of one voter."""
        sql = "SELECT * FROM feedback_events WHERE response_id = ?"
        params: list = [response_id]
        if voter is not None:
            sql, params = sql + " AND voter = ?", [*params, voter]
        with self._read() as conn:
            return self._rows(conn, sql + " ORDER BY seq", params)

    # --- A/B comparisons --------------------------------------------------------------------------

    def new_comparison(
        self,
        conversation_id: str,
        a_id: str,
        b_id: str,
        *,
        a_source: str,
        b_source: str,
        voter: str,
        origin: str = "live",
    ) -> str:
        """Record that `voter` is shown answers A and B (siblings in one conversation); return the pair id."""
        cid = self._id(conversation_id, "conversation")
        a_id, b_id = self._id(a_id, "answer A"), self._id(b_id, "answer B")
        voter = self._voter(voter)
        if a_id == b_id:
            raise InvalidInput("A comparison needs two different answers.")
        if not isinstance(a_source, str) or not isinstance(b_source, str):
            raise InvalidInput("a_source and b_source must be strings (e.g. adapter versions).")
        pid = _new_id()
        with self._write() as conn:
            self._one(
                conn, "SELECT id FROM conversations WHERE id = ?", (cid,), f"No conversation with id '{cid}' exists."
            )
            parents = set()
            for mid in (a_id, b_id):
                row = self._one(
                    conn,
                    "SELECT conversation_id, parent_id, role FROM messages WHERE id = ?",
                    (mid,),
                    f"No answer with id '{mid}' exists.",
                )
                if row["role"] != "assistant" or row["conversation_id"] != cid:
                    raise InvalidInput(f"Message '{mid}' is not an answer in conversation '{cid}'.")
                parents.add(row["parent_id"])
            if len(parents) != 1:
                raise InvalidInput("The two answers of a comparison must reply to the same message.")
            conn.execute(
                "INSERT INTO comparisons (id, conversation_id, a_id, b_id, a_source, b_source, voter, origin, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pid, cid, a_id, b_id, a_source, b_source, voter, origin, _now()),
            )
        return pid

    def comparison(self, pair_id: str) -> dict:
        """One comparison row."""
        pid = self._id(pair_id, "comparison")
        with self._read() as conn:
            return self._one(
                conn, "SELECT * FROM comparisons WHERE id = ?", (pid,), f"No comparison with id '{pid}' exists."
            )

    def choose(self, pair_id: str, voter: str, choice: str, reason: str = "") -> dict:
        """Record the choice A, B, tie or both_bad; the pair then locks (AlreadyVoted on a second vote)."""
        pid = self._id(pair_id, "comparison")
        voter = self._voter(voter)
        if choice not in CHOICES:
            raise InvalidInput(f"The choice is one of {', '.join(CHOICES)}, not {choice!r}.")
        reason = self._reason(reason)
        with self._write() as conn:
            row = self._one(
                conn, "SELECT * FROM comparisons WHERE id = ?", (pid,), f"No comparison with id '{pid}' exists."
            )
            if row["voter"] != voter:
                raise Forbidden("This comparison was shown to another session.")
            if row["choice"] is not None:
                raise AlreadyVoted(f"This comparison already has its answer ({row['choice']}); it cannot change.")
            seq = self._bump(conn)
            conn.execute(
                "UPDATE comparisons SET choice = ?, reason = ?, seq = ?, chosen_at = ? WHERE id = ?",
                (choice, reason, seq, _now(), pid),
            )
            return self._rows(conn, "SELECT * FROM comparisons WHERE id = ?", (pid,))[0]

    # --- training rows after a watermark ----------------------------------------------------------

    def watermark(self) -> int:
        """Increases with every thumb write and every choice: train on what came after the last round's value."""
        return self.db().conn.execute("SELECT value FROM counters WHERE name = 'watermark'").fetchone()[0]

    def _comparison_rows(self, conn: sqlite3.Connection, choices: tuple[str, ...], since: int, limit_ids=None):
        marks = ",".join("?" * len(choices))
        rows = self._rows(
            conn,
            "SELECT c.id, c.conversation_id, c.a_id, c.b_id, c.choice, c.seq, c.origin, c.a_source, c.b_source,"
            " a.content AS a_text, b.content AS b_text FROM comparisons c"
            " JOIN messages a ON a.id = c.a_id JOIN messages b ON b.id = c.b_id"
            f" WHERE c.choice IN ({marks}) AND c.seq > ? ORDER BY c.seq",
            (*choices, since),
        )
        return rows

    def _tree_for(self, conn: sqlite3.Connection, rows: list[dict], everything: bool) -> _Tree:
        return _Tree(conn, None if everything else [r["conversation_id"] for r in rows])

    def preference_pairs(self, since: int = 0) -> list[dict]:
        """A/B choices (A or B) after `since`: {prompt, chosen, rejected, conversation_id, comparison_id, seq, ...}."""
        with self._read() as conn:
            rows = self._comparison_rows(conn, ("A", "B"), since)
            tree = self._tree_for(conn, rows, since <= 0)
        out = []
        for r in rows:
            a_wins = r["choice"] == "A"
            out.append(
                {
                    "prompt": tree.context(r["a_id"]),
                    "chosen": r["a_text"] if a_wins else r["b_text"],
                    "rejected": r["b_text"] if a_wins else r["a_text"],
                    "conversation_id": r["conversation_id"],
                    "comparison_id": r["id"],
                    "seq": r["seq"],
                    "origin": r["origin"],
                    "chosen_source": r["a_source"] if a_wins else r["b_source"],
                    "rejected_source": r["b_source"] if a_wins else r["a_source"],
                }
            )
        return out

    def ties(self, since: int = 0) -> list[dict]:
        """Tie choices after watermark `since`: {prompt, a, b, conversation_id, comparison_id, seq}."""
        with self._read() as conn:
            rows = self._comparison_rows(conn, ("tie",), since)
            tree = self._tree_for(conn, rows, since <= 0)
        return [
            {
                "prompt": tree.context(r["a_id"]),
                "a": r["a_text"],
                "b": r["b_text"],
                "conversation_id": r["conversation_id"],
                "comparison_id": r["id"],
                "seq": r["seq"],
                "origin": r["origin"],
            }
            for r in rows
        ]

    def version_battles(self) -> list[dict]:
        """A/B/tie choices between two different sources, not imported: {comparison_id, a_source, b_source, choice}."""
        with self._read() as conn:
            return self._rows(
                conn,
                "SELECT id AS comparison_id, a_source, b_source, choice, seq, chosen_at FROM comparisons"
                " WHERE choice IN ('A', 'B', 'tie') AND a_source != b_source AND origin != 'import' ORDER BY seq",
            )

    def pointwise_labels(self, since: int = 0) -> list[dict]:
        """Thumbs (final non-cleared value per answer and voter) and both_bad as two thumbs-down, after `since`.

        Rows: {prompt, completion, label, conversation_id, response_id, seq}. A thumb changed after `since` comes
        back with its new value; one cleared after `since` does not come back (its old label is simply stale).
        """
        with self._read() as conn:
            thumbs = self._rows(
                conn,
                "SELECT f.response_id, f.value, f.seq, m.content, m.conversation_id FROM feedback f"
                " JOIN messages m ON m.id = f.response_id WHERE f.value != 'cleared' AND f.seq > ? ORDER BY f.seq",
                (since,),
            )
            both_bad = self._comparison_rows(conn, ("both_bad",), since)
            tree = _Tree(
                conn,
                None if since <= 0 else [r["conversation_id"] for r in thumbs + both_bad],
            )
        out = [
            {
                "prompt": tree.context(t["response_id"]),
                "completion": t["content"],
                "label": t["value"] == "up",
                "conversation_id": t["conversation_id"],
                "response_id": t["response_id"],
                "seq": t["seq"],
            }
            for t in thumbs
        ]
        for r in both_bad:
            for mid, text in ((r["a_id"], r["a_text"]), (r["b_id"], r["b_text"])):
                out.append(
                    {
                        "prompt": tree.context(mid),
                        "completion": text,
                        "label": False,
                        "conversation_id": r["conversation_id"],
                        "response_id": mid,
                        "seq": r["seq"],
                    }
                )
        out.sort(key=lambda row: row["seq"])
        return out

    def prompts(self, limit: int = 200) -> list[list[dict]]:
        """Up to `limit` recent distinct contexts that end with a user turn (newest first), for PPO rollouts."""
        if not isinstance(limit, int) or limit < 1:
            raise InvalidInput("limit must be a positive integer.")
        out: list[list[dict]] = []
        seen: set[str] = set()
        conn = self.db().conn
        with self._read():
            # Walk user turns newest first in batches until `limit` distinct contexts are found.
            offset, batch = 0, max(limit * 2, 100)
            while len(out) < limit:
                rows = conn.execute(
                    "SELECT id, conversation_id FROM messages WHERE role = 'user' ORDER BY rowid DESC LIMIT ? OFFSET ?",
                    (batch, offset),
                ).fetchall()
                if not rows:
                    break
                offset += len(rows)
                tree = _Tree(conn, [conv for _, conv in rows])
                for mid, _ in rows:
                    messages = [*tree.context(mid), dict(tree.path(mid)[-1])]
                    key = json.dumps(messages, ensure_ascii=False)
                    if key not in seen:
                        seen.add(key)
                        out.append(messages)
                        if len(out) == limit:
                            break
        return out

    # --- adapters and training runs ---------------------------------------------------------------

    def add_adapter(
        self, version: str, path: str, *, parent: str | None = None, status: str = "candidate", metrics=None
    ) -> None:
        """Register an adapter version (published on disk at `path`); status 'live' retires the previous live one."""
        version = self._id(version, "adapter version")
        if status not in ADAPTER_STATUSES:
            raise InvalidInput(f"An adapter's status is one of {', '.join(ADAPTER_STATUSES)}, not {status!r}.")
        metrics_json = self._metrics(metrics)
        now = _now()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM adapters WHERE version = ?", (version,)).fetchone():
                raise InvalidInput(f"Adapter version '{version}' already exists.")
            if status == "live":
                conn.execute("UPDATE adapters SET status = 'retired', updated = ? WHERE status = 'live'", (now,))
            conn.execute(
                "INSERT INTO adapters (version, path, parent, status, metrics, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (version, str(path), parent, status, metrics_json, now, now),
            )

    @staticmethod
    def _metrics(metrics) -> str:
        if metrics is None:
            return "{}"
        if not isinstance(metrics, dict):
            raise InvalidInput("Metrics must be a dict.")
        try:
            return json.dumps(metrics, sort_keys=True)
        except (TypeError, ValueError):
            raise InvalidInput("Metrics must be JSON-serialisable.") from None

    def set_adapter_status(self, version: str, status: str) -> None:
        """Change a version's status; making one live retires the previous live version in the same transaction."""
        version = self._id(version, "adapter version")
        if status not in ADAPTER_STATUSES:
            raise InvalidInput(f"An adapter's status is one of {', '.join(ADAPTER_STATUSES)}, not {status!r}.")
        now = _now()
        with self._write() as conn:
            self._one(
                conn,
                "SELECT version FROM adapters WHERE version = ?",
                (version,),
                f"No adapter version '{version}' exists.",
            )
            if status == "live":
                conn.execute(
                    "UPDATE adapters SET status = 'retired', updated = ? WHERE status = 'live' AND version != ?",
                    (now, version),
                )
            conn.execute("UPDATE adapters SET status = ?, updated = ? WHERE version = ?", (status, now, version))

    def set_adapter_metrics(self, version: str, metrics: dict) -> None:
        """Merge `metrics` into a version's metrics (e.g. win-rates measured after publishing)."""
        with self._write() as conn:
            row = self._one(
                conn,
                "SELECT metrics FROM adapters WHERE version = ?",
                (version,),
                f"No adapter version '{version}' exists.",
            )
            merged = {**_loads(row["metrics"]), **(metrics or {})}
            conn.execute(
                "UPDATE adapters SET metrics = ?, updated = ? WHERE version = ?",
                (self._metrics(merged), _now(), version),
            )

    @staticmethod
    def _decode_adapter(row: dict) -> dict:
        row["metrics"] = _loads(row["metrics"])
        return row

    def adapters(self) -> list[dict]:
        """Every adapter version, oldest first (metrics decoded)."""
        with self._read() as conn:
            rows = self._rows(conn, "SELECT * FROM adapters ORDER BY created, version")
        return [self._decode_adapter(r) for r in rows]

    def adapter(self, version: str) -> dict:
        """One adapter version's row."""
        with self._read() as conn:
            row = self._one(
                conn, "SELECT * FROM adapters WHERE version = ?", (version,), f"No adapter version '{version}' exists."
            )
        return self._decode_adapter(row)

    def live_adapter(self) -> dict | None:
        """The live version's row, or None while the base model (no adapter) serves."""
        with self._read() as conn:
            rows = self._rows(conn, "SELECT * FROM adapters WHERE status = 'live'")
        return self._decode_adapter(rows[0]) if rows else None

    def next_version(self) -> str:
        """The next free version name: 'v0001', 'v0002', ..."""
        versions = [r[0] for r in self.db().conn.execute("SELECT version FROM adapters")]
        numbers = [int(m.group(1)) for v in versions if (m := re.fullmatch(r"v(\d+)", v))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def start_run(self, kind: str) -> int:
        """Record a training run as 'running'; return its id."""
        if not isinstance(kind, str) or not kind:
            raise InvalidInput("A training run needs a kind (e.g. 'reward', 'ppo', 'round').")
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO training_runs (kind, status, started) VALUES (?, 'running', ?)", (kind, _now())
            )
            return cursor.lastrowid

    def finish_run(self, run_id: int, status: str, metrics: dict | None = None, error: str = "") -> None:
        """Close a run with its final status (e.g. 'ok', 'failed', 'cancelled'), metrics and error text."""
        if not isinstance(status, str) or not status:
            raise InvalidInput("A finished run needs a status such as 'ok' or 'failed'.")
        metrics_json = self._metrics(metrics)
        with self._write() as conn:
            self._one(
                conn, "SELECT id FROM training_runs WHERE id = ?", (run_id,), f"No training run {run_id!r} exists."
            )
            conn.execute(
                "UPDATE training_runs SET status = ?, finished = ?, metrics = ?, error = ? WHERE id = ?",
                (status, _now(), metrics_json, error or "", run_id),
            )

    def runs(self, limit: int = 20) -> list[dict]:
        """The latest training runs, newest first (metrics decoded)."""
        with self._read() as conn:
            rows = self._rows(conn, "SELECT * FROM training_runs ORDER BY id DESC LIMIT ?", (limit,))
        for r in rows:
            r["metrics"] = _loads(r["metrics"])
        return rows

    # --- secrets --------------------------------------------------------------------------------------

    def voter_salt(self) -> str:
        """A random salt for `voter_id`, created once and kept in the DB (so ids stay stable across restarts)."""
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'voter_salt'").fetchone()
            if row:
                return row[0]
            salt = secrets.token_hex(16)
            conn.execute("INSERT INTO meta (key, value) VALUES ('voter_salt', ?)", (salt,))
            return salt

    # --- export / import ----------------------------------------------------------------------------

    def _export_rows(self, fmt: str) -> Iterator[dict]:
        def answer(text: str) -> list[dict]:
            return [{"role": "assistant", "content": text}]

        if fmt == "preference":
            for p in self.preference_pairs(0):
                yield {"prompt": p["prompt"], "chosen": answer(p["chosen"]), "rejected": answer(p["rejected"])}
        elif fmt == "kto":
            # KTO learns from unpaired labels: thumbs and both_bad, plus each A/B choice split into a desirable
            # and an undesirable row (what TRL's unpair_preference_dataset does). Ties carry no label.
            for p in self.pointwise_labels(0):
                yield {"prompt": p["prompt"], "completion": answer(p["completion"]), "label": p["label"]}
            for p in self.preference_pairs(0):
                yield {"prompt": p["prompt"], "completion": answer(p["chosen"]), "label": True}
                yield {"prompt": p["prompt"], "completion": answer(p["rejected"]), "label": False}
        elif fmt == "conversations":
            # Every root-to-leaf path is one conversation: retries and A/B answers each end their own branch.
            with self._read() as conn:
                tree = _Tree(conn, None)
                leaves = conn.execute(
                    "SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM messages c WHERE c.parent_id = m.id)"
                    " ORDER BY m.rowid"
                ).fetchall()
            for (mid,) in leaves:
                yield {"messages": [*tree.context(mid), dict(tree.path(mid)[-1])]}
        else:
            raise InvalidInput(f"The export format is one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}.")

    def export(self, fmt: str, out: str | Path) -> int:
        """Write `fmt` rows as JSON lines (gzip if `out` ends in .gz) atomically; return the number of rows."""
        if fmt not in EXPORT_FORMATS:
            raise InvalidInput(f"The export format is one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}.")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Temp file in the same folder + rename: readers see the old file or the whole new one, never half.
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        count = 0
        try:
            with os.fdopen(fd, "wb") as raw:
                fh = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if out.suffix == ".gz" else raw
                for row in self._export_rows(fmt):
                    fh.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
                    count += 1
                if fh is not raw:
                    fh.close()
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return count

    def import_pairs(self, path: str | Path) -> dict:
        """Import preference pairs (TRL or Anthropic HH .jsonl/.jsonl.gz) as chosen A/B comparisons, all or nothing.

        All or nothing: the whole file is parsed before anything is written, then written in one transaction; a
        malformed line raises InvalidInput naming its line number and imports nothing (so a fixed file can simply be
        imported again, without duplicates from a half-done first attempt). Pairs whose two answers are identical
        carry no preference: they are skipped and counted. Each pair becomes a conversation (origin 'import') with
        the prompt turns, two assistant answers and a comparison with choice A (A = chosen).
        """
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"No file named '{path}' exists.")
        pairs, skipped = [], 0
        try:
            for pair in read_pairs(path):
                if pair.chosen == pair.rejected:
                    skipped += 1
                    continue
                for text in (*(m["content"] for m in pair.prompt), pair.chosen, pair.rejected):
                    if not isinstance(text, str) or len(text) > self.max_content_chars:
                        raise FormatError(
                            path, pair.line, f"a message is not text or longer than {self.max_content_chars} characters"
                        )
                if any(m["role"] not in ROLES for m in pair.prompt):
                    raise FormatError(path, pair.line, f"a role is not one of {', '.join(ROLES)}")
                pairs.append(pair)
        except FormatError as exc:
            raise InvalidInput(
                f"{exc.path}, line {exc.line}: {exc.reason}. Nothing was imported.", line=exc.line
            ) from None
        except (OSError, UnicodeDecodeError, EOFError) as exc:
            raise InvalidInput(f"{path} could not be read ({exc}). Nothing was imported.") from None

        now, name = _now(), path.name
        conversations, messages, comparisons = [], [], []
        for pair in pairs:
            cid, parent = _new_id(), None
            conversations.append((cid, IMPORT_VOTER, "", "import", f"{name}:{pair.line}", now))
            for m in pair.prompt:
                mid = _new_id()
                messages.append((mid, cid, parent, m["role"], m["content"], now))
                parent = mid
            a_id, b_id = _new_id(), _new_id()
            messages.append((a_id, cid, parent, "assistant", pair.chosen, now))
            messages.append((b_id, cid, parent, "assistant", pair.rejected, now))
            comparisons.append([_new_id(), cid, a_id, b_id, "import", "import", IMPORT_VOTER, "A", "import", now, now])
        with self._write() as conn:
            first = self._bump(conn, len(comparisons)) - len(comparisons) + 1
            for offset, row in enumerate(comparisons):
                row.append(first + offset)
            conn.executemany(
                "INSERT INTO conversations (id, session_id, system_prompt, origin, source, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                conversations,
            )
            conn.executemany(
                "INSERT INTO messages (id, conversation_id, parent_id, role, content, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                messages,
            )
            conn.executemany(
                "INSERT INTO comparisons (id, conversation_id, a_id, b_id, a_source, b_source, voter, choice, origin,"
                " created, chosen_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                comparisons,
            )
        return {"imported": len(pairs), "skipped_identical": skipped, "file": str(path)}

    # --- overview -------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counts per table, thumbs by value, choices by kind, origins, live version, watermark, last runs."""
        with self._read() as conn:
            counts = {
                table: conn.execute(f"SELECT count(*) FROM [{table}]").fetchone()[0]
                for table in ("conversations", "messages", "feedback", "comparisons", "adapters", "training_runs")
            }
            votes = {"up": 0, "down": 0, "cleared": 0}
            votes.update(conn.execute("SELECT value, count(*) FROM feedback GROUP BY value").fetchall())
            choices = {c: 0 for c in (*CHOICES, "pending")}
            for choice, n in conn.execute("SELECT coalesce(choice, 'pending'), count(*) FROM comparisons GROUP BY 1"):
                choices[choice] = n
            origins = dict(conn.execute("SELECT origin, count(*) FROM comparisons GROUP BY origin").fetchall())
            live = conn.execute("SELECT version FROM adapters WHERE status = 'live'").fetchone()
        return {
            "counts": counts,
            "votes": votes,
            "choices": choices,
            "comparison_origins": origins,
            "live_version": live[0] if live else None,
            "watermark": self.watermark(),
            "last_runs": self.runs(5),
        }
