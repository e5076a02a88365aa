"""One set of versions: what the tests run with is what `make run`, CI and a Space install (constraints.txt)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {m[1].lower(): m[2] for line in lines if (m := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip()))}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_spaces_gradio_is_the_pinned_gradio():
    front = (ROOT / "README.md").read_text().split("---")[1]
    sdk = re.search(r"^sdk_version: (\S+)$", front, re.M)[1]
    assert sdk == pins()["gradio"], "README's sdk_version and constraints.txt disagree: run `make lock`"


def test_the_tests_run_with_exactly_the_pinned_versions():
    pinned = {norm(k): v for k, v in pins().items()}
    drift = {}
    for dist in metadata.distributions():
        name = norm(dist.metadata["Name"])
        if name in pinned and dist.version.split("+")[0] != pinned[name]:
            drift[name] = (dist.version, pinned[name])
    assert drift == {}, f"installed != constraints.txt (installed, pinned): {drift}; run `make lock` or reinstall"
    for key in ("torch", "transformers", "peft", "bitsandbytes", "gradio", "sqlite-utils", "trl", "xllamacpp"):
        assert key in pinned, key


def test_the_spaces_requirements_use_the_pins_and_match_pyproject():
    req = (ROOT / "requirements.txt").read_text().splitlines()
    assert "-c constraints.txt" in req
    names = {
        norm(re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0]) for line in req if line and not line.startswith(("#", "-"))
    }
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M)[1]
    declared = {norm(re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0]) for d in re.findall(r'"([^"]+)"', deps)}
    # A Space installs gradio itself, at sdk_version (checked above): requirements.txt lists the rest.
    assert names | {"gradio"} == declared, "requirements.txt (Spaces) and pyproject.toml list different packages"
