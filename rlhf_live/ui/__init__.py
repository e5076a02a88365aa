"""The Gradio app: one module per tab (chat, compare, training, data), the HTTP API (api) and this composition.

This package is the only place that imports gradio; every request goes to `Service`. `build` puts the tabs together
and does the shared wiring (browser state, queue limits, the new-version notice, when the Training tab polls, the
API); `serve` starts it all.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI

from rlhf_live.api.openai import add_openai_api
from rlhf_live.api.trainer import add_trainer_feed
from rlhf_live.config import ASSETS, Config
from rlhf_live.runtime import assemble
from rlhf_live.serving.service import Service
from rlhf_live.ui.api import add_api
from rlhf_live.ui.chat import ChatTab
from rlhf_live.ui.common import PRIVATE, on_space
from rlhf_live.ui.compare import CompareTab
from rlhf_live.ui.data import DataTab
from rlhf_live.ui.training import TrainingTab, VersionNotice, dashboard

CSS_FILE = ASSETS / "style.css"
INTRO = (
    "# rlhf-live\nChat with a small model that learns from your votes: 👍/👎 its answers, or pick the better of two "
    "in **Compare**. A trainer turns votes into a reward model and improves the model with PPO."
)

EPHEMERAL = (
    "⚠️ **This Space has no persistent storage:** votes, conversations and trained versions vanish when it restarts. "
    "The owner can attach storage (Settings → Persistent storage, mounted at `/data`)."
)

__all__ = ["build", "dashboard", "serve", "storage_is_ephemeral"]


def storage_is_ephemeral(cfg: Config) -> bool:
    """On a Hugging Face Space (SPACE_ID set) whose data dir is not on the persistent `/data` mount."""
    if not os.environ.get("SPACE_ID"):
        return False
    data = Path(cfg.data_dir).resolve()
    return not (Path("/data").is_dir() and (data == Path("/data") or Path("/data") in data.parents))


def build(service: Service, cfg: Config) -> gr.Blocks:
    """The whole app around a Service."""
    # llama.cpp batches answers across its slots, so as many chats generate at once; torch, generation_concurrency.
    limit = cfg.engine_parallel if service.policy.engine is not None else cfg.generation_concurrency
    generate = {"concurrency_limit": limit, "concurrency_id": "generate"}
    # Downloads (a visitor's own data, an admin's export) leave Gradio's cache after 10 minutes.
    with gr.Blocks(title="rlhf-live", delete_cache=(600, 600)) as demo:
        # A stable secret (derived from the DB's salt) keeps browsers' saved conversations readable after a restart.
        secret = hashlib.sha256(f"browser-state:{service.store.voter_salt()}".encode()).hexdigest()[:32]
        empty = {"id": "", "conversation_id": "", "leaf": ""}
        client = gr.BrowserState(empty, storage_key="rlhf_live_client", secret=secret)
        gr.Markdown(INTRO)
        if on_space():  # Sign in with Hugging Face (front matter hf_oauth: true): the owner gets the admin controls
            gr.LoginButton()
        if storage_is_ephemeral(cfg):
            gr.Markdown(EPHEMERAL, elem_id="storage-notice")
        notice = VersionNotice(service, secret)
        with gr.Tabs() as tabs:
            chat = ChatTab(service, cfg, client, generate)
            CompareTab(service, cfg, chat, tabs, generate)
            training = TrainingTab(service, cfg)
            data = DataTab(service, cfg)
        data.wire_delete(client)
        pager = [chat.pager, chat.pager_note, chat.prev_answer, chat.next_answer]
        demo.load(chat.load, [client], [client, chat.state, chat.chatbot, *pager], **PRIVATE)
        notice.wire(demo, client)
        # The Training tab polls only while it is open: its own select starts the timer, any other tab's stops it.
        tabs.select(training.deactivate, None, [training.timer], **PRIVATE, queue=False, show_progress="hidden")
        add_api(service, generate)
    # A bounded queue: past max_size, Gradio tells the next person the app is busy instead of queueing forever.
    demo.queue(default_concurrency_limit=cfg.generation_concurrency, max_size=cfg.queue_max_size)
    return demo


def serve(cfg: Config) -> None:
    """Load the policy and store, start the trainer (unless --no-train) and serve the page and /v1 on one port."""
    service = assemble(cfg, say=lambda note: print(f"rlhf-live: {note}", flush=True)).service
    demo = build(service, cfg)
    # One port (a Space exposes one): the OpenAI-compatible routes beside the mounted Gradio app.
    app = FastAPI(title="rlhf-live", docs_url=None, redoc_url=None)
    add_openai_api(app, service)
    add_trainer_feed(app, service)  # a trainer on another machine follows this app through it (--admin-token)
    css = CSS_FILE.read_text() if CSS_FILE.is_file() else None
    app = gr.mount_gradio_app(
        app, demo, path="/", css=css, theme=gr.themes.Soft(), server_name=cfg.host, server_port=cfg.port
    )
    print(f"Running on local URL:  http://{cfg.host}:{cfg.port}", flush=True)
    # uvicorn rewrites the peer address from X-Forwarded-For only for these peers (Config.trusted_proxies); its own
    # default trusts 127.0.0.1, where any local client could then claim any address.
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        proxy_headers=True,
        forwarded_allow_ips=cfg.trusted_proxies,
        log_level="warning",
        timeout_graceful_shutdown=5,  # browsers and clients hold streams open (Gradio's heartbeat): stop anyway
    )
