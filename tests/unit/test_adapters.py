"""Adapter folders: atomic publish, validation of corrupt folders, no half versions after a crash."""

import json

import pytest

from rlhf_live.model.lora import AdapterError, check_folder
from rlhf_live.store.folders import AdapterRegistry


def _write_ok(folder):
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")


def test_publish_is_atomic_and_records_meta(tmp_path):
    reg = AdapterRegistry(tmp_path / "adapters")
    path = reg.publish("v0001", _write_ok, meta={"parent": "base", "metrics": {"kl": 0.5}})
    assert path == tmp_path / "adapters" / "v0001"
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "meta.json"]
    assert reg.meta("v0001")["metrics"] == {"kl": 0.5} and reg.meta("v0001")["version"] == "v0001"
    assert reg.versions() == ["v0001"]
    with pytest.raises(AdapterError, match="already exists"):
        reg.publish("v0001", _write_ok)


def test_a_crash_while_writing_leaves_no_version(tmp_path):
    reg = AdapterRegistry(tmp_path)

    def crash(folder):
        (folder / "adapter_config.json").write_text("{}")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        reg.publish("v0002", crash)
    assert reg.versions() == [] and list(tmp_path.iterdir()) == []


def test_incomplete_writes_are_refused_before_the_rename(tmp_path):
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(AdapterError, match="weights are missing"):
        reg.publish("v0003", lambda f: (f / "adapter_config.json").write_text("{}"))
    assert reg.versions() == []


def test_corrupt_folders_are_named_clearly(tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        check_folder(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterError, match="not valid JSON"):
        check_folder(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="weights are missing"):
        check_folder(tmp_path)


def test_version_names_cannot_escape_the_folder(tmp_path):
    reg = AdapterRegistry(tmp_path)
    for bad in ("../v0001", "v1", "latest", ""):
        with pytest.raises(AdapterError, match="not a version name"):
            reg.path(bad)


def test_leftovers_of_interrupted_publishes_are_cleaned(tmp_path):
    reg = AdapterRegistry(tmp_path)
    (tmp_path / ".tmp-v0004-deadbeef").mkdir()
    assert reg.versions() == [] and reg.clean_partial() == 1 and list(tmp_path.iterdir()) == []
