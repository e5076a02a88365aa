"""The Data tab: what has been collected, and the export in TRL's column formats.

Knows the export formats and the download file; the counts come from the dashboard (training.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from ..config import Config
from ..service import Service
from .common import PRIVATE, UserError, admin_users, require_admin, voter_of

EXPORT_FORMATS = ("preference", "kto", "conversations")


class DataTab:
    """Builds the Data tab inside the current gr.Blocks and wires the export (everyone's data: admin only)."""

    def __init__(self, service: Service, cfg: Config):
        self.service, self.cfg = service, cfg
        with gr.Tab("Data", id="data") as self.tab:
            self.summary = gr.Markdown("")
            gr.Markdown(
                "The export holds every person's conversations and votes, so it needs the admin token."
                if cfg.admin_token or admin_users(cfg)
                else "The export holds every person's conversations and votes: start the app with `--admin-token` "
                "to download it here, or use `rlhf-live export` on the server."
            )
            with gr.Row(visible=bool(cfg.admin_token or admin_users(cfg))):
                self.fmt = gr.Radio(list(EXPORT_FORMATS), value="preference", label="Export format (TRL columns)")
                self.token = gr.Textbox(label="Admin token", type="password")
                self.export = gr.Button("Prepare download")
            self.file = gr.File(label="Export", interactive=False, visible=bool(cfg.admin_token or admin_users(cfg)))
            gr.Markdown("### Your data")
            with gr.Row():
                self.sure = gr.Checkbox(False, label="Delete all my conversations and votes (cannot be undone)")
                self.delete = gr.Button("Delete my data", variant="stop", elem_id="delete-my-data")
            self.deleted = gr.Markdown("", elem_id="deleted-note")
        self.export.click(self.do_export, [self.fmt, self.token], [self.file], **PRIVATE)

    def wire_delete(self, client: gr.BrowserState) -> None:
        """The delete button needs the browser's voter id (the Chat tab's client state)."""
        # A refusal is explained by the toast; without `quiet` Gradio would also cover the checkbox with "Error".
        quiet = {"show_progress": "hidden", "show_progress_on": [self.deleted]}
        self.delete.click(self.do_delete, [self.sure, client], [self.deleted, self.sure], **PRIVATE, **quiet)

    def do_delete(self, sure: bool, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Delete this browser's (or signed-in person's) conversations and votes, after the checkbox."""
        if not sure:
            raise gr.Error("Tick the box first: deleting your data cannot be undone.")
        with UserError():
            return self.service.delete_my_data(voter_of(self.service, client_value, request, profile)), False

    def do_export(self, kind: str, token: str, profile: gr.OAuthProfile | None = None) -> str:
        """Write the export to a temporary file and offer it for download (admin only, checked here)."""
        require_admin(self.cfg, token, profile)
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
