"""The Training tab: what the trainer is doing, the learning curve, the leaderboard, the versions, the admin controls;
and the notice, above the tabs, that a new version is live.

Knows how the service's status, learning curve and leaderboard become sentences, plots and tables (`dashboard`), how
the tab keeps itself fresh while it is open (a timer that sends only what changed) and checks the admin token inside
each admin handler; knows nothing of chat.
"""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from rlhf_live.config import Config
from rlhf_live.model.lora import BASE
from rlhf_live.serving.leaderboard import MIN_BATTLES, MIN_VOTES
from rlhf_live.serving.service import Service
from rlhf_live.ui.common import PRIVATE, UserError, admin_users, refused, require_admin, voter_of
from rlhf_live.ui.dashboard_figures import (
    BOARD_COLUMNS,
    ROUND_NOTES,
    SOURCE_COLUMNS,
    VERSION_COLUMNS,
    board_rows,
    caption,
    curve_rows,
    drift_fig,
    figure,
    quality_fig,
    source_rows,
    version_rows,
)
from rlhf_live.ui.dashboard_text import status_text
from rlhf_live.ui.data import data_summary

REFRESH_S = 5.0
"""How often the open Training tab, and every page's new-version notice, ask for news."""
QUIET = {**PRIVATE, "queue": False, "show_progress": "hidden"}
"""Timer ticks: cheap reads that skip the queue (never "queue full" for a poll) and show no spinner."""

GLOSSARY = (
    "**Reward model:** a small model fitted to the votes that predicts which of two answers people prefer.  \n"
    "**PPO** (Proximal Policy Optimization): the method that nudges the chat model, a small step at a time, towards "
    "answers the reward model scores higher.  \n"
    "**KL (nats per answer):** how far a trained version's answers moved from the original model's; 0 = unchanged, "
    "lower = closer to the original. A round over {max_kl:g} is refused.  \n"
    "**Gate:** the checks a round must pass before it goes live (drift, answer length, repetition, answering at all). "
    " \n**Vote between versions:** a Compare choice whose two answers came from different versions; the leaderboard "
    "is built from these only."
)
LEARNER_LINES = {
    "dpo": "**DPO:** learning directly from A/B votes, without a reward model.",
    "kto": "**KTO:** learning directly from 👍/👎 votes, without a reward model.",
    "rm-dpo": "**RM-DPO:** DPO on pairs of the model's own answers, ranked by the reward model.",
}
CAPTION_QUALITY = (
    "Each point is one training round. **Win-rate vs the original / vs earlier versions:** the share of Compare "
    "votes that round's version won (higher is better; 50% = no difference). **Reward model agreement:** how often "
    "the reward model picks the answer people picked, on votes it was not fitted on (higher is better; 50% = chance). "
    f"A point needs at least {MIN_VOTES} votes."
)
CAPTION_DRIFT = (
    "**KL to the original model** (nats per answer): how far answers moved from the original model; lower = closer, "
    "some movement is needed to learn anything. **PPO score:** the reward model's average score for PPO's own answers "
    "in the round (higher = it likes them more; it says nothing about what people think)."
)
BOARD_NOTE = (
    "From Compare votes between two different versions. **Rating:** Elo-style, 1000 = average; 100 points more ≈ 64% "
    f"chance of winning a vote. The 95% interval is given from {MIN_BATTLES} votes on."
)
SOURCES_NOTE = (
    "**Sources** are people as this app can tell them apart: a signed-in account, else a network address (stored "
    "as a salted hash). **Flagged:** its votes went against everyone else's often enough that it weighs nothing "
    "until cleared. **Banned:** weighs nothing and its new votes are refused. **Clear flag** makes a source count "
    "again and exempts it from the test."
)
VERSIONS_NOTE = (
    "**live:** serving now · **retired:** served before · **candidate:** trained, refused by the gate · "
    "**rolled_back:** taken back by the owner. Times are UTC. **Sources:** how many people (accounts or addresses) "
    "its votes came from, and the largest one's share of the training weight (recorded on public deployments)."
)


