"""The Training tab's plots and tables: the learning curve (only values from enough votes), the leaderboard, the
versions and the admins' sources, as matplotlib figures and rows.

Knows the dashboard's rows and how to draw them honestly (whole rounds, markers, captions saying what was left out);
knows nothing of requests or the trainer.
"""

from __future__ import annotations

import base64
import io
import math

from gradio.components.plot import PlotData

from rlhf_live.serving.dashboard import learner_of
from rlhf_live.serving.leaderboard import MIN_BATTLES, MIN_VOTES
from rlhf_live.ui.dashboard_text import short_time

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


def quality_fig(fig, rounds: list[tuple[int, str]], series: dict) -> None:
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


def drift_fig(fig, rounds: list[tuple[int, str]], series: dict) -> None:
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
    return learner_of(version.get("metrics"))


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
