"""The Gradio app: streaming chat on the live policy.

Knows Gradio components and events (the only module that imports gradio); delegates generation to Policy.
"""

from __future__ import annotations

import gradio as gr

from .config import Config
from .policy import GenerationSettings, InvalidRequest, Policy


def _text_of(content) -> str:
    """Gradio 6 hands message content as a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


def build(policy: Policy, cfg: Config) -> gr.Blocks:
    """The Blocks app around a loaded policy."""
    with gr.Blocks(title="rlhf-live") as demo:
        gr.Markdown("# rlhf-live\nChat with a small model that learns from your votes.")
        chatbot = gr.Chatbot(label="Chat", height=480)
        box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, max_lines=8)

        def respond(message: str, history: list):
            try:
                text = policy.check_message(message)
            except InvalidRequest as exc:
                raise gr.Error(str(exc)) from None
            messages = [{"role": m["role"], "content": _text_of(m["content"])} for m in history]
            messages.append({"role": "user", "content": text})
            settings = GenerationSettings.from_config(cfg)
            stream = policy.stream(messages, settings)
            history = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            try:
                for (answer,) in stream:
                    history[-1] = {"role": "assistant", "content": answer}
                    yield "", history
            finally:
                stream.cancel()

        box.submit(
            respond, [box, chatbot], [box, chatbot], api_name="chat", concurrency_limit=cfg.generation_concurrency
        )
    return demo


def serve(cfg: Config) -> None:
    """Load the policy and run the app until interrupted."""
    policy = Policy.from_config(cfg)
    demo = build(policy, cfg)
    demo.queue(default_concurrency_limit=cfg.generation_concurrency)
    demo.launch(server_name=cfg.host, server_port=cfg.port)
