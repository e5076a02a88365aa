"""The trainer feed: what a trainer on another machine needs from a running app, and where it hands a version back.

Admin-only (the app's --admin-token as a bearer token). Reads: the state (watermark, live version), the training rows
(A/B pairs, ties, thumbs) after a watermark, paged, in the store's row shape, the prompt pool, a version's adapter
folder. Writes: a round's start, heartbeat and end (one round at a time, a lease that a dead trainer loses), a
version's upload (validated like any version, published atomically, idempotent), a version going live (the app's
own gate checks it again) and a source flagged by the contrarian test. The app stays the one owner of its SQLite
file. Knows HTTP and the store; knows nothing of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from rlhf_live.learning.gate import TrainingRejected, gate
from rlhf_live.model.lora import AdapterError, check_folder
from rlhf_live.serving.service import Service
from rlhf_live.store import StoreError, UnknownId
from rlhf_live.store.folders import VERSION_RE, AdapterRegistry

MAX_UPLOAD_BYTES = 256 * 1024 * 1024
KINDS = {"pairs": "preference_pairs", "ties": "ties", "thumbs": "pointwise_labels"}


class Refused(Exception):
    """A request the feed refuses: HTTP status and a sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class TrainerFeed:
    """The /trainer routes over one Service (its store, config and dashboard)."""

    def __init__(self, service: Service):
        self.service, self.store, self.cfg = service, service.store, service.cfg
        self.registry = AdapterRegistry(self.cfg.adapters_dir)
        self._lock = threading.Lock()  # one round start, upload or go-live at a time
        self.seen: dict[int, dict] = service.dashboard.remote_rounds
        """Run id -> the trainer's last heartbeat: {owner, at (Unix s), stage, detail} (the dashboard shows it)."""

    def _admin(self, request: Request) -> None:
        token = self.cfg.admin_token
        if not token:
            raise Refused(403, "This app has no --admin-token: a trainer can follow it only once one is set.")
        auth = request.headers.get("authorization", "")
        given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Refused(401, "The trainer feed needs the app's admin token: Authorization: Bearer <token>.")

    def router(self) -> APIRouter:
        r = APIRouter(prefix="/trainer")
        for path, method, fn in (
            ("/state", "GET", self.state),
            ("/rows/{kind}", "GET", self.rows),
            ("/prompts", "GET", self.prompts),
            ("/versions/{version}", "GET", self.download),
            ("/versions/{version}/status", "POST", self.status),
            ("/runs", "POST", self.start_run),
            ("/runs/{run_id}", "POST", self.run),
            ("/sources/flag", "POST", self.flag),
        ):
            r.add_api_route(path, self._guarded(fn), methods=[method])

        async def upload(request: Request, version: str):
            body = await request.body()  # whole before anything is written: a cut-off upload publishes nothing
            return await run_in_threadpool(self._guarded(self.upload), request, version=version, body=body)

        r.add_api_route("/versions/{version}", upload, methods=["PUT"])
        return r

    def _guarded(self, fn):
        """`fn` behind the admin check, with refusals as JSON errors."""

        def route(request: Request, **kwargs):
            try:
                self._admin(request)
                return fn(request, **kwargs)
            except Refused as exc:
                return _json(exc.status, str(exc))
            except UnknownId as exc:
                return _json(404, str(exc))
            except (StoreError, AdapterError, TrainingRejected) as exc:
                return _json(400, str(exc))

        route.__signature__ = _signature(fn)  # FastAPI reads the parameters of the wrapped route
        return route

    # --- reads -----------------------------------------------------------------------------------------------
    def state(self, request: Request) -> dict:
        """Watermark, versions (no server paths), source statuses, the settings a round must share with serving."""
        adapters = [{k: v for k, v in a.items() if k != "path"} for a in self.store.adapters()]
        c = self.cfg
        return {
            "watermark": self.store.watermark(),
            "adapters": adapters,
            "sources": self.store.source_statuses() if c.public else {},
            "settings": {"public": c.public, "system_prompt": c.system_prompt, "max_new_tokens": c.max_new_tokens},
        }

    def rows(self, request: Request, kind: str, after: int = 0, limit: int = Query(500, ge=1, le=5000)) -> dict:
        """One page of training rows of `kind` after watermark `after`, oldest first; `next` is the page's last seq."""
        if kind not in KINDS:
            raise Refused(404, f"No rows of kind {kind!r}: pairs, ties or thumbs.")
        rows = getattr(self.store, KINDS[kind])(after)[:limit]
        return {"rows": [dataclasses.asdict(r) for r in rows], "next": rows[-1].seq if len(rows) == limit else None}

    def prompts(self, request: Request, limit: int = Query(200, ge=1, le=5000), per_asker: int | None = None) -> dict:
        """PPO's prompt pool: recent contexts with who asked them (salted), none past `per_asker` from one asker."""
        return {"asked": [list(a) for a in self.store.asked(limit, per_asker)]}

    def download(self, request: Request, version: str) -> Response:
        """A version's adapter folder as a .tar.gz (the live one is where the next round starts from)."""
        folder = Path(self.store.adapter(version)["path"])
        check_folder(folder)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in sorted(folder.iterdir()):
                tar.add(f, arcname=f.name)
        return Response(buf.getvalue(), media_type="application/gzip")

    # --- writes ----------------------------------------------------------------------------------------------
    def start_run(self, request: Request, body: Annotated[dict, Body()]) -> dict:
        """A round starts: refused while another trainer's round is alive (heard from within Config.trainer_lease_s)."""
        owner = str(body.get("owner") or "remote")
        with self._lock:
            for run in self.store.running_runs():
                heard = self.seen.get(run["id"])
                if (
                    run["kind"] == "round"
                    and heard
                    and time.time() - heard["at"] < self.cfg.trainer_lease_s
                    and heard["owner"] != owner
                ):
                    raise Refused(409, f"Another trainer ({heard['owner']}) is running a round: one at a time.")
                if run["kind"] == "round" and (not heard or time.time() - heard["at"] >= self.cfg.trainer_lease_s):
                    self.store.finish_run(run["id"], "interrupted", error="its trainer stopped answering")
                    self.seen.pop(run["id"], None)
            run_id = self.store.start_run("round", owner=owner)
            self.seen[run_id] = {"owner": owner, "at": time.time(), "stage": "starting", "detail": ""}
        return {"id": run_id}

    def run(self, request: Request, run_id: int, body: Annotated[dict, Body()]) -> dict:
        """A heartbeat with the round's stage, or its end (`status`: ok, failed)."""
        heard = self.seen.setdefault(run_id, {"owner": str(body.get("owner") or "remote")})
        heard.update(at=time.time(), stage=str(body.get("stage") or ""), detail=str(body.get("detail") or ""))
        if body.get("status"):
            self.store.finish_run(run_id, str(body["status"]), body.get("metrics") or {}, str(body.get("error") or ""))
            self.seen.pop(run_id, None)
        return {"ok": True}

    def upload(self, request: Request, version: str, body: bytes) -> dict:
        """A version's folder (.tar.gz of PEFT's files + meta.json): checked, published atomically, a candidate."""
        if not VERSION_RE.match(version):
            raise Refused(400, f"{version!r} is not a version name like v0001.")
        if len(body) > MAX_UPLOAD_BYTES:
            raise Refused(413, "The upload is larger than an adapter folder can be.")
        digest = hashlib.sha256(body).hexdigest()
        # The temp folder is named as a publish's (.tmp-...-PID-...): a crash mid-upload leaves what recovery removes.
        prefix = f".tmp-upload-{os.getpid()}-"
        with self._lock, tempfile.TemporaryDirectory(dir=self.registry.root, prefix=prefix) as tmp:
            existing = {a["version"]: a for a in self.store.adapters()}.get(version)
            if existing is not None:  # a retried upload (the reply was lost): the same bytes are already here
                if (existing.get("metrics") or {}).get("upload_sha256") == digest:
                    return {"ok": True, "version": version, "already": True}
                raise Refused(409, f"Version {version} exists with other contents: the trainer must take the next.")
            _extract(body, Path(tmp))
            check_folder(tmp)
            meta = json.loads((Path(tmp) / "meta.json").read_text()) if (Path(tmp) / "meta.json").is_file() else {}
            metrics = {**(meta.get("metrics") or {}), "upload_sha256": digest, "trained_by": "remote"}
            parent = meta.get("parent")

            def write(folder: Path) -> None:
                for f in Path(tmp).iterdir():
                    if f.name != "meta.json":
                        shutil.copy2(f, folder / f.name)

            path = self.registry.publish(version, write, meta={"parent": parent, "metrics": metrics})
            parent = parent if parent in existing_versions(self.store) else None
            self.store.add_adapter(version, str(path), parent=parent, status="candidate", metrics=metrics)
        return {"ok": True, "version": version, "already": False}

    def status(self, request: Request, version: str, body: Annotated[dict, Body()]) -> dict:
        """A version goes live (this app's gate checks its round's metrics again) or is marked otherwise."""
        status = str(body.get("status") or "")
        with self._lock:
            row = self.store.adapter(version)
            if status == "live":
                gate(self.cfg, row.get("metrics") or {})
            self.store.set_adapter_status(version, status)
        return {"ok": True, "version": version, "status": status}

    def flag(self, request: Request, body: Annotated[dict, Body()]) -> dict:
        """A source the round's contrarian test flagged (weight 0 until an admin clears it)."""
        keys = ("votes", "log_odds", "agree", "at_vote")
        flagged = self.store.flag_source(str(body.get("source") or ""), **{k: body[k] for k in keys if k in body})
        return {"ok": True, "flagged": flagged}


def existing_versions(store) -> set[str]:
    return {a["version"] for a in store.adapters()}


def _extract(body: bytes, into: Path) -> None:
    """The files of a .tar.gz, flat, into `into`; an archive with anything else (folders, links, ..) is refused."""
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile() or "/" in member.name or member.name.startswith("."):
                    raise Refused(400, f"The upload may hold only an adapter folder's files, not {member.name!r}.")
                with tar.extractfile(member) as src, open(into / member.name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise Refused(400, f"The upload is not a whole .tar.gz ({exc}): nothing was published.") from None


def _signature(fn):
    import inspect

    sig = inspect.signature(fn)
    return sig.replace(parameters=list(sig.parameters.values()))


def add_trainer_feed(app: FastAPI, service: Service) -> TrainerFeed:
    """Serve /trainer from `app`."""
    feed = TrainerFeed(service)
    app.include_router(feed.router())
    return feed