class TrainingTab:
    """Builds the Training tab inside the current gr.Blocks and wires the admin controls and the refresh timer."""

    def __init__(self, service: Service, cfg: Config):
        self.service, self.cfg = service, cfg
        with gr.Tab("Training", id="training") as self.tab:
            self._layout()
            self.sent = gr.State({})  # what this browser was last sent: unchanged parts are skipped
            self.timer = gr.Timer(REFRESH_S, active=False)
        self.train_now.click(self._admin("train"), [self.token, self.rollback_to], [self.admin_note], **PRIVATE)
        self.rollback.click(self._admin("rollback"), [self.token, self.rollback_to], [self.admin_note], **PRIVATE)
        self.show_sources.click(self._sources, [self.token], [self.sources, self.admin_note], **PRIVATE)
        for button, status in ((self.ban, "banned"), (self.clear, "cleared")):
            button.click(
                self._source_action(status), [self.token, self.source_id], [self.sources, self.admin_note], **PRIVATE
            )
        outputs = [*self.outputs, self.sent]
        self.tab.select(self.refresh, [self.sent], outputs, **QUIET).then(
            lambda: gr.Timer(active=True), None, [self.timer], **QUIET
        )
        self.timer.tick(self.refresh, [self.sent], outputs, **QUIET)

    def _layout(self) -> None:
        self.status = gr.Markdown("", elem_id="train-status")
        with gr.Row(visible=False) as self.curve_row:
            with gr.Column():
                self.plot_acc = gr.Plot(show_label=False, format="png", elem_id="plot-quality")
                self.caption_acc = gr.Markdown("", elem_id="caption-quality")
            with gr.Column():
                self.plot_rl = gr.Plot(show_label=False, format="png", elem_id="plot-drift")
                self.caption_rl = gr.Markdown("", elem_id="caption-drift")
        gr.Markdown("### Leaderboard: which version do people prefer?\n" + BOARD_NOTE)
        self.board = gr.Dataframe(interactive=False, wrap=True, elem_id="leaderboard")
        gr.Markdown("### Versions\n" + VERSIONS_NOTE)
        self.versions = gr.Dataframe(interactive=False, wrap=True, elem_id="versions")
        with gr.Accordion("What the words mean", open=False):
            extra = LEARNER_LINES.get(self.cfg.learner)
            gr.Markdown(GLOSSARY.format(max_kl=self.cfg.max_kl_per_answer) + (f"  \n{extra}" if extra else ""))
        with gr.Accordion("Admin", open=False, visible=bool(self.cfg.admin_token or admin_users(self.cfg))):
            self.token = gr.Textbox(label="Admin token", type="password")
            with gr.Row():
                self.train_now = gr.Button("Train now")
                self.rollback_to = gr.Textbox(label="Roll back to version (e.g. v0002)", scale=2)
                self.rollback = gr.Button("Roll back")
            self.admin_note = gr.Markdown("")
            gr.Markdown(SOURCES_NOTE)
            with gr.Row():
                self.show_sources = gr.Button("Show sources")
                self.source_id = gr.Textbox(label="Source (its first 12 characters or more)", scale=2)
                self.ban = gr.Button("Ban")
                self.clear = gr.Button("Clear flag")
            self.sources = gr.Dataframe(interactive=False, wrap=True, visible=False, elem_id="sources")

    @property
    def outputs(self) -> list:
        """The components `dashboard` fills but the last (the Data tab's summary)."""
        return [
            self.status,
            self.curve_row,
            self.plot_acc,
            self.plot_rl,
            self.caption_acc,
            self.caption_rl,
            self.board,
            self.versions,
        ]

    def refresh(self, sent: dict | None):
        """Fresh numbers for this browser: each part that changed since it was last sent, gr.skip() for the rest."""
        parts, sent = dashboard_parts(self.service), dict(sent or {})
        out = []
        for name, (key, build) in parts.items():
            if name == "summary":
                continue
            out.append(gr.skip() if sent.get(name) == key else build())
            sent[name] = key
        return (*out, sent)

    def deactivate(self, evt: gr.SelectData):
        """Another tab was opened: stop polling (the Training tab's own select turns the timer back on)."""
        return gr.Timer(active=evt.value == self.tab.label)

    def _admin(self, action: str):
        def run(token, version, profile: gr.OAuthProfile | None = None):
            require_admin(self.cfg, token, profile)
            trainer = self.service.trainer
            if trainer is None:
                raise refused("Training is not running in this app (started with --no-train).")
            with UserError():
                return trainer.request_round() if action == "train" else trainer.rollback(version)

        return run

    def _sources(self, token, profile: gr.OAuthProfile | None = None):
        """Admin: every source that voted, its share, status and evidence."""
        require_admin(self.cfg, token, profile)
        rows = source_rows(self.service.dashboard.sources())
        note = "" if rows else "No votes with a known source yet."
        return gr.Dataframe(pd.DataFrame(rows, columns=SOURCE_COLUMNS), visible=bool(rows)), note

    def _source_action(self, status: str):
        def run(token, source, profile: gr.OAuthProfile | None = None):
            require_admin(self.cfg, token, profile)
            by = getattr(profile, "username", None) or "admin token"
            with UserError():
                said = self.service.set_source_status(str(source or ""), status, by=by)
            table, _ = self._sources(token, profile)
            return table, said

        return run


