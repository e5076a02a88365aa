"""What a person sees: first text and tokens/s as the page shows them (Chat and Compare), next to the engine's own.

One run, one machine: first the engine alone (the app's Policy and Service in this process, no web server), then
`python app.py` (default model, no trainer) driven by Debian's Chromium at 1280x900, then the same app's `/chat` API.
The page's figures come from a MutationObserver on the answer boxes (time of every change and the text shown);
tokens are the final answer's tokens (the model's tokenizer), the rate counts from the first text to the last.
Usage: python bench/page_stream.py [--runs 3] [--tokens 256] [--out bench/page_stream.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import socket
import statistics
import tempfile
import time
from pathlib import Path

from gradio_client import Client
from load import start_app

from rlhf_live.config import Config
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.service import Service
from rlhf_live.serving.settings import GenerationSettings
from rlhf_live.store import Store

QUESTION = "Write a long, detailed story about a dragon who learns to bake bread."
CMP_QUESTION = "Tell me a long story about a lighthouse keeper and a storm."
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Records (ms since the send, text length) of each watched element whenever the page changes it.
OBSERVER = """(selectors) => {
  window.__t0 = performance.now();
  window.__samples = selectors.map(() => []);
  const read = () => selectors.map(s => {
    const e = document.querySelectorAll(s);
    return e.length ? e[e.length - 1].innerText : '';
  });
  let last = read();
  new MutationObserver(() => {
    const now = read();
    const t = performance.now() - window.__t0;
    now.forEach((text, i) => { if (text !== last[i]) window.__samples[i].push([t, text.length]); });
    last = now;
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def rate(tokens: int, first_s: float, last_s: float) -> float:
    """Tokens per second from the first text to the last (the first token's wait is `first_s` itself)."""
    return (tokens - 1) / (last_s - first_s) if last_s > first_s and tokens > 1 else float("nan")


def engine_alone(cfg: Config, runs: int, tokens: int) -> dict:
    """Chat and Compare through Policy/Service in this process: what the engine delivers before any web layer."""
    policy = Policy.from_config(cfg)
    settings = GenerationSettings.from_config(cfg, max_new_tokens=tokens)
    chat, cmp = [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.sqlite")
        service = Service(policy, store, dataclasses.replace(cfg, max_requests_per_minute=0))
        policy.generate([{"role": "user", "content": "Hello!"}], settings)  # warm-up
        for i in range(runs):
            start, first = time.perf_counter(), None
            stream = policy.stream([{"role": "user", "content": f"{QUESTION} ({i})"}], settings)
            for (text,) in stream:
                if first is None and text:
                    first = time.perf_counter() - start
            last = time.perf_counter() - start
            n = len(stream.answers[0].token_ids)
            chat.append({"first_text_s": first, "total_s": last, "tokens": n, "tokens_per_s": rate(n, first, last)})
        for i in range(runs):
            start, first, final = time.perf_counter(), None, None
            for update in service.compare("bench", f"{CMP_QUESTION} ({i})", settings=settings):
                if first is None and update["a"]["text"] and update["b"]["text"]:
                    first = time.perf_counter() - start
                final = update
            last = time.perf_counter() - start
            n = [len(policy.tokenizer(final[s]["text"], add_special_tokens=False)["input_ids"]) for s in "ab"]
            cmp.append({"first_text_s": first, "total_s": last, "tokens": n, "tokens_per_s": rate(min(n), first, last)})
        store.close()
    return {"chat": chat, "compare": cmp}


def page_runs(url: str, tokenizer, runs: int) -> dict:
    """The same in Chromium: Chat's last answer and Compare's two boxes, as the page shows them."""
    from playwright.sync_api import sync_playwright

    chat, cmp = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("#chat-input textarea")
        for i in range(runs + 1):  # the first is a warm-up
            page.click("#chatbot button[aria-label='Clear']") if i else None
            page.evaluate(OBSERVER, ["#chatbot [data-testid='bot'] .md, #chatbot [data-testid='bot']"])
            page.fill("#chat-input textarea", f"{QUESTION} ({i})" if i else "Hello!")
            page.press("#chat-input textarea", "Enter")
            page.wait_for_function(
                "() => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
                " return b.length && b[b.length - 1].innerText.includes('written by'); }",
                timeout=300_000,
            )
            text = page.locator("#chatbot [data-testid='bot']").last.inner_text().rsplit("written by", 1)[0]
            samples = page.evaluate("window.__samples")
            if i:
                chat.append(_page_row(samples, [text], tokenizer))
        page.get_by_role("tab", name="Compare").click()
        for i in range(runs + 1):
            page.evaluate(OBSERVER, ["#cmp-a .md", "#cmp-b .md"])
            page.fill("#cmp-input textarea", f"{CMP_QUESTION} ({i})" if i else "Hello!")
            page.click("#cmp-go")
            # The last pair's "finished" must go first, or its boxes would be read as this one's.
            page.wait_for_function("() => !document.querySelector('#cmp-note').innerText.includes('finished')")
            page.wait_for_function(
                "() => document.querySelector('#cmp-note').innerText.includes('finished')", timeout=300_000
            )
            page.wait_for_selector("#choose-a:not([disabled])", timeout=300_000)
            texts = [page.inner_text(s) for s in ("#cmp-a .md", "#cmp-b .md")]
            samples = page.evaluate("window.__samples")
            if i:
                cmp.append(_page_row(samples, texts, tokenizer))
        browser.close()
    return {"chat": chat, "compare": cmp}


def _page_row(samples: list[list], texts: list[str], tokenizer) -> dict:
    """First text (both boxes for Compare), last change, tokens of the final text(s), updates the page rendered."""
    shown = [[s for s in box if s[1] > 0] for box in samples]
    if not all(shown):  # an empty answer (the model ended at once): no rate to read
        print(f"an empty box: {texts!r}")
        return {"first_text_s": float("nan"), "total_s": float("nan"), "tokens": [0], "tokens_per_s": float("nan")}
    first = max(box[0][0] for box in shown) / 1000
    last = max(box[-1][0] for box in shown) / 1000
    n = [len(tokenizer(t.strip(), add_special_tokens=False)["input_ids"]) for t in texts]
    updates = [len(box) for box in shown]
    return {
        "first_text_s": first,
        "total_s": last,
        "tokens": n,
        "tokens_per_s": rate(min(n), first, last),
        "updates": updates,
    }


def api_runs(url: str, tokenizer, runs: int) -> dict:
    """`/chat` through gradio_client, polling the streamed outputs as a client would."""
    client = Client(url, verbose=False)
    out = []
    for i in range(runs + 1):
        start, first = time.perf_counter(), None
        job = client.submit(f"{QUESTION} ({i})" if i else "Hello!", api_name="/chat")
        last_seen, last_t = "", None
        while not job.done():
            outs = job.outputs()
            text = outs[-1].get("text", "") if outs else ""
            if text and first is None:
                first = time.perf_counter() - start
            if text != last_seen:
                last_seen, last_t = text, time.perf_counter() - start
            time.sleep(0.005)
        text = job.result()["text"]
        last = last_t if last_seen == text and last_t else time.perf_counter() - start
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if i:
            out.append({"first_text_s": first, "total_s": last, "tokens": n, "tokens_per_s": rate(n, first, last)})
    return {"chat": out}


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r[key] == r[key]]  # NaN (an empty answer) left out
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).with_name("page_stream.json")))
    parser.add_argument("--no-engine", action="store_true", help="skip the engine-alone rows (reuse --out's)")
    args, app_args = parser.parse_known_args()  # the rest goes to app.py, e.g. --stream-interval-s 0.1
    cfg = Config(max_new_tokens=args.tokens, train=False)
    # In a process of its own, so its engine is gone (and its cores free) before the app starts.
    if args.no_engine:
        result = {"engine": json.loads(Path(args.out).read_text())["engine"]}
    else:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = {"engine": pool.submit(engine_alone, cfg, args.runs, args.tokens).result()}
        Path(args.out).write_text(json.dumps(result, indent=1))
    result["app_args"] = app_args
    from rlhf_live.model import base as models

    tokenizer = models.load_tokenizer(models.resolve(cfg.model, cfg.cache_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as data:
        proc = start_app(cfg.model, Path(data), port, ["--max-new-tokens", str(args.tokens), "--no-train", *app_args])
        try:
            url = f"http://127.0.0.1:{port}/"
            result["page"] = page_runs(url, tokenizer, args.runs)
            result["api"] = api_runs(url, tokenizer, args.runs)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    engine = {tab: median(result["engine"][tab], "tokens_per_s") for tab in ("chat", "compare")}
    print(f"{'tab':<8} {'path':<7} {'first text s':>12} {'tokens/s':>9} {'vs engine':>9} {'page updates':>12}")
    for tab in ("chat", "compare"):
        for path in ("engine", "page", "api"):
            rows = result[path].get(tab)
            if not rows:
                continue
            tps = median(rows, "tokens_per_s")
            ups = statistics.median(min(r.get("updates") or [0]) for r in rows) if path == "page" else float("nan")
            row = f"{tab:<8} {path:<7} {median(rows, 'first_text_s'):>12.2f} {tps:>9.1f}"
            print(f"{row} {tps / engine[tab]:>8.2f}x {ups:>12.0f}")
    result["engine_tokens_per_s"] = engine
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
