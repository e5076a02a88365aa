"""Optional backup to the Hugging Face Hub, so a Space without persistent storage resumes where it was after a restart.

Knows huggingface_hub's upload and download calls and what goes where: each live adapter version to a model repo
(`adapters/vNNNN/`), the feedback to a dataset repo (a consistent snapshot of the SQLite DB to resume from, and the
TRL exports for people and for TRL), and both pulled back into an empty data dir at start. Off unless
`hub_model_repo` / `hub_dataset_repo` are set; the token comes from HF_TOKEN (a Space secret), the endpoint from
HF_ENDPOINT as huggingface_hub reads it. Knows nothing of training or Gradio; failures are reported, never raised
into serving.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

from rlhf_live.config import Config
from rlhf_live.store import EXPORT_FORMATS, Store

DB_FILE = "rlhf_live.db"


class HubSync:
    """Pushes versions and feedback to the Hub and pulls them into a fresh data dir."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.last_error = ""
        self._stop = threading.Event()
        self._api = None

    @property
    def enabled(self) -> bool:
        """Whether a model or dataset repo is configured."""
        return bool(self.cfg.hub_model_repo or self.cfg.hub_dataset_repo)

    @property
    def api(self):
        if self._api is None:
            from huggingface_hub import HfApi  # a dependency of transformers: always installed

            self._api = HfApi(token=os.environ.get("HF_TOKEN") or None)
        return self._api

    def _safely(self, what: str, fn) -> bool:
        try:
            fn()
        except Exception as exc:  # the Hub being down never stops serving or training
            self.last_error = f"{what}: {type(exc).__name__}: {exc}"
            print(f"rlhf-live: hub sync failed ({self.last_error})", flush=True)
            return False
        self.last_error = ""
        return True

    # --- push --------------------------------------------------------------------------------------------
    def push_version(self, version: str, folder: str | Path) -> bool:
        """Upload a published adapter folder to the model repo as adapters/<version>/."""
        repo = self.cfg.hub_model_repo
        if not repo:
            return False

        def push():
            self.api.create_repo(repo, repo_type="model", private=True, exist_ok=True)
            self.api.upload_folder(
                repo_id=repo,
                repo_type="model",
                folder_path=str(folder),
                path_in_repo=f"adapters/{version}",
                commit_message=f"rlhf-live: {version} went live",
            )

        return self._safely(f"pushing {version}", push)

    def push_feedback(self, store: Store) -> bool:
        """Upload a consistent snapshot of the DB and the three TRL exports to the dataset repo."""
        repo = self.cfg.hub_dataset_repo
        if not repo:
            return False

        def push():
            with tempfile.TemporaryDirectory(prefix="rlhf-live-hub-") as tmp:
                snapshot = sqlite3.connect(Path(tmp) / DB_FILE)
                with snapshot:
                    store.db().conn.backup(snapshot)  # SQLite's online backup: one consistent copy while serving
                snapshot.close()
                for fmt in EXPORT_FORMATS:
                    store.export(fmt, Path(tmp) / "exports" / f"{fmt}.jsonl")
                self.api.create_repo(repo, repo_type="dataset", private=True, exist_ok=True)
                self.api.upload_folder(
                    repo_id=repo, repo_type="dataset", folder_path=tmp, commit_message="rlhf-live: feedback snapshot"
                )

        return self._safely("pushing feedback", push)

    # --- pull --------------------------------------------------------------------------------------------
    def pull(self) -> list[str]:
        """Into an empty data dir: the DB snapshot and the adapter versions from the Hub; sentences on what came."""
        data = Path(self.cfg.data_dir)
        if not self.enabled or (data / DB_FILE).exists():
            return []
        notes: list[str] = []

        def pull_db():
            if not self.cfg.hub_dataset_repo:
                return
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(self.cfg.hub_dataset_repo, DB_FILE, repo_type="dataset", token=self._token())
            data.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, data / DB_FILE)
            notes.append(f"Resumed the votes from the Hub dataset {self.cfg.hub_dataset_repo}.")

        def pull_adapters():
            if not self.cfg.hub_model_repo:
                return
            from huggingface_hub import snapshot_download

            got = Path(snapshot_download(self.cfg.hub_model_repo, allow_patterns=["adapters/*"], token=self._token()))
            versions = sorted(p.name for p in (got / "adapters").iterdir()) if (got / "adapters").is_dir() else []
            for v in versions:
                shutil.copytree(got / "adapters" / v, data / "adapters" / v, dirs_exist_ok=True)
            if versions:
                notes.append(
                    f"Restored adapter versions {', '.join(versions)} from the Hub model {self.cfg.hub_model_repo}."
                )

        self._safely("pulling the votes", pull_db)
        self._safely("pulling the adapters", pull_adapters)
        return notes

    def _token(self) -> str | None:
        return os.environ.get("HF_TOKEN") or None

    # --- schedule ----------------------------------------------------------------------------------------
    def start(self, store: Store) -> None:
        """Push the feedback every hub_sync_s in a daemon thread (a no-op without a dataset repo)."""
        if not self.cfg.hub_dataset_repo:
            return

        def loop():
            while not self._stop.wait(self.cfg.hub_sync_s):
                self.push_feedback(store)

        threading.Thread(target=loop, name="hub-sync", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def push_live(self, store: Store, version: str, folder: str | Path) -> threading.Thread:
        """After a round went live: the version and the feedback it learned from, in a background thread."""
        thread = threading.Thread(
            target=lambda: (self.push_version(version, folder), self.push_feedback(store)), name="hub-push", daemon=True
        )
        thread.start()
        return thread
