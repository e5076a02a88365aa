"""The Training tab: what the trainer is doing, the learning curve, the leaderboard, the versions, the admin controls;
and the notice, above the tabs, that a new version is live.

Knows how the service's status, learning curve and leaderboard become sentences, plots and tables (`dashboard`), how
the tab keeps itself fresh while it is open (a timer that sends only what changed) and checks the admin token inside
each admin handler; knows nothing of chat.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from datetime import datetime, timezone

import gradio as gr
import pandas as pd
from gradio.components.plot import PlotData

from rlhf_live.config import Config
from rlhf_live.model.lora import BASE
from rlhf_live.serving.leaderboard import MIN_BATTLES, MIN_VOTES
from rlhf_live.serving.service import Service
from rlhf_live.ui.common import PRIVATE, UserError, admin_users, refused, require_admin, voter_of
from rlhf_live.ui.data import data_summary

REFRESH_S = 5.0
"""How often the open Training tab, and every page's new-version notice, ask for news."""
QUIET = {**PRIVATE, "queue": False, "show_progress": "hidden"}
"""Timer ticks: cheap reads that skip the queue (never "queue full" for a poll) and show no spinner."""

STAGE_LABELS = {
    "fitting reward model": "fitting the reward model to the votes",
    "PPO": "PPO: improving the model against the reward model",
    "DPO": "DPO: learning directly from the A/B votes",
    "KTO": "KTO: learning directly from the 👍/👎 votes",
    "RM-DPO": "learning from pairs the reward model ranked",
    "evaluating": "sampling answers to check the new version",
    "publishing": "saving the new version",
    "gate": "checking the new version against the gate",
    "going live": "switching serving to the new version",
}
"""What each of the trainer's states (trainer.round_stages) means, for people."""

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
        "plot_acc": (("q", rounds, quality), lambda: figure(("q", rounds, quality), _quality_fig)),
        "plot_rl": (("d", rounds, drift), lambda: figure(("d", rounds, drift), _drift_fig)),
        "caption_acc": (captions[0], lambda: captions[0]),
        "caption_rl": (captions[1] if drift else "", lambda: captions[1] if drift else ""),
        "board": (board, lambda: pd.DataFrame(board, columns=BOARD_COLUMNS)),
        "versions": (versions, lambda: pd.DataFrame(versions, columns=VERSION_COLUMNS)),
        "summary": (None, lambda: data_summary(status)),
    }


def dashboard(service: Service, now: float | None = None) -> tuple:
    """Everything the Training tab shows, then the Data tab's summary, from one status read."""
    return tuple(build() for _, build in dashboard_parts(service, now).values())


def status_text(status: dict, now: float) -> str:
    """What is happening, in sentences: now (waiting / stage k of n, time left), the last refusal, what is live."""
    lines = [f"**Now:** {_now_sentence(status, now)}"]
    last = status.get("last_round") or {}
    since = status.get("live_since")
    if last.get("status") == "failed" and (status["live_version"] == BASE or (since or "") < (last["finished"] or "")):
        why = html.escape(str(last.get("error") or "no reason was recorded"))
        lines.append(f"**Last round** ({readable_time(last['finished'], now)}) did not go live: {why}")
    flagged, banned = status.get("sources_flagged", 0), status.get("sources_banned", 0)
    if flagged or banned:
        lines.append(
            f"**Left out of training:** {flagged} source{'s' if flagged != 1 else ''} flagged for voting against "
            f"everyone else (until an admin clears {'it' if flagged == 1 else 'them'}), {banned} banned."
        )
    if status["live_version"] == BASE:
        lines.append("**Live:** the original model; no trained version has gone live yet.")
    else:
        n = status.get("live_trained_on")
        votes = f", trained on {n} vote{'s' if n != 1 else ''}" if n is not None else ""
        when = f" since {readable_time(since, now)}" if since else ""
        lines.append(f"**Live:** {status['live_version']}{when}{votes}.")
    return "\n\n".join(lines)


