"""After a crash and between processes: folders and DB rows agree, dead runs are marked, old versions are pruned."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from rlhf_live.config import Config
from rlhf_live.store import Store, recovery
from rlhf_live.store.folders import AdapterRegistry


def write_adapter(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 16)


@pytest.fixture
def parts(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    yield store, AdapterRegistry(tmp_path / "adapters")
    store.close()


def test_a_crash_between_publish_and_register_never_wedges_the_next_round(parts):
    store, registry = parts
    path = registry.publish("v0001", write_adapter, meta={"parent": "base", "metrics": {"learner": "ppo"}})
    # The process died here: a folder, no DB row. The next version skips it instead of colliding.
    assert store.next_version() == "v0001" and store.next_version(registry.versions()) == "v0002"
    notes = recovery.reconcile(store, registry)
    assert notes == ["Registered v0001 as a candidate: it was published but never recorded (a crash between)."]
    row = store.adapter("v0001")
    assert (row["status"], row["path"], row["metrics"]) == ("candidate", str(path), {"learner": "ppo"})
    assert recovery.reconcile(store, registry) == []  # nothing left to fix


def test_runs_of_dead_processes_are_interrupted_and_live_ones_kept(parts):
    store, registry = parts
    dead = store.start_run("round", owner=f"{socket.gethostname()}:999999999")
    legacy = store.start_run("round")  # from before owners were recorded
    mine = store.start_run("round", owner=recovery.owner())
    elsewhere = store.start_run("round", owner="another-host:1")
    notes = recovery.reconcile(store, registry)
    assert len(notes) == 2 and all("was interrupted: its process stopped" in n for n in notes)
    status = {r["id"]: r["status"] for r in store.runs()}
    assert status == {dead: "interrupted", legacy: "interrupted", mine: "running", elsewhere: "running"}


def test_a_live_version_whose_folder_is_gone_is_not_served_under_its_name(parts):
    store, registry = parts
    store.add_adapter("v0001", str(registry.root / "v0001"), status="live")  # no folder
    notes = recovery.reconcile(store, registry)
    assert notes == [f"v0001 was live but its folder {registry.root / 'v0001'} is gone: serving the base model."]
    assert store.adapter("v0001")["status"] == "rolled_back" and store.live_adapter() is None
    assert recovery.serving_choice(Config(), store) == (None, None)


def test_only_dead_processes_unfinished_folders_are_removed(parts):
    store, registry = parts
    other_live = registry.root / f".tmp-v0002-{os.getppid()}-abcd1234"  # another process publishing right now
    dead = registry.root / ".tmp-v0003-999999999-abcd1234"
    old_style = registry.root / ".tmp-v0004-abcd1234"
    for p in (other_live, dead, old_style):
        p.mkdir()
    assert recovery.reconcile(store, registry) == [
        "Removed 2 unfinished adapter folder(s) of a process that stopped while publishing."
    ]
    assert other_live.is_dir() and not dead.exists() and not old_style.exists()


def test_prune_keeps_the_live_version_its_parent_and_the_newest(parts):
    store, registry = parts
    for i in range(1, 8):
        v = f"v{i:04d}"
        path = registry.publish(v, write_adapter)
        store.add_adapter(v, str(path), parent=f"v{i - 1:04d}" if i > 1 else None, status="retired")
    store.set_adapter_status("v0003", "live")  # rolled back to an old one
    assert recovery.prune(store, keep=2) == ["v0001", "v0004", "v0005"]
    assert registry.versions() == ["v0002", "v0003", "v0006", "v0007"]
    assert recovery.prune(store, keep=0) == []  # 0 keeps everything


def test_one_round_at_a_time_per_data_dir(tmp_path):
    busy = pytest.raises(recovery.TrainingBusy, match=f"Another training round is running.*{os.getpid()}")
    with recovery.trainer_lock(tmp_path), busy, recovery.trainer_lock(tmp_path):
        pass
    with recovery.trainer_lock(tmp_path):  # released when the holder finished
        pass


def test_train_once_is_refused_while_another_round_runs(tmp_path, capsys):
    from rlhf_live import cli

    with recovery.trainer_lock(tmp_path / "data"):
        code = cli.main(["train", "--once", "--data-dir", str(tmp_path / "data"), "--model", "unused"])
    assert code == 2 and "Another training round is running" in capsys.readouterr().err
