"""The Training tab: trainer state, the learning curve, the leaderboard, the versions table and the admin controls.

Knows how the service's status, learning curve and leaderboard become Markdown, plots and tables (`dashboard`, also
used for the Data tab's counts) and checks the admin token inside each admin handler; knows nothing of chat.
"""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from ..config import Config
from ..service import Service
from .common import PRIVATE, UserError, admin_users, require_admin
from .data import data_summary


class TrainingTab:
    """Builds the Training tab inside the current gr.Blocks and wires the admin controls."""

    def __init__(self, service: Service, cfg: Config):
        self.service, self.cfg = service, cfg
        with gr.Tab("Training", id="training") as self.tab:
            self._layout()
        self.train_now.click(self._admin("train"), [self.token, self.rollback_to], [self.admin_note], **PRIVATE)
        self.rollback.click(self._admin("rollback"), [self.token, self.rollback_to], [self.admin_note], **PRIVATE)

    def _layout(self) -> None:
        self.status = gr.Markdown("", elem_id="train-status")
        with gr.Row(visible=False) as self.curve_row:
            title = "Learning curve: people's win-rate (Compare) and reward-model accuracy"
            self.plot_acc = gr.LinePlot(x="round", y="value", color="metric", title=title, y_lim=[0, 1], height=280)
            title = "KL to the base model and PPO score"
            self.plot_rl = gr.LinePlot(x="round", y="value", color="metric", title=title, height=280)
        gr.Markdown("### Leaderboard: human win-rate per version (Compare votes between versions)")
        self.board = gr.Dataframe(interactive=False, wrap=True)
        gr.Markdown("### Versions")
        self.versions = gr.Dataframe(interactive=False, wrap=True)
        with gr.Accordion("Admin", open=False, visible=bool(self.cfg.admin_token or admin_users(self.cfg))):
            self.token = gr.Textbox(label="Admin token", type="password")
            with gr.Row():
                self.train_now = gr.Button("Train now")
                self.rollback_to = gr.Textbox(label="Roll back to version (e.g. v0002)", scale=2)
                self.rollback = gr.Button("Roll back")
            self.admin_note = gr.Markdown("")
        self.refresh = gr.Button("Refresh", size="sm")

    @property
    def outputs(self) -> list:
        """The components `dashboard` fills, but the Data tab's summary (added by the composition)."""
        return [self.status, self.curve_row, self.plot_acc, self.plot_rl, self.board, self.versions]

    def _admin(self, action: str):
        def run(token, version, profile: gr.OAuthProfile | None = None):
            require_admin(self.cfg, token, profile)
            trainer = self.service.trainer
            if trainer is None:
                raise gr.Error("Training is not running in this app (started with --no-train).")
            with UserError():
                return trainer.request_round() if action == "train" else trainer.rollback(version)

        return run


def _learner(version: dict) -> str:
    """Which learner made a version (versions from before the choice existed were PPO's)."""
    return ((version.get("metrics") or {}) if isinstance(version.get("metrics"), dict) else {}).get("learner", "ppo")


def _status_lines(status: dict, has_curve: bool) -> list[str]:
    """The trainer's state, the live version and when the next round starts, as Markdown lines."""
    trainer = status["trainer"]
    progress = f" ({trainer['progress']})" if trainer.get("progress") else ""
    lines = [
        f"**Live version:** `{status['live_version']}`  ·  **Trainer:** {trainer.get('state', 'unknown')}{progress}"
        f"  ·  **Engine:** {status.get('engine', 'torch')}",
        f"**Votes since the last round:** {status['votes_since_last_round']}",
    ]
    running = trainer.get("running")
    if not running:
        lines.append(
            "_Training is not running in this app: votes are collected and can be trained on with "
            "`rlhf-live train --once`._"
        )
    if trainer.get("last_error"):
        lines.append(f"**Last training error:** {html.escape(str(trainer['last_error']))}")
    left = max(0, status["votes_per_round"] - status["votes_since_last_round"])
    votes = f"{left} more vote{'s' if left != 1 else ''}"
    if not has_curve:
        first = f" {votes} (thumbs or Compare choices) start the first one; the learning curve appears here after it."
        lines.append("**No training round yet.**" + (first if running else ""))
    elif running:
        lines.append(f"**Next round** after {votes}.")
    return lines


def dashboard(service: Service) -> tuple:
    """Everything the Training tab shows, then the Data tab's summary, from one status read."""
    status = service.status()
    acc_rows, rl_rows = curve_rows(service.learning_curve())
    frame = lambda rows: pd.DataFrame(rows or [], columns=["round", "value", "metric"])  # noqa: E731
    columns = ["version", "status", "learner", "parent", "created"]
    versions = pd.DataFrame(
        [{**{k: v.get(k) for k in columns if k != "learner"}, "learner": _learner(v)} for v in status["versions"]],
        columns=columns,
    )
    board_columns = ["version", "rating", "lower", "upper", "battles", "win_rate"]
    board = pd.DataFrame(service.leaderboard() or [], columns=board_columns)
    text = "\n\n".join(_status_lines(status, bool(acc_rows or rl_rows)))
    curve = gr.Row(visible=bool(acc_rows or rl_rows))
    return text, curve, frame(acc_rows), frame(rl_rows), board, versions, data_summary(status)


def curve_rows(curve: list[dict]) -> tuple[list[dict], list[dict]]:
    """Long-format rows for the two learning-curve plots (a missing value leaves a gap, not a zero)."""
    rates, drift = [], []
    for row in curve:
        for key, rows, name in (
            ("win_rate_vs_base", rates, "people: vs base"),
            ("win_rate_vs_earlier", rates, "people: vs earlier versions"),
            ("reward_accuracy", rates, "reward model accuracy (held-out votes)"),
            ("kl", drift, "KL to base (nats/answer)"),
            ("ppo_score", drift, "PPO score (normalised reward)"),
        ):
            if row.get(key) is not None:
                rows.append({"round": row["round"], "value": float(row[key]), "metric": name})
    return rates, drift