def _now_sentence(status: dict, now: float) -> str:
    trainer = status["trainer"]
    state = trainer.get("state", "")
    if trainer.get("running") and state not in ("idle", ""):
        stage, stages = trainer.get("stage") or 0, trainer.get("stages") or 0
        where = f"stage {stage} of {stages}, " if stage and stages else ""
        detail = f" ({html.escape(trainer['progress'])})" if trainer.get("progress") else ""
        left = time_left(trainer, status.get("last_round_s"), now)
        return f"a training round is running: {where}{STAGE_LABELS.get(state, state)}{detail}; {left_words(left)}."
    new, per_round = status["votes_since_last_round"], status["votes_per_round"]
    so_far = f"{new} new vote{'s' if new != 1 else ''} since the last round"
    if not trainer.get("running"):
        started = status.get("round_running_since")
        if started:
            began = _epoch(started)
            left = max(0.0, status["last_round_s"] - (now - began)) if status.get("last_round_s") and began else None
            return f"a training round is running (started {readable_time(started, now)}); {left_words(left)}."
        if not new:
            return "training runs separately from this page; no new votes since the last round yet."
        return f"training runs separately from this page; {so_far} are waiting for the next round."
    left = max(0, per_round - new)
    if left:
        return (
            f"waiting for {left} more vote{'s' if left != 1 else ''} (👍/👎 or Compare choices) before the next "
            f"training round ({new} of {per_round} so far)."
        )
    sources, need = status.get("sources_since_last_round", 0), status.get("sources_per_round", 0)
    if sources < need:
        # A public deployment: one person's votes, however many sessions they open, never start a round alone.
        return (
            f"{so_far}, but they come from {sources} different {'person' if sources == 1 else 'people'} "
            f"(accounts or addresses): the next round waits for votes from at least {need}."
        )
    return f"{so_far}, enough for a round: it starts shortly."


def time_left(trainer: dict, last_round_s: float | None, now: float) -> float | None:
    """Seconds a running round still needs: its own pace within a counted stage (update i/m), or the last round's
    length minus the time so far, whichever is longer; None with neither."""
    started, stage_started = trainer.get("round_started"), trainer.get("stage_started")
    step, steps = trainer.get("step"), trainer.get("steps")
    stage_left = None
    if step and steps and stage_started and step >= 2:  # 'update i/m' is said as update i starts: i - 1 are done
        done = step - 1
        stage_left = (now - stage_started) / done * max(0, steps - done)
    if last_round_s and started:
        return max(last_round_s - (now - started), stage_left or 0.0)
    return stage_left


def left_words(seconds: float | None) -> str:
    """'about 3 min left', 'less than a minute left', 'no estimate of the time left yet'."""
    if seconds is None:
        return "no estimate of the time left yet (no earlier round to go by)"
    if seconds < 60:
        return "less than a minute left"
    return f"about {math.ceil(seconds / 60)} min left"


def _epoch(iso: str | None) -> float | None:
    try:
        moment = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def short_time(iso: str | None) -> str:
    """A stored ISO time as '2026-12-02 14:03 UTC' ('' if missing)."""
    moment = _epoch(iso)
    if moment is None:
        return ""
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def readable_time(iso: str | None, now: float) -> str:
    """A stored ISO time as '2026-12-02 14:03 UTC, 5 min ago'."""
    moment = _epoch(iso)
    if moment is None:
        return "an unknown time"
    ago = max(0.0, now - moment)
    if ago < 60:
        rel = "just now"
    elif ago < 3600:
        rel = f"{int(ago // 60)} min ago"
    elif ago < 86400:
        rel = f"{int(ago // 3600)} h ago"
    else:
        days = int(ago // 86400)
        rel = f"{days} day{'s' if days != 1 else ''} ago"
    return f"{short_time(iso)}, {rel}"


QUALITY = {
    "win_rate_vs_base": ("votes_vs_base", "people: win-rate vs the original model", "Compare votes"),
    "win_rate_vs_earlier": ("votes_vs_earlier", "people: win-rate vs earlier versions", "Compare votes"),
    "reward_accuracy": ("reward_pairs", "reward model: agreement with held-out votes", "held-out A/B pairs"),
}
"""Learning-curve series on the 0-1 plot: value key -> (its count's key, legend label, what it counts)."""
DRIFT = {"kl": "KL to the original model (nats per answer)", "ppo_score": "PPO score (reward model, normalised)"}


def curve_rows(curve: list[dict]) -> tuple[dict, dict, list[str]]:
    """The learning curve's points per series ({label: [(round, value)]}, series without points left out), for the
    quality and the drift plot, and a note per value left out for having fewer than MIN_VOTES votes."""
    quality: dict[str, list] = {}
    drift: dict[str, list] = {}
    few: dict[str, list] = {}
    for row in curve:
        for key, (count_key, label, _) in QUALITY.items():
            value, n = row.get(key), row.get(count_key)
            if value is None:
                continue
            if n is None or n < MIN_VOTES:
                few.setdefault(key, []).append(f"{'?' if n is None else n} in round {row['round']}")
            else:
                quality.setdefault(label, []).append((row["round"], float(value)))
        for key, label in DRIFT.items():
            if row.get(key) is not None:
                drift.setdefault(label, []).append((row["round"], float(row[key])))
    notes = [f"{QUALITY[k][1].split(': ')[1]} ({QUALITY[k][2]}: {', '.join(v)})" for k, v in few.items()]
    return quality, drift, notes


def caption(text: str, notes: list[str]) -> str:
    """A plot's caption, plus which values were left out and why."""
    if not notes:
        return text
    return text + f"  \n*Left out for having fewer than {MIN_VOTES}:* " + "; ".join(notes) + "."


_FIGURES: dict[str, tuple] = {}
"""The last figure drawn per plot, by its data: several open tabs cost one drawing."""


def figure(key: tuple, draw) -> PlotData:
    """The plot for `key` = (name, rounds, series) as a PNG, drawn by `draw(figure, rounds, series)` once."""
    name, rounds, series = key
    cached = _FIGURES.get(name)
    if cached and cached[0] == key:
        return cached[1]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2, 3.0), dpi=100, layout="constrained")
    draw(fig, rounds, series)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plot = PlotData(type="matplotlib", plot="data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    _FIGURES[name] = (key, plot)
    return plot


ROUND_NOTES = {"candidate": "\n(refused)", "rolled_back": "\n(taken back)"}


def _rounds_axis(ax, rounds: list[tuple[int, str]]) -> None:
    """Whole rounds on the x axis, one labelled tick each (thinned past 12), with room around a single round."""
    numbers = [n for n, _ in rounds] or [1]
    ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
    shown = rounds[:: max(1, math.ceil(len(rounds) / 12))]
    ax.set_xticks([n for n, _ in shown], [label for _, label in shown], fontsize=8)
    ax.set_xlabel("training round")
    ax.grid(alpha=0.3)


def _series(ax, series: dict) -> None:
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)


