"""Votes: thumbs on answers (one row per answer and voter, every change kept as an event) and A/B comparisons.

Knows the `feedback`, `feedback_events` and `comparisons` tables, who may vote on what (the session that was shown
the answer or the pair) and that each vote advances the watermark; knows nothing of training.
"""

from __future__ import annotations

from rlhf_live.store.base import CHOICES, VOTE_VALUES, AlreadyVoted, Database, Forbidden, InvalidInput, _new_id, _now

ANSWER_OWNER = (
    "SELECT m.role, c.session_id FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ?"
)


class Votes(Database):
    """Thumbs and A/B comparisons."""

    def record_feedback(
        self,
        response_id: str,
        voter: str,
        value: str,
        reason: str = "",
        *,
        session_id: str | None = None,
        source: str = "",
    ) -> dict:
        """Set `voter`'s thumb on an answer to up/down/clear (one row per answer and voter, updated in place)."""
        rid = self._id(response_id, "answer")
        voter = self._voter(voter)
        if not isinstance(value, str) or value not in VOTE_VALUES:
            raise InvalidInput(f"A vote is 'up', 'down' or 'clear', not {value!r}.")
        stored = VOTE_VALUES[value]
        reason = self._reason(reason)
        with self._write() as conn:
            msg = self._one(conn, ANSWER_OWNER, (rid,), f"No answer with id '{rid}' exists.")
            if msg["role"] != "assistant":
                raise InvalidInput("Only answers can be voted on; this message was written by the user.")
            if session_id is not None and msg["session_id"] != session_id:
                raise Forbidden("This answer belongs to another session's conversation.")
            key = (rid, voter)
            old = self._rows(conn, "SELECT * FROM feedback WHERE response_id = ? AND voter = ?", key)
            before = old[0]["value"] if old else "cleared"
            if before == stored and (not old or old[0]["reason"] == reason):
                # The same thumb again (eight clicks on one answer) is not a new vote: nothing changes.
                return old[0] if old else {"response_id": rid, "voter": voter, "value": stored, "reason": reason}
            # Only a changed thumb is a new vote towards the next round; a new reason alone is kept, not counted.
            seq, now = (self._bump(conn) if before != stored else old[0]["seq"]), _now()
            conn.execute(
                "INSERT INTO feedback (response_id, voter, value, reason, seq, created, updated, source)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (response_id, voter) DO UPDATE SET"
                " value = excluded.value, reason = excluded.reason, seq = excluded.seq, updated = excluded.updated,"
                " source = excluded.source",
                (rid, voter, stored, reason, seq, now, now, source),
            )
            conn.execute(
                "INSERT INTO feedback_events (response_id, voter, value, reason, seq, created, source)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rid, voter, stored, reason, seq, now, source),
            )
            return self._rows(conn, "SELECT * FROM feedback WHERE response_id = ? AND voter = ?", key)[0]

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
            self._get(conn, "conversations", cid, "conversation with id", columns="id")
            parents = set()
            for mid in (a_id, b_id):
                row = self._get(conn, "messages", mid, "answer with id", columns="conversation_id, parent_id, role")
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
            return self._get(conn, "comparisons", pid, "comparison with id")

    def choose(self, pair_id: str, voter: str, choice: str, reason: str = "", *, source: str = "") -> dict:
        """Record the choice A, B, tie or both_bad; the pair then locks (AlreadyVoted on a second vote)."""
        pid = self._id(pair_id, "comparison")
        voter = self._voter(voter)
        if not isinstance(choice, str) or choice not in CHOICES:
            raise InvalidInput(f"The choice is one of {', '.join(CHOICES)}, not {choice!r}.")
        reason = self._reason(reason)
        with self._write() as conn:
            row = self._get(conn, "comparisons", pid, "comparison with id")
            if row["voter"] != voter:
                raise Forbidden("This comparison was shown to another session.")
            if row["choice"] is not None:
                raise AlreadyVoted(f"This comparison already has its answer ({row['choice']}); it cannot change.")
            seq = self._bump(conn)
            conn.execute(
                "UPDATE comparisons SET choice = ?, reason = ?, seq = ?, chosen_at = ?, source = ? WHERE id = ?",
                (choice, reason, seq, _now(), source, pid),
            )
            return self._rows(conn, "SELECT * FROM comparisons WHERE id = ?", (pid,))[0]
