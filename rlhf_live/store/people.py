"""A person's own data: everything one voter wrote or voted, handed out ("download my data") or deleted on request.

Knows which rows belong to a voter (their conversations with every message, thumb and comparison in them, and their
votes anywhere); knows nothing of models. Versions trained before the deletion are not untrained: the caller says so.
"""

from __future__ import annotations

from rlhf_live.store.base import Database, _loads


class People(Database):
    """One voter's data: exported or deleted, each in one transaction."""

    def voter_data(self, voter: str) -> dict:
        """Everything stored about `voter`: their conversations (with messages), thumbs (with reasons and every
        change) and comparisons; never another voter's rows."""
        voter = self._voter(voter)
        with self._read() as conn:
            conversations = self._rows(
                conn,
                "SELECT id, system_prompt, origin, created FROM conversations WHERE session_id = ? ORDER BY rowid",
                (voter,),
            )
            messages = self._rows(
                conn,
                "SELECT m.id, m.conversation_id, m.parent_id, m.role, m.content, m.adapter_version, m.settings,"
                " m.finish_reason, m.n_tokens, m.created FROM messages m JOIN conversations c"
                " ON c.id = m.conversation_id WHERE c.session_id = ? ORDER BY m.rowid",
                (voter,),
            )
            thumbs = self._rows(
                conn,
                "SELECT response_id, value, reason, created, updated FROM feedback WHERE voter = ? ORDER BY seq",
                (voter,),
            )
            changes = self._rows(
                conn,
                "SELECT response_id, value, reason, created FROM feedback_events WHERE voter = ? ORDER BY seq, id",
                (voter,),
            )
            comparisons = self._rows(
                conn,
                "SELECT id, conversation_id, a_id, b_id, a_source, b_source, choice, reason, created, chosen_at"
                " FROM comparisons WHERE voter = ? ORDER BY created, rowid",
                (voter,),
            )
        by_conversation: dict[str, list[dict]] = {c["id"]: [] for c in conversations}
        for m in messages:
            m["settings"] = _loads(m["settings"]) if m["settings"] else None
            by_conversation[m.pop("conversation_id")].append(m)
        return {
            "voter": voter,
            "conversations": [{**c, "messages": by_conversation[c["id"]]} for c in conversations],
            "thumbs": thumbs,
            "thumb_changes": changes,
            "comparisons": comparisons,
        }

    def delete_voter(self, voter: str) -> dict:
        """Remove the voter's conversations (messages, thumbs, comparisons in them) and votes; counts of what went."""
        voter = self._voter(voter)
        mine = "SELECT id FROM conversations WHERE session_id = ?"
        msgs = f"SELECT id FROM messages WHERE conversation_id IN ({mine})"
        with self._write() as conn:
            counts = {
                "conversations": conn.execute("SELECT count(*) FROM conversations WHERE session_id = ?", (voter,)),
                "messages": conn.execute(f"SELECT count(*) FROM ({msgs})", (voter,)),
                "thumbs": conn.execute(
                    f"SELECT count(*) FROM feedback WHERE voter = ? OR response_id IN ({msgs})", (voter, voter)
                ),
                "comparisons": conn.execute(
                    f"SELECT count(*) FROM comparisons WHERE voter = ? OR conversation_id IN ({mine})", (voter, voter)
                ),
            }
            counts = {k: c.fetchone()[0] for k, c in counts.items()}
            for table in ("feedback_events", "feedback"):
                conn.execute(f"DELETE FROM {table} WHERE voter = ? OR response_id IN ({msgs})", (voter, voter))
            conn.execute(f"DELETE FROM comparisons WHERE voter = ? OR conversation_id IN ({mine})", (voter, voter))
            conn.execute(f"DELETE FROM messages WHERE conversation_id IN ({mine})", (voter,))
            conn.execute("DELETE FROM conversations WHERE session_id = ?", (voter,))
        return counts
