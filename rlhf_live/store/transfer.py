"""Import and export in TRL's formats (and Anthropic HH transcripts), and the counts that describe the store.

Knows the file formats' columns (via formats.py), atomic file writes and one-transaction imports; builds on the
training rows for the export; knows nothing of models.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rlhf_live.store.base import CHOICES, EXPORT_FORMATS, IMPORT_VOTER, ROLES, InvalidInput, _new_id, _now
from rlhf_live.store.conversations import MessageTree
from rlhf_live.store.formats import FormatError, read_pairs
from rlhf_live.store.training_rows import TrainingRows
from rlhf_live.store.versions import Versions


class Transfer(TrainingRows, Versions):
    """Export, import and stats."""

    def _export_rows(self, fmt: str) -> Iterator[dict]:
        def answer(text: str) -> list[dict]:
            return [{"role": "assistant", "content": text}]

        if fmt == "preference":
            for p in self.preference_pairs(0):
                yield {"prompt": p.prompt, "chosen": answer(p.chosen), "rejected": answer(p.rejected)}
        elif fmt == "kto":
            # KTO learns from unpaired labels: thumbs and both_bad, plus each A/B choice split into a desirable
            # and an undesirable row (what TRL's unpair_preference_dataset does). Ties carry no label.
            for p in self.pointwise_labels(0):
                yield {"prompt": p.prompt, "completion": answer(p.completion), "label": p.label}
            for p in self.preference_pairs(0):
                yield {"prompt": p.prompt, "completion": answer(p.chosen), "label": True}
                yield {"prompt": p.prompt, "completion": answer(p.rejected), "label": False}
        elif fmt == "conversations":
            # Every root-to-leaf path is one conversation: retries and A/B answers each end their own branch.
            with self._read() as conn:
                tree = MessageTree(conn, None)
                leaves = conn.execute(
                    "SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM messages c WHERE c.parent_id = m.id)"
                    " ORDER BY m.rowid"
                ).fetchall()
            for (mid,) in leaves:
                yield {"messages": [*tree.context(mid), dict(tree.path(mid)[-1])]}
        else:
            raise _unknown_format(fmt)

    def export(self, fmt: str, out: str | Path) -> int:
        """Write `fmt` rows as JSON lines (gzip if `out` ends in .gz) atomically; return the number of rows."""
        if fmt not in EXPORT_FORMATS:
            raise _unknown_format(fmt)
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


def _unknown_format(fmt: str) -> InvalidInput:
    return InvalidInput(f"The export format is one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}.")
