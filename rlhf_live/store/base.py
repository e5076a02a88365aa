"""The store's foundation: one SQLite connection per thread, transactions, validation, errors and voter ids.

Knows SQL connections, not tables' meaning: every concern's module (conversations, votes, training_rows, versions,
transfer) builds on `Database` and writes only through `_write()` (one `BEGIN IMMEDIATE` transaction) and reads through
`_read()` (one snapshot). Knows nothing of models, tokens or Gradio, and never imports torch or gradio.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from rlhf_live.store import migrations

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


def source_id(address: str, username: str | None, salt: str) -> str:
    """Salted, irreversible id of where a vote comes from: the signed-in account, else the network address."""
    basis = "user:" + username if username else "addr:" + (address or "")
    if not salt:
        raise InvalidInput("source_id needs a non-empty salt (see Store.voter_salt()).")
    return "s" + hmac.new(salt.encode(), basis.encode(), hashlib.sha256).hexdigest()[:32]


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


class _Owner:
    """A thread's token: freed with the thread's local data, which closes that thread's connection."""


class Database:
    """Connections (one per thread), transactions and input checks shared by every part of the Store."""

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
        self._all: dict[int, sqlite3.Connection] = {}  # open connections by id: close() closes what is left
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self.db()
        db.enable_wal()  # persistent in the file; must run outside a transaction
        # Migrate under the write lock so two processes opening a new file at once do not both create tables.
        with self._write():
            migrations.apply(db)

    @classmethod
    def from_config(cls, cfg) -> Database:
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
                self._all[id(conn)] = conn
            # Threads come and go (Gradio's workers): the connection closes when its thread's local data goes, so
            # open files stay flat however many threads have made requests.
            self._local.owner = _Owner()
            weakref.finalize(self._local.owner, self._forget, id(conn))
        return db

    def _forget(self, key: int) -> None:
        with self._lock:
            conn = self._all.pop(key, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close every thread's connection (call at shutdown, when no thread uses the store any more)."""
        with self._lock:
            conns, self._all = list(self._all.values()), {}
        for conn in conns:
            conn.close()
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

    def _get(self, conn: sqlite3.Connection, table: str, value, what: str, key: str = "id", columns: str = "*") -> dict:
        """The row of `table` whose `key` is `value`; UnknownId "No {what} '{value}' exists." when there is none."""
        return self._one(
            conn, f"SELECT {columns} FROM {table} WHERE {key} = ?", (value,), f"No {what} '{value}' exists."
        )

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
