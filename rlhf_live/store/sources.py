"""Sources the trainer flagged or an admin banned or cleared, with the evidence of the last contrarian test.

Knows the `sources` table and how many votes each source cast in a watermark range; knows nothing of how the
evidence is computed (crowd.py) or of who may change a status (the service checks admins).
"""

from __future__ import annotations

from rlhf_live.store.base import Database, InvalidInput, UnknownId, _now

SOURCE_STATUSES = ("flagged", "banned", "cleared")
"""flagged: weight 0 until an admin clears it; banned: weight 0 and its votes refused; cleared: never flagged again."""


class Sources(Database):
    """Flag, ban and clear sources; which sources weigh nothing in training."""

    def source_statuses(self) -> dict[str, str]:
        """{source: status} of every source with one."""
        with self._read() as conn:
            return dict(conn.execute("SELECT source, status FROM sources").fetchall())

    def source_rows(self) -> list[dict]:
        """Every source with a status and its last evidence, flagged first, then by evidence."""
        with self._read() as conn:
            return self._rows(
                conn,
                "SELECT * FROM sources ORDER BY status = 'cleared', status = 'banned', log_odds DESC, source",
            )

    def flag_source(self, source: str, *, votes: int, log_odds: float, agree: float, at_vote: int = 0) -> bool:
        """Flag `source` with its evidence, unless an admin already banned or cleared it; True if newly flagged."""
        source = self._source(source)
        with self._write() as conn:
            row = conn.execute("SELECT status FROM sources WHERE source = ?", (source,)).fetchone()
            if row and row[0] != "flagged":
                return False
            conn.execute(
                "INSERT INTO sources (source, status, votes, log_odds, agree, at_vote, updated, by)"
                " VALUES (?, 'flagged', ?, ?, ?, ?, ?, 'trainer') ON CONFLICT (source) DO UPDATE SET"
                " votes = excluded.votes, log_odds = excluded.log_odds, agree = excluded.agree,"
                " at_vote = excluded.at_vote, updated = excluded.updated",
                (source, int(votes), float(log_odds), float(agree), int(at_vote), _now()),
            )
            return row is None

    def set_source_status(self, source: str, status: str, *, by: str = "admin") -> dict:
        """An admin's decision on a source that voted: ban it, clear it (weighs again, never re-flagged), or flag it."""
        source = self._source(source)
        if status not in SOURCE_STATUSES:
            raise InvalidInput(f"A source's status is one of {', '.join(SOURCE_STATUSES)}, not {status!r}.")
        with self._write() as conn:
            known = conn.execute(
                "SELECT 1 FROM feedback WHERE source = ? UNION SELECT 1 FROM comparisons WHERE source = ?"
                " UNION SELECT 1 FROM sources WHERE source = ? LIMIT 1",
                (source, source, source),
            ).fetchone()
            if not known:
                raise UnknownId(f"No votes came from source '{source}'.")
            conn.execute(
                "INSERT INTO sources (source, status, updated, by) VALUES (?, ?, ?, ?) ON CONFLICT (source)"
                " DO UPDATE SET status = excluded.status, updated = excluded.updated, by = excluded.by",
                (source, status, _now(), str(by)[:200]),
            )
            return self._rows(conn, "SELECT * FROM sources WHERE source = ?", (source,))[0]

    def resolve_source(self, prefix: str) -> str:
        """The one source that voted whose id starts with `prefix` (the Training tab shows 12 characters)."""
        prefix = self._source(prefix)
        with self._read() as conn:
            found = [
                r[0]
                for r in conn.execute(
                    "SELECT source FROM feedback WHERE source LIKE ? || '%' UNION SELECT source FROM comparisons"
                    " WHERE source LIKE ? || '%' UNION SELECT source FROM sources WHERE source LIKE ? || '%' LIMIT 2",
                    (prefix, prefix, prefix),
                )
            ]
        if not found:
            raise UnknownId(f"No votes came from a source starting with '{prefix}'.")
        if len(found) > 1:
            raise InvalidInput(f"More than one source starts with '{prefix}': give more of its id.")
        return found[0]

    @staticmethod
    def _source(source) -> str:
        if not isinstance(source, str) or len(source.strip()) < 6 or len(source) > 200 or "%" in source:
            raise InvalidInput("A source is the id shown in the Training tab's sources table (6 characters or more).")
        return source.strip()
