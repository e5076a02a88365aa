"""The Data tab: what has been collected, and the export in TRL's column formats.

Knows the export formats and the download file; the counts come from the dashboard (training.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from ..service import Service
from .common import PRIVATE, UserError

EXPORT_FORMATS = ("preference", "kto", "conversations")


class DataTab:
    """Builds the Data tab inside the current gr.Blocks and wires the export."""

    def __init__(self, service: Service):
        self.service = service
        with gr.Tab("Data", id="data") as self.tab:
            self.summary = gr.Markdown("")
            with gr.Row():
                self.fmt = gr.Radio(list(EXPORT_FORMATS), value="preference", label="Export format (TRL columns)")
                self.export = gr.Button("Prepare download")
            self.file = gr.File(label="Export", interactive=False)
        self.export.click(self.do_export, [self.fmt], [self.file], **PRIVATE)

    def do_export(self, kind: str) -> str:
        """Write the export to a temporary file and offer it for download."""
        out = Path(tempfile.mkdtemp(prefix="rlhf-live-export-")) / f"rlhf-live-{kind}.jsonl"
        with UserError():
            self.service.store.export(kind, out)
        return str(out)


def data_summary(status: dict) -> str:
    """Counts of conversations, messages, thumbs and A/B choices as one Markdown line."""
    counts, votes, choices = status["counts"], status["votes"], status["choices"]
    return (
        f"**Conversations:** {counts['conversations']} · **messages:** {counts['messages']} · "
        f"**thumbs:** 👍 {votes.get('up', 0)} / 👎 {votes.get('down', 0)} (cleared {votes.get('cleared', 0)}) · "
        f"**A/B choices:** " + ", ".join(f"{k} {v}" for k, v in choices.items())
    )
