"""The Training tab's words: one true sentence about what the trainer does now, and times people read.

Knows the shape of the dashboard's status (serving/dashboard.py) and how to say it; knows nothing of Gradio.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone

from rlhf_live.model.lora import BASE

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
            remote = status.get("remote_trainer")  # a trainer on another machine that follows this app
            where = ""
            if remote:
                ago = max(0, round(now - remote["at"]))
                stage = STAGE_LABELS.get(remote.get("stage"), remote.get("stage") or "starting")
                where = f" on {html.escape(remote['owner'])}, {html.escape(stage)}, last heard {ago} s ago"
            return f"a training round is running{where} (started {readable_time(started, now)}); {left_words(left)}."
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
