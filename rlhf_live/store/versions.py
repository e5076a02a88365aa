"""Adapter versions and training runs: which version is live, its parent and metrics; every round's outcome.

Knows the `adapters` and `training_runs` tables and the status rules (one live version at a time); knows nothing of
the adapter files on disk (adapters.py) or of training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from rlhf_live.store.base import ADAPTER_STATUSES, Database, InvalidInput, _loads, _now


class Versions(Database):
    """Adapter versions and training runs."""

    def add_adapter(
        self, version: str, path: str, *, parent: str | None = None, status: str = "candidate", metrics=None
    ) -> None:
        """Register an adapter version (published on disk at `path`); status 'live' retires the previous live one."""
        version = self._id(version, "adapter version")
        if not isinstance(status, str) or status not in ADAPTER_STATUSES:
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
        if not isinstance(status, str) or status not in ADAPTER_STATUSES:
            raise InvalidInput(f"An adapter's status is one of {', '.join(ADAPTER_STATUSES)}, not {status!r}.")
        now = _now()
        with self._write() as conn:
            self._get(conn, "adapters", version, "adapter version", key="version", columns="version")
            if status == "live":
                conn.execute(
                    "UPDATE adapters SET status = 'retired', updated = ? WHERE status = 'live' AND version != ?",
                    (now, version),
                )
            conn.execute("UPDATE adapters SET status = ?, updated = ? WHERE version = ?", (status, now, version))

    def set_adapter_path(self, version: str, path: str) -> None:
        """Where a version's folder is now (a data dir restored on another machine or mount)."""
        with self._write() as conn:
            self._get(conn, "adapters", version, "adapter version", key="version", columns="version")
            conn.execute("UPDATE adapters SET path = ?, updated = ? WHERE version = ?", (str(path), _now(), version))

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
            row = self._get(conn, "adapters", version, "adapter version", key="version")
        return self._decode_adapter(row)

    def live_adapter(self) -> dict | None:
        """The live version's row, or None while the base model (no adapter) serves."""
        with self._read() as conn:
            rows = self._rows(conn, "SELECT * FROM adapters WHERE status = 'live'")
        return self._decode_adapter(rows[0]) if rows else None

    def next_version(self, taken: Iterable[str] = ()) -> str:
        """The next free version name ('v0001', 'v0002', ...): after every version in the DB and in `taken`."""
        versions = [r[0] for r in self.db().conn.execute("SELECT version FROM adapters")] + list(taken)
        numbers = [int(m.group(1)) for v in versions if (m := re.fullmatch(r"v(\d+)", v))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def start_run(self, kind: str, owner: str | None = None) -> int:
        """Record a training run as 'running' by `owner` (e.g. 'host:pid'); return its id."""
        if not isinstance(kind, str) or not kind:
            raise InvalidInput("A training run needs a kind (e.g. 'reward', 'ppo', 'round').")
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO training_runs (kind, status, started, owner) VALUES (?, 'running', ?, ?)",
                (kind, _now(), owner),
            )
            return cursor.lastrowid

    def running_runs(self) -> list[dict]:
        """Runs still marked 'running' (a live process's, or a killed one's until recovery marks it)."""
        with self._read() as conn:
            return self._rows(conn, "SELECT id, kind, started, owner FROM training_runs WHERE status = 'running'")

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
