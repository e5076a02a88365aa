"""Keeping the data dir consistent across crashes and processes: folders vs DB rows, dead runs, pruning.

Knows the adapter folders (adapters.py) and the store's version and run rows, and which process owns what (host and
pid); knows nothing of tensors, training or Gradio. `reconcile` runs when a server or trainer starts and says, in
sentences, what it fixed; `next_version` never collides with a folder a crash left behind; `prune` keeps the disk
bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from rlhf_live.model.lora import check_folder
from rlhf_live.store import Store
from rlhf_live.store.folders import VERSION_RE, AdapterRegistry, process_running


def owner() -> str:
    """This process as 'host:pid' (recorded with training runs and temporary folders)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_dead(owner_id: str | None) -> bool:
    """Whether the process `owner_id` names is gone (only knowable on this host; another host's is assumed alive)."""
    if not owner_id:
        return True  # runs from before owners were recorded
    host, _, pid = owner_id.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not process_running(int(pid))


def reconcile(store: Store, registry: AdapterRegistry) -> list[str]:
    """Make the DB and the adapter folders agree after a crash; one sentence per thing fixed."""
    notes = []
    removed = registry.clean_partial()
    if removed:
        notes.append(f"Removed {removed} unfinished adapter folder(s) of a process that stopped while publishing.")
    rows = {a["version"]: a for a in store.adapters()}
    for version, row in rows.items():  # a data dir restored elsewhere (e.g. from the Hub): the folders moved
        if not Path(row["path"]).is_dir() and registry.path(version).is_dir():
            store.set_adapter_path(version, str(registry.path(version)))
    rows = {a["version"]: a for a in store.adapters()}
    for version in registry.versions():
        if version in rows:
            continue
        meta = registry.meta(version)
        try:
            check_folder(registry.path(version))
        except Exception:
            continue  # not a loadable adapter: leave it for a person to look at
        store.add_adapter(
            version, str(registry.path(version)), parent=meta.get("parent"), metrics=meta.get("metrics") or {}
        )
        notes.append(f"Registered {version} as a candidate: it was published but never recorded (a crash between).")
    live = store.live_adapter()
    if live and not Path(live["path"]).is_dir():
        store.set_adapter_status(live["version"], "rolled_back")
        notes.append(f"{live['version']} was live but its folder {live['path']} is gone: serving the base model.")
    for run in store.running_runs():
        if is_dead(run["owner"]):
            store.finish_run(run["id"], "interrupted", error="The process running it stopped before it finished.")
            notes.append(f"Training run {run['id']} ({run['kind']}) was interrupted: its process stopped.")
    return notes


def prune(store: Store, keep: int) -> list[str]:
    """Delete the folders of old versions: keep the live one, its parent and the newest `keep`; the versions removed."""
    if keep <= 0:
        return []
    rows = store.adapters()
    live = store.live_adapter()
    protected = {r["version"] for r in sorted(rows, key=lambda r: r["version"])[-keep:]}
    if live:
        protected |= {live["version"], live.get("parent") or ""}
    removed = []
    for r in rows:
        path = Path(r["path"])
        if r["version"] not in protected and VERSION_RE.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            if r["status"] in ("candidate", "live"):
                store.set_adapter_status(r["version"], "retired")
            removed.append(r["version"])
    return removed


def serving_choice(cfg, store: Store) -> tuple[str | None, str | None]:
    """(adapter folder, version label) to serve at start: --adapter, else the live version, else the base."""
    # A label goes only with a folder that exists: a missing folder is never served as a fresh LoRA under its name.
    if cfg.adapter:
        return cfg.adapter, None
    live = store.live_adapter()
    if live and Path(live["path"]).is_dir():
        return live["path"], live["version"]
    return None, None


class TrainingBusy(RuntimeError):
    """Another round is running on this data dir (in this process or another); this one did not start."""


@contextlib.contextmanager
def trainer_lock(data_dir: str | Path) -> Iterator[None]:
    """Hold `<data-dir>/trainer.lock` for one round; TrainingBusy at once if anyone else holds it."""
    # An OS file lock (flock): it is per open file, so two rounds never interleave whether they are threads of one
    # process or two processes (`serve` and `train --watch`), and it is released when a process dies, however it dies.
    path = Path(data_dir) / "trainer.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise TrainingBusy(
                f"Another training round is running on this data dir ({holder}); try again later."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner().encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock
