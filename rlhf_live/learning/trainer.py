"""When to train: the background thread beside serving, `train --watch` and `train --once`.

Knows when a round is due (enough new votes, on a public deployment from enough sources), serving's priority (the
thread is niced and waits while anyone waits for tokens) and how a new version reaches serving: through the `served`
handle it is given (swap, version, generating), never by importing serving. Knows nothing of Gradio.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import traceback
from typing import Protocol

from rlhf_live.config import Config
from rlhf_live.learning.copies import TrainingCopies
from rlhf_live.learning.learners import learner, round_stages
from rlhf_live.learning.remote import FeedError, prune_local
from rlhf_live.learning.reward.base import Scorer
from rlhf_live.learning.round import ROUND_FAILURES, EngineFile, TrainingStopped, run_round
from rlhf_live.model.lora import BASE
from rlhf_live.store import Store, recovery
from rlhf_live.store.folders import AdapterRegistry


class Served(Protocol):
    """What the trainer needs of serving: the version it serves, whether it is busy, and a hot swap."""

    version: str
    generating: int

    def swap(self, adapter_path, version: str) -> None: ...


class RoundInProgress(ValueError):
    """An admin action that must wait until the round in progress has finished."""


def train_once(cfg: Config, engine_file: EngineFile | None = None) -> dict:
    """`rlhf-live train --once`: one round on the DB at cfg.data_dir; the new version goes live."""
    store = Store.from_config(cfg)
    for note in recovery.reconcile(store, AdapterRegistry(cfg.adapters_dir)):
        print(f"[train] {note}", flush=True)
    say = lambda stage, detail: print(f"[train] {stage}: {detail}", flush=True)  # noqa: E731
    return run_round(cfg, store, progress=say, engine_file=engine_file)


def round_due(cfg: Config, store: Store, since: int) -> bool:
    """Enough new votes after watermark `since` for a round, and on a public deployment from enough sources."""
    upto = store.watermark()
    if upto - since < cfg.train_min_new_votes:
        return False
    # One person with many sessions is still one source: their votes alone never start a round.
    need = cfg.sources_per_round()
    return not cfg.public or store.sources_between(since, upto) >= need


def watch(
    cfg: Config,
    *,
    rounds: int | None = None,
    stop: threading.Event | None = None,
    hub=None,
    engine_file: EngineFile | None = None,
    store=None,
) -> None:
    """`rlhf-live train --watch`: a round whenever train_min_new_votes new votes arrive; a JSON line per round."""
    # The trainer as its own process beside `serve --no-train`: on the same data dir, or following the app over
    # HTTP from another machine (`store` a learning.remote.RemoteStore; the app owns its DB and serving files).
    remote = store is not None
    store, copies, stop = store or Store.from_config(cfg), TrainingCopies(cfg), stop or threading.Event()
    for note in [] if remote else recovery.reconcile(store, AdapterRegistry(cfg.adapters_dir)):
        print(f"[train] {note}", flush=True)
    live = store.live_adapter()
    seen = int((live or {}).get("metrics", {}).get("watermark", 0)) if live else 0
    done = 0
    while not stop.is_set() and (rounds is None or done < rounds):
        try:
            if not round_due(cfg, store, seen):
                stop.wait(cfg.train_check_s)
                continue
            seen = store.watermark()  # a failed round is not retried on the same votes
        except FeedError as exc:  # the followed app is down or restarting: ask again later
            print(json.dumps({"status": "waiting", "error": str(exc)}), flush=True)
            stop.wait(cfg.train_check_s)
            continue
        try:
            metrics = run_round(cfg, store, copies=copies, engine_file=engine_file)
            if remote:
                prune_local(cfg.adapters_dir, cfg.keep_versions)
            else:
                recovery.prune(store, cfg.keep_versions)
            if hub is not None and hub.enabled:
                hub.push_live(store, metrics["version"], store.adapter(metrics["version"])["path"]).join()
            print(json.dumps({"version": metrics["version"], "status": "live", **_headline(metrics)}), flush=True)
        except (*ROUND_FAILURES, FeedError) as exc:
            print(json.dumps({"status": "failed", "error": str(exc)}), flush=True)
        done += 1
        stop.wait(cfg.train_check_s)


def _headline(metrics: dict) -> dict:
    """The numbers a person watching `train --watch` wants per round."""
    keys = ("learner", "watermark", "sample/kl", "reward/accuracy", "seconds/round")
    return {k: metrics[k] for k in keys if k in metrics}


class Trainer:
    """Background thread: trains when enough new votes arrived (or on request) and hot-swaps the served adapter."""

    _IDLE = {"stage": 0, "stages": 0, "step": None, "steps": None, "round_started": None, "stage_started": None}
    """Progress fields while no round runs (times are Unix seconds)."""

    def __init__(self, cfg: Config, store: Store, served: Served, hub=None, engine_file: EngineFile | None = None):
        self.cfg, self.store, self.policy, self.hub = cfg, store, served, hub
        self.engine_file = engine_file
        """Writes serving's engine file for each new version in training's time (wired by the runtime)."""
        self.copies = TrainingCopies(cfg)
        self._round = threading.Lock()  # a round and a rollback never interleave
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._force = False
        self._thread: threading.Thread | None = None
        live = store.live_adapter()
        last = (live or {}).get("metrics") or {}
        self._status = {
            "state": "idle",
            "progress": "",
            "running": False,
            "watermark": int(last.get("watermark", 0)) if isinstance(last, dict) else 0,
            "last_error": "",
            "rounds": 0,
            **self._IDLE,
        }

    def reward_model(self) -> Scorer | None:
        """The last round's fitted reward model (None before the first round, and for learners without one)."""
        return self.copies.reward_model if learner(self.cfg.learner).reward_model else None

    def status(self) -> dict:
        """State for the dashboard: idle or a stage of `round_stages`, with progress, stage k of n, times, last error.

        While a round runs: `stage` (1-based) of `stages`, `step`/`steps` within the stage when its detail says
        ('update 3/8'), `round_started` and `stage_started` (Unix seconds).
        """
        return dict(self._status)

    def _progress(self, state: str, detail: str) -> None:
        """Record what the round is doing; a new state starts a new stage (its clock starts now)."""
        plan = round_stages(self.cfg.learner)
        stage = plan.index(state) + 1 if state in plan else self._status["stage"]
        step = re.search(r"(\d+)/(\d+)", detail or "")
        update = {"state": state, "progress": detail, "stage": stage, "stages": len(plan)}
        if stage != self._status["stage"]:
            update["stage_started"] = time.time()
        update["step"], update["steps"] = (int(step[1]), int(step[2])) if step else (None, None)
        self._status.update(update)

    def start(self) -> None:
        """Run rounds in a daemon thread until stop()."""
        self._status["running"] = True
        self._thread = threading.Thread(target=self._loop, name="trainer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end after its current step."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the thread has ended (after stop())."""
        if self._thread is not None:
            self._thread.join(timeout)

    def request_round(self) -> str:
        """Admin: train now, whatever the vote count."""
        self._force = True
        self._wake.set()
        return "A training round was requested; watch the state above."

    def rollback(self, version: str) -> str:
        """Admin: serve an earlier version (or 'base') again; the current one is marked rolled_back."""
        if not self._round.acquire(blocking=False):
            raise RoundInProgress("A training round is running: roll back when it has finished (see the state above).")
        try:
            current = self.store.live_adapter()
            if version == BASE:
                self.policy.swap(None, BASE)
            else:
                row = self.store.adapter(version)
                self.policy.swap(row["path"], version)
                self.store.set_adapter_status(version, "live")
            if current and current["version"] != version:
                self.store.set_adapter_status(current["version"], "rolled_back")
            return f"Now serving {version}."
        finally:
            self._round.release()

    def _yield_to_serving(self) -> None:
        """Serving has priority: on 2 cores, wait between training steps while someone is waiting for tokens."""
        waited = 0.0
        while self.policy.generating and waited < self.cfg.train_max_yield_s and not self._stop.is_set():
            time.sleep(0.2)
            waited += 0.2
        if self._stop.is_set():
            raise TrainingStopped("The trainer was stopped before this round finished; nothing was published.")

    def run_once(self) -> dict:
        """One round now, in this thread: train, gate, go live, hot-swap; a failure is recorded and raised."""
        with self._round:
            try:
                before = self.store.live_adapter()
                self._status.update(round_started=time.time(), stage=0)
                metrics = run_round(
                    self.cfg,
                    self.store,
                    progress=self._progress,
                    pause=self._yield_to_serving,
                    copies=self.copies,
                    engine_file=self.engine_file,
                )
                self._progress("going live", "switching serving to the new version")
                self._swap_in(metrics["version"], before)
                removed = recovery.prune(self.store, self.cfg.keep_versions)
                metrics["pruned"] = removed
                if self.hub is not None and self.hub.enabled:
                    self.hub.push_live(self.store, metrics["version"], self.store.adapter(metrics["version"])["path"])
                self._status.update(
                    last_error="", watermark=int(metrics["watermark"]), rounds=self._status["rounds"] + 1
                )
                return metrics
            except Exception as exc:
                self._status["last_error"] = f"{type(exc).__name__}: {exc}"
                self._status["watermark"] = self.store.watermark()  # do not retry the same data in a loop
                raise
            finally:
                self._status.update(state="idle", progress="", **self._IDLE)

    def _swap_in(self, version: str, before: dict | None) -> None:
        """Serve the round's new version; if it cannot be served, the DB goes back to saying what serves."""
        try:
            self.policy.swap(self.store.adapter(version)["path"], version)
        except Exception:
            self.store.set_adapter_status(version, "rolled_back")
            if before is not None and before["version"] == self.policy.version:
                self.store.set_adapter_status(before["version"], "live")
            raise

    def _ready(self) -> bool:
        return round_due(self.cfg, self.store, self._status["watermark"])

    def _loop(self) -> None:
        # Lower this thread's CPU priority before it starts any torch work: the OpenMP threads torch then starts for
        # it inherit the niceness, so on a busy machine the kernel gives serving's threads the cores first.
        if self.cfg.train_nice > 0 and hasattr(os, "setpriority"):
            with contextlib.suppress(OSError):  # not permitted here: training then competes as an equal
                me = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + self.cfg.train_nice))
        while not self._stop.is_set():
            self._wake.wait(self.cfg.train_check_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            if not self._force and not self._ready():
                continue
            self._force = False
            try:
                self.run_once()
            except TrainingStopped:
                break
            except Exception:  # serving must survive any training failure
                traceback.print_exc()
