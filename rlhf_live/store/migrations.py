"""Schema of the feedback DB as an append-only list of named sqlite-utils migrations.

Knows table and index definitions and the order they were introduced in; knows nothing of votes, models or tensors.
Never edit or reorder an applied migration: add a new one at the end (databases in the wild have run the old ones).
Each migration runs inside one transaction together with its record in `_sqlite_migrations`.
"""

from __future__ import annotations

import sqlite_utils

migrations = sqlite_utils.Migrations("rlhf_live")

# Column names of every table once all migrations have run (tests compare the real schema against this).
SCHEMA: dict[str, list[str]] = {
    "conversations": ["id", "session_id", "system_prompt", "origin", "source", "created", "asker"],
    "messages": [
        "id",
        "conversation_id",
        "parent_id",
        "role",
        "content",
        "adapter_version",
        "settings",
        "finish_reason",
        "n_tokens",
        "created",
    ],
    "feedback": ["id", "response_id", "voter", "value", "reason", "seq", "created", "updated", "source"],
    "comparisons": [
        "id",
        "conversation_id",
        "a_id",
        "b_id",
        "a_source",
        "b_source",
        "voter",
        "choice",
        "reason",
        "origin",
        "seq",
        "created",
        "chosen_at",
        "source",
    ],
    "adapters": ["version", "path", "parent", "status", "metrics", "created", "updated"],
    "training_runs": ["id", "kind", "status", "started", "finished", "metrics", "error", "owner"],
    "counters": ["name", "value"],
    "feedback_events": ["id", "response_id", "voter", "value", "reason", "seq", "created", "source"],
    "meta": ["key", "value"],
    "sources": ["source", "status", "votes", "log_odds", "agree", "at_vote", "updated", "by"],
}


def _run(db: sqlite_utils.Database, *statements: str) -> None:
    # One execute per statement: executescript() would COMMIT the migration's transaction half-way.
    for sql in statements:
        db.execute(sql)


@migrations(name="0001_initial")
def initial(db: sqlite_utils.Database) -> None:
    """Conversations as message trees, thumbs, A/B comparisons, adapter versions, training runs."""
    _run(
        db,
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            system_prompt TEXT NOT NULL DEFAULT '',
            origin TEXT NOT NULL DEFAULT 'live',       -- live | import | simulate: imported rows are not live votes
            source TEXT NOT NULL DEFAULT '',           -- e.g. 'file.jsonl.gz:17' for imported pairs
            created TEXT NOT NULL
        )""",
        "CREATE INDEX idx_conversations_session ON conversations(session_id)",
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            parent_id TEXT REFERENCES messages(id),    -- NULL: first turn; siblings = retries / A-B answers
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            adapter_version TEXT,                      -- assistant rows: which adapter produced it ('' = base)
            settings TEXT,                             -- assistant rows: generation settings as JSON
            finish_reason TEXT,
            n_tokens INTEGER,
            created TEXT NOT NULL
        )""",
        "CREATE INDEX idx_messages_conversation ON messages(conversation_id)",
        "CREATE INDEX idx_messages_parent ON messages(parent_id)",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            response_id TEXT NOT NULL REFERENCES messages(id),
            voter TEXT NOT NULL,
            value TEXT NOT NULL CHECK (value IN ('up', 'down', 'cleared')),
            reason TEXT NOT NULL DEFAULT '',
            seq INTEGER NOT NULL,                      -- watermark at the last write of this row
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            UNIQUE (response_id, voter)
        )""",
        "CREATE INDEX idx_feedback_seq ON feedback(seq)",
        """CREATE TABLE comparisons (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            a_id TEXT NOT NULL REFERENCES messages(id),
            b_id TEXT NOT NULL REFERENCES messages(id),
            a_source TEXT NOT NULL DEFAULT '',         -- e.g. the adapter version that wrote answer A
            b_source TEXT NOT NULL DEFAULT '',
            voter TEXT NOT NULL,
            choice TEXT CHECK (choice IN ('A', 'B', 'tie', 'both_bad')),  -- NULL until chosen
            reason TEXT NOT NULL DEFAULT '',
            origin TEXT NOT NULL DEFAULT 'live',
            seq INTEGER,                               -- watermark at the choice; NULL until chosen
            created TEXT NOT NULL,
            chosen_at TEXT
        )""",
        "CREATE INDEX idx_comparisons_seq ON comparisons(seq)",
        "CREATE INDEX idx_comparisons_conversation ON comparisons(conversation_id)",
        """CREATE TABLE adapters (
            version TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            parent TEXT,
            status TEXT NOT NULL CHECK (status IN ('candidate', 'live', 'retired', 'rolled_back')),
            metrics TEXT NOT NULL DEFAULT '{}',
            created TEXT NOT NULL,
            updated TEXT NOT NULL
        )""",
        # At most one live version, enforced by SQLite rather than by every caller being careful.
        "CREATE UNIQUE INDEX idx_adapters_one_live ON adapters(status) WHERE status = 'live'",
        """CREATE TABLE training_runs (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            started TEXT NOT NULL,
            finished TEXT,
            metrics TEXT NOT NULL DEFAULT '{}',
            error TEXT NOT NULL DEFAULT ''
        )""",
        # The watermark lives in one row so that feedback and comparisons share one increasing sequence.
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO counters (name, value) VALUES ('watermark', 0)",
    )


@migrations(name="0002_feedback_events_and_meta")
def feedback_events_and_meta(db: sqlite_utils.Database) -> None:
    """History of every thumb write (feedback keeps only the final state) and a key/value table for secrets."""
    _run(
        db,
        """CREATE TABLE feedback_events (
            id INTEGER PRIMARY KEY,
            response_id TEXT NOT NULL REFERENCES messages(id),
            voter TEXT NOT NULL,
            value TEXT NOT NULL CHECK (value IN ('up', 'down', 'cleared')),
            reason TEXT NOT NULL DEFAULT '',
            seq INTEGER NOT NULL,
            created TEXT NOT NULL
        )""",
        "CREATE INDEX idx_feedback_events_response ON feedback_events(response_id, voter)",
        # Existing thumbs become their own first event, so the history is complete from the upgrade on.
        """INSERT INTO feedback_events (response_id, voter, value, reason, seq, created)
           SELECT response_id, voter, value, reason, seq, updated FROM feedback ORDER BY seq""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    )