def _quality_fig(fig, rounds: list[tuple[int, str]], series: dict) -> None:
    ax = fig.add_subplot()
    ax.set_title("Is each version better?", fontsize=11)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    _series(ax, series)
    _rounds_axis(ax, rounds)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    if series:
        ax.legend(fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.7, f"No point has {MIN_VOTES} votes yet", ha="center", transform=ax.transAxes, color="grey")


def _drift_fig(fig, rounds: list[tuple[int, str]], series: dict) -> None:
    axes = fig.subplots(len(series) or 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].set_title("How far did training move the model?", fontsize=11)
    for ax, (label, points) in zip(axes, series.items()):
        _series(ax, {label: points})
        ax.margins(y=0.25)  # room for the legend above the highest point
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    if not series:
        axes[0].text(
            0.5, 0.5, "No KL or PPO score recorded yet", ha="center", transform=axes[0].transAxes, color="grey"
        )
    _rounds_axis(axes[-1], rounds)


SOURCE_COLUMNS = ["source", "votes", "share of all votes", "status", "evidence (log odds)", "agrees with others", "by"]


def source_rows(sources: list[dict]) -> list[list]:
    """The admin's sources table: a 12-character id, votes, share, status and the last contrarian test."""
    return [
        [
            s["source"][:12],
            s["votes"],
            f"{s['share']:.0%}",
            s["status"],
            "–" if s.get("log_odds") is None else f"{s['log_odds']:+.1f}",
            "–" if s.get("agree") is None else f"{s['agree']:.0%}",
            s.get("by") or "",
        ]
        for s in sources
    ]


BOARD_COLUMNS = ["version", "status", "rating", "95% interval", "votes between versions", "win rate"]
VERSION_COLUMNS = ["version", "status", "learner", "parent", "created", "sources", "largest source's share"]


def board_rows(board: list[dict]) -> list[list]:
    """Leaderboard rows as people read them: whole ratings, an interval only from MIN_BATTLES votes, a percentage."""
    rows = []
    for r in board:
        if r.get("rating") is None:
            rating, interval, rate = "–", "no votes yet", "–"
        else:
            rating = f"{r['rating']:.0f}"
            interval = (
                f"{r['lower']:.0f} – {r['upper']:.0f}"
                if r.get("lower") is not None
                else f"needs {MIN_BATTLES} votes ({r['battles']} so far)"
            )
            rate = f"{r['win_rate']:.0%}"
        rows.append([r["version"], r.get("status", ""), rating, interval, r["battles"], rate])
    return rows


def _learner(version: dict) -> str:
    """Which learner made a version (versions from before the choice existed were PPO's)."""
    return ((version.get("metrics") or {}) if isinstance(version.get("metrics"), dict) else {}).get("learner", "ppo")


def _crowd(version: dict) -> tuple[str, str]:
    """(sources, largest share) of the votes a version was trained on, '–' where it was not recorded (off --public)."""
    metrics = version.get("metrics") if isinstance(version.get("metrics"), dict) else {}
    what = "reward" if f"crowd/{_learner(version)}_sources" not in metrics else _learner(version)
    n, share = metrics.get(f"crowd/{what}_sources"), metrics.get(f"crowd/{what}_largest_share")
    return ("–" if n is None else str(n)), ("–" if share is None else f"{share:.0%}")


def version_rows(versions: list[dict]) -> list[list]:
    """The versions table, newest first, with readable times and the sources each version learned from."""
    return [
        [
            v["version"],
            v["status"],
            _learner(v),
            v.get("parent") or "original",
            short_time(v.get("created")),
            *_crowd(v),
        ]
        for v in reversed(versions)
    ]
