"""Serving beside a trainer in another process: swap in whatever version the DB says is live.

Knows the store's live row and the Policy's swap; knows nothing of training.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rlhf_live.config import Config
from rlhf_live.model.lora import BASE
from rlhf_live.serving.policy import Policy
from rlhf_live.store import Store


class Follower:
    """Serving beside a trainer in another process: swaps in whatever version the DB says is live (polled)."""

    def __init__(self, cfg: Config, store: Store, policy: Policy):
        self.cfg, self.store, self.policy = cfg, store, policy
        self._stop = threading.Event()
        self.last_error = ""

    def check(self) -> bool:
        """Serve the DB's live version if it is not what serves now; True when something was swapped."""
        live = self.store.live_adapter()
        version, path = (live["version"], live["path"]) if live else (BASE, None)
        if version == self.policy.version or (path is not None and not Path(path).is_dir()):
            return False
        try:
            self.policy.swap(path, version)
        except Exception as exc:  # serving goes on with what it has
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self.last_error = ""
        return True

    def start(self) -> None:
        """Poll every follow_check_s in a daemon thread until stop()."""
        threading.Thread(target=self._loop, name="follower", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.follow_check_s):
            self.check()
