"""A wheel carries the whole app: built from this tree, installed apart from it, it starts and serves its assets."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import zipfile

from apphelpers import ROOT, free_port


def test_a_wheel_installed_apart_from_the_tree_starts_the_app(tiny_lm_dir, tmp_path):
    dist, site = tmp_path / "dist", tmp_path / "site"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(ROOT),
    ]
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = dist.glob("rlhf_live-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"rlhf_live/assets/seed_prompts.jsonl", "rlhf_live/assets/style.css"} <= names
    assert "rlhf_live/serving/policy.py" in names and "rlhf_live/learning/reward/probe.py" in names
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True)

    # The installed copy, not this tree: run from elsewhere with only the install ahead of the environment's packages.
    env = {**os.environ, "PYTHONPATH": str(site), "GRADIO_ANALYTICS_ENABLED": "False"}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import rlhf_live, rlhf_live.learning.rollout as r; print(rlhf_live.__file__, r.SEED_PROMPTS.is_file())",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where == [str(site / "rlhf_live" / "__init__.py"), "True"]

    port = free_port()
    cmd = [sys.executable, "-m", "rlhf_live", "serve", "--model", str(tiny_lm_dir), "--no-train", "--no-load-in-4bit"]
    cmd += ["--compute-dtype", "float32", "--data-dir", str(tmp_path / "data"), "--port", str(port)]
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, page = time.time() + 180, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert "rlhf-live" in page, log.read_text()[-3000:]
        assert "answer-box" in page  # the CSS, read from the installed package's assets
    finally:
        proc.terminate()
        proc.wait(30)
