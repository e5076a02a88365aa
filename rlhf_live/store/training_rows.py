"""Training rows after a watermark: A/B pairs, ties, thumbs as labels, version battles, prompts.

Knows how votes and the message tree become rows a reward model, PPO, DPO or KTO can use; knows nothing of
tensors, tokens or how the rows are used.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

from rlhf_live.store.base import Database, InvalidInput
from rlhf_live.store.conversations import MessageTree
from rlhf_live.store.rows import PairRow, ThumbRow, TieRow


class TrainingRows(Database):
    """Rows for training, each with the watermark `seq` of the vote it came from."""

    def watermark(self) -> int:
        """Increases with every thumb write and every choice: train on what came after the last round's value."""
        return self.db().conn.execute("SELECT value FROM counters WHERE name = 'watermark'").fetchone()[0]

    def votes_between(self, after: int, upto: int, voter: str | None = None) -> int:
        """Votes with watermark in (after, upto] (a round's training rows), of everyone or of one voter.

        Standing thumbs (not cleared) and chosen comparisons, each counted once.
        """
        mine, params = (" AND voter = ?", (voter,)) if voter is not None else ("", ())
        with self._read() as conn:
            thumbs = conn.execute(
                f"SELECT count(*) FROM feedback WHERE value != 'cleared' AND seq > ? AND seq <= ?{mine}",
                (after, upto, *params),
            ).fetchone()[0]
            choices = conn.execute(
                f"SELECT count(*) FROM comparisons WHERE choice IS NOT NULL AND seq > ? AND seq <= ?{mine}",
                (after, upto, *params),
            ).fetchone()[0]
        return thumbs + choices

    def sources_between(self, after: int, upto: int) -> int:
        """Distinct known sources of the votes with watermark in (after, upto], not counting flagged or banned ones."""
        with self._read() as conn:
            return conn.execute(
                "SELECT count(DISTINCT source) FROM (SELECT source FROM feedback WHERE value != 'cleared'"
                " AND seq > ? AND seq <= ? UNION ALL SELECT source FROM comparisons WHERE choice IS NOT NULL"
                " AND seq > ? AND seq <= ?) WHERE source != ''"
                " AND source NOT IN (SELECT source FROM sources WHERE status IN ('flagged', 'banned'))",
                (after, upto, after, upto),
            ).fetchone()[0]

    def votes_by_source(self) -> dict[str, int]:
        """Standing thumbs and choices per known source, over all time."""
        with self._read() as conn:
            return dict(
                conn.execute(
                    "SELECT source, count(*) FROM (SELECT source FROM feedback WHERE value != 'cleared' UNION ALL"
                    " SELECT source FROM comparisons WHERE choice IS NOT NULL) WHERE source != '' GROUP BY source"
                ).fetchall()
            )

    def _comparison_rows(self, conn: sqlite3.Connection, choices: tuple[str, ...], since: int, limit_ids=None):
        marks = ",".join("?" * len(choices))
        rows = self._rows(
            conn,
            "SELECT c.id, c.conversation_id, c.a_id, c.b_id, c.choice, c.seq, c.origin, c.a_source, c.b_source,"
            " c.source AS voter_source,"
            " a.content AS a_text, b.content AS b_text FROM comparisons c"
            " JOIN messages a ON a.id = c.a_id JOIN messages b ON b.id = c.b_id"
            f" WHERE c.choice IN ({marks}) AND c.seq > ? ORDER BY c.seq",
            (*choices, since),
        )
        return rows

    def _tree_for(self, conn: sqlite3.Connection, rows: list[dict], everything: bool) -> MessageTree:
        return MessageTree(conn, None if everything else [r["conversation_id"] for r in rows])

    def preference_pairs(self, since: int = 0) -> list[PairRow]:
        """A/B choices after watermark `since`, oldest first."""
        with self._read() as conn:
            rows = self._comparison_rows(conn, ("A", "B"), since)
            tree = self._tree_for(conn, rows, since <= 0)
        out = []
        for r in rows:
            a_wins = r["choice"] == "A"
            out.append(
                PairRow(
                    prompt=tree.context(r["a_id"]),
                    chosen=r["a_text"] if a_wins else r["b_text"],
                    rejected=r["b_text"] if a_wins else r["a_text"],
                    conversation_id=r["conversation_id"],
                    comparison_id=r["id"],
                    seq=r["seq"],
                    origin=r["origin"],
                    chosen_source=r["a_source"] if a_wins else r["b_source"],
                    rejected_source=r["b_source"] if a_wins else r["a_source"],
                    voter_source=r["voter_source"],
                )
            )
        return out

    def ties(self, since: int = 0) -> list[TieRow]:
        """Tie choices after watermark `since`, oldest first."""
        with self._read() as conn:
            rows = self._comparison_rows(conn, ("tie",), since)
            tree = self._tree_for(conn, rows, since <= 0)
        return [
            TieRow(
                prompt=tree.context(r["a_id"]),
                a=r["a_text"],
                b=r["b_text"],
                conversation_id=r["conversation_id"],
                comparison_id=r["id"],
                seq=r["seq"],
                origin=r["origin"],
                voter_source=r["voter_source"],
            )
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

    def pointwise_labels(self, since: int = 0) -> list[ThumbRow]:
        """Thumbs (final non-cleared value per answer and voter) and both_bad as two thumbs-down, after `since`.

        A thumb changed after `since` comes back with its new value; one cleared after `since` does not come back
        (its old label is simply stale).
        """
        with self._read() as conn:
            thumbs = self._rows(
                conn,
                "SELECT f.response_id, f.value, f.seq, f.source, m.content, m.conversation_id FROM feedback f"
                " JOIN messages m ON m.id = f.response_id WHERE f.value != 'cleared' AND f.seq > ? ORDER BY f.seq",
                (since,),
            )
            both_bad = self._comparison_rows(conn, ("both_bad",), since)
            tree = MessageTree(
                conn,
                None if since <= 0 else [r["conversation_id"] for r in thumbs + both_bad],
            )
        out = [
            ThumbRow(
                prompt=tree.context(t["response_id"]),
                completion=t["content"],
                label=t["value"] == "up",
                conversation_id=t["conversation_id"],
                response_id=t["response_id"],
                seq=t["seq"],
                voter_source=t["source"],
            )
            for t in thumbs
        ]
        for r in both_bad:
            for mid, text in ((r["a_id"], r["a_text"]), (r["b_id"], r["b_text"])):
                out.append(
                    ThumbRow(
                        prompt=tree.context(mid),
                        completion=text,
                        label=False,
                        conversation_id=r["conversation_id"],
                        response_id=mid,
                        seq=r["seq"],
                        voter_source=r["voter_source"],
                    )
                )
        out.sort(key=lambda row: row.seq)
        return out

    def prompts(self, limit: int = 200) -> list[list[dict]]:
        """Up to `limit` recent distinct contexts that end with a user turn (newest first), for PPO rollouts."""
        return [messages for _, messages in self.asked(limit)]

    def asked(self, limit: int = 200, per_asker: int | None = None) -> list[tuple[str, list[dict]]]:
        """(asker, context) of up to `limit` recent distinct prompts, none past `per_asker` from one known asker."""
        if not isinstance(limit, int) or limit < 1:
            raise InvalidInput("limit must be a positive integer.")
        out: list[tuple[str, list[dict]]] = []
        seen: set[str] = set()
        taken: Counter[str] = Counter()
        conn = self.db().conn
        with self._read():
            # Walk user turns newest first in batches until `limit` distinct contexts are found.
            offset, batch = 0, max(limit * 2, 100)
            while len(out) < limit:
                rows = conn.execute(
                    "SELECT m.id, m.conversation_id, c.asker FROM messages m JOIN conversations c"
                    " ON c.id = m.conversation_id WHERE m.role = 'user' ORDER BY m.rowid DESC LIMIT ? OFFSET ?",
                    (batch, offset),
                ).fetchall()
                if not rows:
                    break
                offset += len(rows)
                tree = MessageTree(conn, [conv for _, conv, _ in rows])
                for mid, _, asker in rows:
                    if per_asker is not None and asker and taken[asker] >= per_asker:
                        continue  # one source's prompts cannot fill the pool (crowd-safe learning)
                    messages = [*tree.context(mid), dict(tree.path(mid)[-1])]
                    key = json.dumps(messages, ensure_ascii=False)
                    if key not in seen:
                        seen.add(key)
                        taken[asker] += 1
                        out.append((asker, messages))
                        if len(out) == limit:
                            break
        return out