class VersionNotice:
    """A banner above the tabs, once per browser per version: "v0002 is live: trained on 16 votes, yours included"."""

    def __init__(self, service: Service, secret: str):
        self.service = service
        # The last version this browser was told about (or found live on its first visit), kept in localStorage.
        self.seen = gr.BrowserState({"version": ""}, storage_key="rlhf_live_seen", secret=secret)
        with gr.Row(visible=False, elem_id="new-version") as self.row:
            self.text = gr.Markdown("", elem_id="new-version-text")
            self.ok = gr.Button("OK", size="sm", scale=0, min_width=80, elem_id="new-version-ok")
        self.timer = gr.Timer(REFRESH_S)

    def wire(self, demo: gr.Blocks, client: gr.BrowserState) -> None:
        """Check on page load and on every tick; OK hides the banner."""
        io = ([self.seen, client], [self.row, self.text, self.seen])
        demo.load(self.check, *io, **QUIET)
        self.timer.tick(self.check, *io, **QUIET)
        self.ok.click(lambda: gr.Row(visible=False), None, [self.row], **QUIET)

    def check(self, seen, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Show the banner when the live version is new to this browser; its first visit only records the version."""
        version, seen = self.service.policy.version, dict(seen or {})
        if seen.get("version") == version:
            return gr.skip(), gr.skip(), gr.skip()
        first, seen["version"] = not seen.get("version"), version
        if first or version == BASE:
            return gr.skip(), gr.skip(), seen
        notice = self.service.dashboard.live_notice(voter_of(self.service, client_value, request, profile))
        return gr.Row(visible=True), notice_text(notice), seen


def notice_text(notice: dict) -> str:
    """The banner's sentence for `Service.live_notice`."""
    votes, text = notice.get("votes"), f"🆕 **{notice['version']} is live**"
    if votes:
        text += f": trained on {votes} vote{'s' if votes != 1 else ''}" + (
            ", yours included" if notice["yours"] else ""
        )
    return text + f". Its answers are marked “written by {notice['version']}”."


# --- the tab's content ------------------------------------------------------------------------------------------


def dashboard_parts(service: Service, now: float | None = None) -> dict:
    """Each output of the tab (then the Data tab's summary) as (key, build): equal keys build equal values."""
    now = time.time() if now is None else now
    status = service.dashboard.status()
    curve = service.dashboard.learning_curve()
    quality, drift, notes = curve_rows(curve)
    # Each round's tick says which version it made, and whether the gate refused it or the owner took it back.
    rounds = [(row["round"], f"{row['round']}\n{row['version']}" + ROUND_NOTES.get(row["status"], "")) for row in curve]
    board = board_rows(service.dashboard.leaderboard())
    versions = version_rows(status["versions"])
    text = status_text(status, now)
    captions = (caption(CAPTION_QUALITY, notes), CAPTION_DRIFT)
    shown = bool(curve)
    return {
        "status": (text, lambda: text),
        "curve": (shown, lambda: gr.Row(visible=shown)),
        "plot_acc": (("q", rounds, quality), lambda: figure(("q", rounds, quality), quality_fig)),
        "plot_rl": (("d", rounds, drift), lambda: figure(("d", rounds, drift), drift_fig)),
        "caption_acc": (captions[0], lambda: captions[0]),
        "caption_rl": (captions[1] if drift else "", lambda: captions[1] if drift else ""),
        "board": (board, lambda: pd.DataFrame(board, columns=BOARD_COLUMNS)),
        "versions": (versions, lambda: pd.DataFrame(versions, columns=VERSION_COLUMNS)),
        "summary": (None, lambda: data_summary(status)),
    }


def dashboard(service: Service, now: float | None = None) -> tuple:
    """Everything the Training tab shows, then the Data tab's summary, from one status read."""
    return tuple(build() for _, build in dashboard_parts(service, now).values())
