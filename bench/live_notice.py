"""From the vote that starts a round to the page saying the new version is live, without a click.

`python app.py` on the default model with its trainer on; one person (gradio_client) casts the round's votes
(`train_min_new_votes` A/B choices, always the shorter answer); two Chromium pages at 1280x900 stay open, one on
Chat (the banner above the tabs) and one on the Training tab (its sentence, refreshed by its own timer). Prints the
seconds from the last vote to each page's first word of it, and what the Training tab said on the way.
Usage: python bench/live_notice.py [--tokens 48] [--timeout 1200] [--out bench/live_notice.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

from gradio_client import Client
from load import start_app, vote_shorter
from page_stream import CHROMIUM, FLAGS

from rlhf_live.config import Config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out", default=str(Path(__file__).with_name("live_notice.json")))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    votes = Config().train_min_new_votes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as data, sync_playwright() as p:
        proc = start_app(Config().model, Path(data), port, ["--max-new-tokens", str(args.tokens)])
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            chat = browser.new_page(viewport={"width": 1280, "height": 900})
            chat.goto(url)
            chat.wait_for_selector("#chat-input textarea")
            training = browser.new_page(viewport={"width": 1280, "height": 900})
            training.goto(url)
            training.get_by_role("tab", name="Training").click()
            client = Client(url, verbose=False)
            vote_shorter(client, "Give me one tip for a good morning.", votes)
            last_vote = time.monotonic()
            said, seen = [], {}
            while time.monotonic() - last_vote < args.timeout and len(seen) < 2:
                now = time.monotonic() - last_vote
                sentence = training.inner_text("#train-status") if training.locator("#train-status").count() else ""
                if not said or said[-1][1] != sentence:
                    said.append((round(now, 1), sentence))
                if "training" not in seen and "Live: v0001" in sentence:
                    seen["training"] = now
                banner = chat.locator("#new-version-text")  # not in the page until a version goes live
                if "chat" not in seen and banner.count() and "is live" in banner.inner_text():
                    seen["chat"] = now
                    chat.screenshot(path=str(Path(args.out).with_suffix(".chat.png")))
                time.sleep(0.5)
            training.screenshot(path=str(Path(args.out).with_suffix(".training.png")))
            result |= {"votes": votes, "seconds_to_page": seen, "training_said": said}
            result["status"] = client.predict(api_name="/status")
            browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    for where, s in sorted(result["seconds_to_page"].items()):
        print(f"{where:<9} says the new version is live {s:7.1f} s after the vote that started the round")
    for t, sentence in result["training_said"]:
        print(f"  {t:7.1f} s  {sentence[:110]}")
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
