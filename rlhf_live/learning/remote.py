"""A running app as the trainer's store, over HTTP: the trainer on another machine reads its rows from the app's
trainer feed and hands each version back through it (api/trainer.py is the other side).

Knows the feed's routes, paging and retries, and which store methods a round calls; keeps nothing but a cache of
downloaded adapter folders. Knows nothing of tensors or Gradio: the round runs as it does on one machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from rlhf_live.store.rows import PairRow, ThumbRow, TieRow

PATIENCE_S = 300.0
"""How long one request is retried (a dropped connection, an app restarting) before the round fails."""
PAGE = 1000


class FeedError(RuntimeError):
    """The app refused a request or could not be reached; the message says which and why."""


class RemoteStore:
    """The store methods a round and `train --watch` call, answered by a running app (its admin token)."""

    def __init__(self, url: str, token: str, cache_dir: str | Path, owner: str = "remote"):
        if not token:
            raise FeedError("Following an app needs its admin token (--admin-token or RLHF_LIVE_ADMIN_TOKEN).")
        self.url, self.token, self.owner = url.rstrip("/") + "/trainer", token, owner
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self._state: dict | None = None

    # --- HTTP ------------------------------------------------------------------------------------------------
    def _call(
        self, method: str, path: str, body: bytes | dict | None = None, raw: bool = False, patience_s: float = -1.0
    ):
        """One request, retried on a dropped connection or a 5xx for `patience_s`; a refusal (4xx) raises at once."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        kind = "application/json" if isinstance(body, dict) else "application/gzip"
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": kind}
        deadline = time.monotonic() + (PATIENCE_S if patience_s < 0 else patience_s)
        attempt = 0
        while True:
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    out = resp.read()
                return out if raw else json.loads(out or b"{}")
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    message = json.loads(exc.read() or b"{}").get("error") or exc.reason
                    raise FeedError(f"{self.url}{path}: {exc.code} {message}") from None
                reason = f"HTTP {exc.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                reason = str(exc)
            attempt += 1
            wait = min(2.0**attempt / 2, 15.0)  # 1, 2, 4, 8, 15, 15 ... s: an app restart takes seconds to minutes
            if time.monotonic() + wait > deadline:
                raise FeedError(f"{self.url}{path} did not answer after {attempt} tries ({reason}).")
            time.sleep(wait)

    def state(self, patience_s: float = -1.0) -> dict:
        """The app's watermark, versions and settings (read once per round and cached until then)."""
        self._state = self._call("GET", "/state", patience_s=patience_s)
        return self._state

    # --- what a round reads ----------------------------------------------------------------------------------
    def watermark(self) -> int:
        return int(self.state()["watermark"])

    def _rows(self, kind: str, since: int) -> list[dict]:
        out, after = [], since
        while True:
            page = self._call("GET", f"/rows/{kind}?after={after}&limit={PAGE}")
            out += page["rows"]
            if page["next"] is None:
                return out
            after = page["next"]

    def preference_pairs(self, since: int = 0) -> list[PairRow]:
        return [PairRow(**r) for r in self._rows("pairs", since)]

    def ties(self, since: int = 0) -> list[TieRow]:
        return [TieRow(**r) for r in self._rows("ties", since)]

    def pointwise_labels(self, since: int = 0) -> list[ThumbRow]:
        return [ThumbRow(**r) for r in self._rows("thumbs", since)]

    def asked(self, limit: int = 200, per_asker: int | None = None) -> list[tuple[str, list[dict]]]:
        query = f"?limit={limit}" + (f"&per_asker={per_asker}" if per_asker is not None else "")
        return [tuple(a) for a in self._call("GET", "/prompts" + query)["asked"]]

    def source_statuses(self) -> dict[str, str]:
        return (self._state or self.state())["sources"]

    def adapters(self) -> list[dict]:
        return [{**a, "path": str(self.cache / a["version"])} for a in self.state()["adapters"]]

    def live_adapter(self) -> dict | None:
        """The live version, its folder downloaded into the cache (the next round starts from it)."""
        live = next((a for a in self.adapters() if a["status"] == "live"), None)
        if live is not None and not Path(live["path"]).is_dir():
            self._download(live["version"], Path(live["path"]))
        return live

    def _download(self, version: str, folder: Path) -> None:
        tmp = folder.with_name(f".tmp-{version}-download")
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(self._call("GET", f"/versions/{version}", raw=True)), mode="r:gz") as tar:
            for member in tar.getmembers():
                if member.isfile() and "/" not in member.name:
                    with tar.extractfile(member) as src:
                        (tmp / member.name).write_bytes(src.read())
        tmp.rename(folder)

    def votes_between(self, after: int, upto: int, voter: str | None = None) -> int:
        return len(self._rows("pairs", after)) + len(self._rows("thumbs", after))  # an upper bound is enough here

    def sources_between(self, after: int, upto: int) -> int:
        rows = self._rows("pairs", after) + self._rows("ties", after) + self._rows("thumbs", after)
        statuses = self.source_statuses()
        return len(
            {r["voter_source"] for r in rows if r["voter_source"]}
            - {s for s, v in statuses.items() if v in ("flagged", "banned")}
        )

    def next_version(self, taken=()) -> str:
        versions = [a["version"] for a in self.state()["adapters"]] + list(taken)
        numbers = [int(m.group(1)) for v in versions if (m := re.fullmatch(r"v(\d+)", v))]
        return f"v{max(numbers, default=0) + 1:04d}"

    # --- what a round writes ---------------------------------------------------------------------------------
    def start_run(self, kind: str, owner: str | None = None) -> int:
        return int(self._call("POST", "/runs", {"kind": kind, "owner": self.owner})["id"])

    def heartbeat(self, run_id: int, stage: str, detail: str) -> None:
        """Tell the app the round is alive and where it is (its dashboard shows it; a silent round loses its lease)."""
        # One try: the round goes on while the app restarts; its next heartbeat or its end reaches it again.
        with contextlib.suppress(FeedError):
            self._call("POST", f"/runs/{run_id}", {"owner": self.owner, "stage": stage, "detail": detail}, patience_s=0)

    def finish_run(self, run_id: int, status: str, metrics: dict | None = None, error: str = "") -> None:
        body = {"owner": self.owner, "status": status, "metrics": metrics or {}, "error": error}
        self._call("POST", f"/runs/{run_id}", json.loads(json.dumps(body, default=str)))

    def add_adapter(self, version: str, path: str, *, parent=None, status: str = "candidate", metrics=None) -> None:
        """Upload the published folder (PEFT's files + meta.json) as a .tar.gz: the app publishes it as a candidate."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in sorted(Path(path).iterdir()):
                tar.add(f, arcname=f.name)
        self._call("PUT", f"/versions/{version}", buf.getvalue())

    def set_adapter_status(self, version: str, status: str) -> None:
        self._call("POST", f"/versions/{version}/status", {"status": status})

    def flag_source(self, source: str, *, votes: int, log_odds: float, agree: float, at_vote: int = 0) -> bool:
        body = {"source": source, "votes": votes, "log_odds": log_odds, "agree": agree, "at_vote": at_vote}
        return bool(self._call("POST", "/sources/flag", body)["flagged"])


def follow_url(url: str) -> str:
    """A followed app's base URL, checked: http(s) with a host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FeedError(f"--follow needs the app's URL (http://host:port), not {url!r}.")
    return url


def prune_local(folder: str | Path, keep: int) -> None:
    """Keep the newest `keep` version folders a following trainer published (the app keeps its own copies)."""
    import shutil

    versions = sorted(p for p in Path(folder).glob("v[0-9]*") if p.is_dir())
    for old in versions[: max(0, len(versions) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def shared_settings(cfg, store: RemoteStore):
    """`cfg` with the followed app's settings that a round must share with it (public rules, the prompt it serves)."""
    from dataclasses import replace

    return replace(cfg, **store.state()["settings"])
