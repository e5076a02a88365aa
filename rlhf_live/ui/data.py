"""The Data tab: what this app keeps about a visitor, their own data to download or delete, everyone's counts, and
(for the owner) the export of everyone's data in TRL's column formats.

Knows the tab's wording, the download files and the admin check on the export; the counts come from the service's
status (`data_summary`).
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path

import gradio as gr

from rlhf_live.config import Config
from rlhf_live.serving.service import Service
from rlhf_live.store import EXPORT_FORMATS
from rlhf_live.ui.common import PRIVATE, UserError, admin_users, refused, require_admin, voter_of

KEEP_DOWNLOADS_S = 600
"""How long a prepared download stays on the server (Gradio's copy goes after as long: see `build`)."""

WHAT_WE_KEEP = """### What this app keeps about you
- **Your conversations:** every message you send and every answer, with the settings and the model version that
  wrote it.
- **Your votes:** 👍/👎 on answers and your Compare choices, with any reason you typed.
- **Who you are:** a salted hash of this browser's random id (or of your Hugging Face name when you are signed in).
  No IP address, no raw id and no other trace of your browser is stored.

Your votes train the next versions of the model together with everyone else's. **Download my data** gives you a JSON
file with only your own conversations and votes; **Delete my data** removes them (versions trained before keep what
they learned)."""

ADMIN_NOTE = (
    "The export holds **every** person's conversations and votes: it needs the admin token (or signing in as an "
    "admin). On the server, `rlhf-live export --format preference|kto|conversations --out FILE` writes the same files."
)


class DataTab:
    """Builds the Data tab inside the current gr.Blocks and wires the export (everyone's data: admin only)."""

    def __init__(self, service: Service, cfg: Config):
        self.service, self.cfg = service, cfg
        with gr.Tab("Data", id="data") as self.tab:
            gr.Markdown(WHAT_WE_KEEP, elem_id="data-about")
            gr.Markdown("### Your data")
            with gr.Row(equal_height=True):
                self.download = gr.Button("Download my data", elem_id="download-my-data")
                self.sure = gr.Checkbox(False, label="Delete all my conversations and votes (cannot be undone)")
                self.delete = gr.Button("Delete my data", variant="stop", elem_id="delete-my-data")
            self.mine = gr.File(label="Your data (JSON)", interactive=False, visible=False, elem_id="my-data-file")
            self.deleted = gr.Markdown("", elem_id="deleted-note")
            gr.Markdown("### Everyone's data so far")
            self.summary = gr.Markdown("", elem_id="data-summary")
            admin = bool(cfg.admin_token or admin_users(cfg))
            # Built either way (its handler refuses without the token); without admins, visitors see none of it.
            with gr.Accordion("Admin: export everyone's data", open=False, visible=admin):
                gr.Markdown(ADMIN_NOTE if admin else "")
                with gr.Row():
                    self.fmt = gr.Radio(list(EXPORT_FORMATS), value="preference", label="Export format (TRL columns)")
                    self.token = gr.Textbox(label="Admin token", type="password")
                    self.export = gr.Button("Prepare download")
                self.file = gr.File(label="Export", interactive=False)
        self.export.click(self.do_export, [self.fmt, self.token], [self.file], **PRIVATE)
        self.tab.select(lambda: data_summary(service.dashboard.status()), None, [self.summary], **PRIVATE, queue=False)

    def wire_delete(self, client: gr.BrowserState) -> None:
        """Download and delete need the browser's voter id (the Chat tab's client state)."""
        # A refusal is explained by the toast; without `quiet` Gradio would also cover the checkbox with "Error".
        quiet = {"show_progress": "hidden", "show_progress_on": [self.deleted]}
        self.delete.click(self.do_delete, [self.sure, client], [self.deleted, self.sure, self.mine], **PRIVATE, **quiet)
        self.download.click(self.do_download, [client], [self.mine], **PRIVATE)

    def do_delete(self, sure: bool, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Delete this browser's (or signed-in person's) conversations and votes, after the checkbox."""
        if not sure:
            raise refused("Tick the box first: deleting your data cannot be undone.")
        with UserError():
            note = self.service.delete_my_data(voter_of(self.service, client_value, request, profile))
        return note, False, gr.File(value=None, visible=False)

    def do_download(self, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """A JSON file of this browser's (or signed-in person's) own conversations and votes, nobody else's."""
        with UserError():
            mine = self.service.store.voter_data(voter_of(self.service, client_value, request, profile))
        path = _download_path("rlhf-live-my-data.json")
        path.write_text(json.dumps(mine, ensure_ascii=False, indent=1), encoding="utf-8")
        return gr.File(value=str(path), visible=True)

    def do_export(self, kind: str, token: str, profile: gr.OAuthProfile | None = None) -> str:
        """Write the export to a temporary file and offer it for download (admin only, checked here)."""
        require_admin(self.cfg, token, profile)
        out = _download_path(f"rlhf-live-{kind}.jsonl")
        with UserError():
            self.service.store.export(kind, out)
        return str(out)


_DOWNLOADS: Path | None = None


def _download_path(name: str) -> Path:
    """A fresh path named `name` for a download; downloads older than KEEP_DOWNLOADS_S are deleted first."""
    global _DOWNLOADS
    if _DOWNLOADS is None or not _DOWNLOADS.is_dir():
        _DOWNLOADS = Path(tempfile.mkdtemp(prefix="rlhf-live-downloads-"))
    now = time.time()
    for old in _DOWNLOADS.glob("*/*"):
        if now - old.stat().st_mtime > KEEP_DOWNLOADS_S:
            old.unlink(missing_ok=True)
            old.parent.rmdir()
    # Its own folder per download, so the file keeps its plain name and two downloads never meet.
    folder = _DOWNLOADS / uuid.uuid4().hex
    folder.mkdir()
    return folder / name


def data_summary(status: dict) -> str:
    """Everyone's counts of conversations, messages, thumbs and A/B choices, in words."""
    counts, votes, choices = status["counts"], status["votes"], status["choices"]
    waiting = choices.get("pending", 0)
    return (
        f"All visitors together: **{counts['conversations']}** conversations with **{counts['messages']}** "
        f"messages · **thumbs:** 👍 {votes.get('up', 0)} / 👎 {votes.get('down', 0)}"
        + (f" ({votes['cleared']} taken back)" if votes.get("cleared") else "")
        + f" · **A/B choices:** A {choices.get('A', 0)}, B {choices.get('B', 0)}, tie {choices.get('tie', 0)}, "
        f"both bad {choices.get('both_bad', 0)}"
        + (f" · {waiting} pair{'s' if waiting != 1 else ''} shown and not voted on yet" if waiting else "")
    )
