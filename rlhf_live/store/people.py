"""A person's own data: everything one voter wrote or voted, deleted on request ("delete my data").

Knows which rows belong to a voter (their conversations with every message, thumb and comparison in them, and their
votes anywhere); knows nothing of models. Versions trained before the deletion are not untrained: the caller says so.
"""

from __future__ import annotations

from .base import Database


class People(Database):
    """Delete one voter's data in one transaction."""

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