@migrations(name="0003_training_run_owner")
def training_run_owner(db: sqlite_utils.Database) -> None:
    """Which process (host:pid) runs a training round, so a restart can tell a dead process's run from a live one."""
    _run(db, "ALTER TABLE training_runs ADD COLUMN owner TEXT")


@migrations(name="0004_vote_sources")
def vote_sources(db: sqlite_utils.Database) -> None:
    """Where each vote came from (a salted HMAC of the signed-in account or network address; '' = not known)."""
    # `source` on a vote is the voter's origin for influence budgets, not `a_source`/`b_source` (the adapter
    # versions that wrote the answers) nor `conversations.source` (an import's file and line).
    _run(
        db,
        "ALTER TABLE feedback ADD COLUMN source TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE feedback_events ADD COLUMN source TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE comparisons ADD COLUMN source TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX idx_feedback_source ON feedback(source, seq)",
        "CREATE INDEX idx_comparisons_source ON comparisons(source, seq)",
    )


@migrations(name="0005_source_flags")
def source_flags(db: sqlite_utils.Database) -> None:
    """Sources the contrarian test flagged or an admin banned or cleared, with the evidence of the last test."""
    _run(
        db,
        """CREATE TABLE sources (
            source TEXT PRIMARY KEY,
            status TEXT NOT NULL CHECK (status IN ('flagged', 'banned', 'cleared')),
            votes INTEGER NOT NULL DEFAULT 0,
            log_odds REAL NOT NULL DEFAULT 0,
            agree REAL NOT NULL DEFAULT 0.5,
            at_vote INTEGER NOT NULL DEFAULT 0,
            updated TEXT NOT NULL,
            by TEXT NOT NULL DEFAULT ''
        )""",
    )


@migrations(name="0006_conversation_asker")
def conversation_asker(db: sqlite_utils.Database) -> None:
    """Who started each conversation, as a vote's source ('' = not known): PPO's prompt pool is shared out by it."""
    _run(db, "ALTER TABLE conversations ADD COLUMN asker TEXT NOT NULL DEFAULT ''")


def apply(db: sqlite_utils.Database, *, stop_before: str | None = None) -> list[str]:
    """Apply pending migrations (all, or those before `stop_before`); return the names applied."""
    before = {m.name for m in migrations.applied(db)}
    migrations.apply(db, stop_before=stop_before)
    return [m.name for m in migrations.applied(db) if m.name not in before]
