"""Hub sync against a local stand-in of the Hub API that records calls (the real hub is not reachable here)."""

from __future__ import annotations

import shutil
import sqlite3

import pytest
from hub_standin import Hub

from rlhf_live.config import Config
from rlhf_live.store import Store
from rlhf_live.store.folders import AdapterRegistry
from rlhf_live.store.hub import HubSync
from rlhf_live.store.recovery import reconcile, serving_choice


@pytest.fixture
def hub(monkeypatch, tmp_path):
    standin = Hub()
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", standin.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", standin.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setenv("HF_TOKEN", "hf_standin")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield standin
    standin.close()


def write_adapter(folder):
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 10)


def test_off_unless_configured(tmp_path):
    sync = HubSync(Config(data_dir=str(tmp_path)))
    assert not sync.enabled and sync.pull() == [] and sync.push_version("v0001", tmp_path) is False


def test_a_live_version_and_the_feedback_go_up_and_come_back_to_an_empty_data_dir(hub, tmp_path):
    cfg = Config(data_dir=str(tmp_path / "space"), hub_model_repo="me/adapters", hub_dataset_repo="me/votes")
    store = Store.from_config(cfg)
    cid = store.new_conversation("s")
    q = store.add_message(cid, "user", "Which fruit?")
    a = store.add_message(cid, "assistant", "Apples.", parent_id=q)
    b = store.add_message(cid, "assistant", "Pears, because they are sweet.", parent_id=q)
    store.choose(store.new_comparison(cid, a, b, a_source="base", b_source="base", voter="s"), "s", "A")
    registry = AdapterRegistry(cfg.adapters_dir)
    path = registry.publish("v0001", write_adapter)
    store.add_adapter("v0001", str(path), status="live")

    sync = HubSync(cfg)
    sync.push_live(store, "v0001", path).join()
    assert sync.last_error == ""
    assert set(hub.repos[("model", "me/adapters")]) >= {
        "adapters/v0001/adapter_config.json",
        "adapters/v0001/adapter_model.safetensors",
    }
    assert {"rlhf_live.db", "exports/preference.jsonl", "exports/kto.jsonl", "exports/conversations.jsonl"} <= set(
        hub.repos[("dataset", "me/votes")]
    )
    assert b"Apples." in hub.repos[("dataset", "me/votes")]["exports/preference.jsonl"]
    assert ("POST", "/api/repos/create") in hub.calls and any("/commit/" in p for _, p in hub.calls)
    store.close()

    # The Space restarts with an empty disk (here in another folder, the old one gone): it resumes where it was.
    shutil.rmtree(tmp_path / "space")
    fresh = Config(data_dir=str(tmp_path / "restarted"), hub_model_repo="me/adapters", hub_dataset_repo="me/votes")
    notes = HubSync(fresh).pull()
    assert notes == [
        "Resumed the votes from the Hub dataset me/votes.",
        "Restored adapter versions v0001 from the Hub model me/adapters.",
    ]
    again = Store.from_config(fresh)
    reconcile(again, AdapterRegistry(fresh.adapters_dir))
    assert again.preference_pairs()[0].chosen == "Apples."
    assert serving_choice(fresh, again) == (str(AdapterRegistry(fresh.adapters_dir).path("v0001")), "v0001")
    assert sqlite3.connect(fresh.db_path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert HubSync(fresh).pull() == []  # not empty any more: nothing is overwritten
    again.close()


def test_the_hub_being_down_never_raises(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    cfg = Config(data_dir=str(tmp_path / "d"), hub_model_repo="me/a", hub_dataset_repo="me/v")
    sync = HubSync(cfg)
    assert sync.push_version("v0001", tmp_path) is False and "pushing v0001" in sync.last_error
    assert sync.pull() == [] and "pulling" in sync.last_error
