"""The named HTTP API (`/chat`, `/feedback`, `/compare`, `/choose`, `/status`) for gradio_client and scripts.

Knows the endpoints' names, arguments and result shapes (DESIGN's public contract); every request goes to Service.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator

import gradio as gr

from rlhf_live.serving.samplers import coalesced
from rlhf_live.serving.service import Service
from rlhf_live.ui.common import UserError, caller_of, started


def add_api(service: Service, generate: dict) -> None:
    """Register the five endpoints inside the current gr.Blocks."""
    interval = service.cfg.stream_interval_s

    def api_chat(message: str, conversation_id: str = "", request: gr.Request = None) -> Iterator[dict]:
        """Answer `message` in a new ("") or existing conversation of this client, streamed as it is written."""
        # `response_id` is None until the last update, which has the stored answer's ids: what predict() returns.
        start = lambda: service.chat(caller_of(service, None, request), message, conversation_id or "")  # noqa: E731
        yield from _streamed(start, ("conversation_id", "response_id", "text", "adapter_version"), interval)

    def api_feedback(response_id: str, value: str, reason: str = "", request: gr.Request = None) -> dict:
        """Thumb an answer: value is up, down or clear."""
        with UserError():
            out = service.feedback(caller_of(service, None, request), response_id, value, reason)
        return {"ok": out["ok"]}

    def api_compare(message: str, conversation_id: str = "", request: gr.Request = None) -> Iterator[dict]:
        """Two answers of the live model to `message`, streamed; the last update has the pair id: vote with /choose."""
        start = lambda: service.compare(caller_of(service, None, request), message, conversation_id or "")  # noqa: E731
        yield from _streamed(start, ("pair_id", "a", "b"), interval)

    def api_choose(pair_id: str, choice: str, reason: str = "", request: gr.Request = None) -> dict:
        """Pick the better answer of a pair: A, B, tie or both_bad (once per pair)."""
        with UserError():
            out = service.choose(caller_of(service, None, request), pair_id, choice, reason)
        return {"ok": out["ok"], "a_version": out["a_version"], "b_version": out["b_version"]}

    def api_status() -> dict:
        """Trainer state, live version, counts and last run metrics."""
        return json.loads(json.dumps(service.dashboard.status(), default=str))

    gr.api(api_chat, api_name="chat", **generate)
    gr.api(api_feedback, api_name="feedback")
    gr.api(api_compare, api_name="compare", **generate)
    gr.api(api_choose, api_name="choose")
    gr.api(api_status, api_name="status")


def _streamed(start: Callable[[], Iterator[dict]], keys: tuple[str, ...], interval: float) -> Iterator[dict]:
    """The service's updates, cut to the endpoint's result shape; a refusal at the start is a gr.Error."""
    stream, first = started(start)
    try:
        for update in coalesced(itertools.chain([first], stream), interval):
            yield {k: update[k] for k in keys}
    finally:
        stream.close()  # a client that went away: the service records what was written (finish_reason 'cancelled')
