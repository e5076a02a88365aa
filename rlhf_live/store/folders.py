"""Versioned adapter folders on disk: `<data-dir>/adapters/v0001/` with PEFT's files plus `meta.json`.

Knows folder layout, validation and atomic publishing (write to a temporary folder, then rename); knows nothing
of SQL (statuses live in the store's `adapters` table), tensors or training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from rlhf_live.model.lora import AdapterError, check_folder

VERSION_RE = re.compile(r"^v\d{4,}$")


class AdapterRegistry:
    """The adapters folder: publish new versions atomically, find and describe existing ones."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: str) -> Path:
        """Folder of `version` (validated: no path tricks in the name)."""
        if not VERSION_RE.match(version or ""):
            raise AdapterError(f"{version!r} is not a version name like v0001.")
        return self.root / version

    def publish(self, version: str, write: Callable[[Path], None], meta: dict | None = None) -> Path:
        """Call write(tmp_folder), add meta.json, check the folder, then rename it to `version` in one step."""
        final = self.path(version)
        if final.exists():
            raise AdapterError(f"Version {version} already exists in {self.root}.")
        # The writer's pid is in the name: another process cleaning up never deletes a publish in flight.
        tmp = self.root / f".tmp-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            write(tmp)
            info = {"version": version, "created": datetime.now(timezone.utc).isoformat(), **(meta or {})}
            (tmp / "meta.json").write_text(json.dumps(info, indent=2, default=str))
            check_folder(tmp)
            for f in tmp.iterdir():  # flush file contents before the rename makes them visible
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.rename(tmp, final)  # atomic on POSIX: readers see no folder or a whole one
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def versions(self) -> list[str]:
        """Published versions on disk, oldest first (temporary folders of interrupted publishes are ignored)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and VERSION_RE.match(p.name))

    def meta(self, version: str) -> dict:
        """The meta.json of a version ({} when absent or unreadable)."""
        try:
            return json.loads((self.path(version) / "meta.json").read_text())
        except (OSError, ValueError):
            return {}

    def clean_partial(self) -> int:
        """Remove leftovers of publishes that crashed before their rename (only dead processes'); return how many."""
        leftovers = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
        leftovers = [p for p in leftovers if not _publisher_alive(p.name)]
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        return len(leftovers)


def _publisher_alive(tmp_name: str) -> bool:
    """Whether the process that named a `.tmp-vNNNN-PID-xxxx` folder still runs (old names without a pid: no)."""
    parts = tmp_name.split("-")
    if len(parts) < 4 or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    return pid != os.getpid() and process_running(pid)  # this process is not publishing while it cleans up


def process_running(pid: int) -> bool:
    """Whether process `pid` runs on this host (one we may not signal runs too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
