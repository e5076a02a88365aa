"""The composition: the one place that wires the store, the served policy, the trainer (or follower) and the Service.

Knows which parts a running app has and how they connect (the trainer reaches serving only through the hooks given
here: a `served` handle and `engine_file`); knows nothing of Gradio, HTTP or SQL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf_live.config import Config
from rlhf_live.learning.round import EngineFile
from rlhf_live.learning.trainer import Trainer
from rlhf_live.serving.engine_files import prebuild_engine_file
from rlhf_live.serving.follower import Follower
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.service import Service
from rlhf_live.store import Store
from rlhf_live.store.folders import AdapterRegistry
from rlhf_live.store.hub import HubSync
from rlhf_live.store.recovery import reconcile, serving_choice


@dataclass
class Runtime:
    """A running app's parts."""

    cfg: Config
    store: Store
    policy: Policy
    service: Service
    trainer: Trainer | None
    """The background trainer (Config.train), or None."""
    follower: Follower | None
    """Without a trainer: swaps in what another process's trainer makes live."""
    hub: HubSync | None

    def stop(self) -> None:
        """Stop the trainer or follower threads (the store and policy stay usable)."""
        if self.trainer is not None:
            self.trainer.stop()
        if self.follower is not None:
            self.follower.stop()


def engine_file(cfg: Config) -> EngineFile:
    """The hook a round calls on each new version: serving's llama.cpp file, written in training's time."""
    return lambda model, path: prebuild_engine_file(cfg, model, Path(path))


def assemble(
    cfg: Config, *, hub: bool = True, start: bool = True, say: Callable[[str], None] = lambda note: None
) -> Runtime:
    """Store (reconciled), the policy serving the live version, a trainer or a follower, and the Service over them."""
    sync = HubSync(cfg) if hub else None
    if sync is not None:
        for note in sync.pull():  # an empty data dir on a Space without storage: resume from the Hub, if configured
            say(note)
    store = Store.from_config(cfg)
    for note in reconcile(store, AdapterRegistry(cfg.adapters_dir)):
        say(note)
    if sync is not None:
        sync.start(store)
    adapter, version = serving_choice(cfg, store)
    policy = Policy.from_config(cfg, adapter_path=adapter, version=version)
    if policy.engine_note:
        say(policy.engine_note)
    trainer = follower = None
    if cfg.train:
        trainer = Trainer(cfg, store, policy, sync, engine_file=engine_file(cfg))
        if start:
            trainer.start()
    elif start:  # a trainer may run as its own process (`rlhf-live train --watch`): serve what it makes live
        follower = Follower(cfg, store, policy)
        follower.start()
    return Runtime(cfg, store, policy, Service(policy, store, cfg, trainer), trainer, follower, sync)
