"""What the Training tab and /status show: the live version and since when, the trainer's state, counts, the
leaderboard and learning curve of versions, and the admins' table of sources.

Knows the store's rows, the policy's version and the trainer's status (read only); knows nothing of Gradio and changes
nothing.
"""

from __future__ import annotations

from rlhf_live.config import Config
from rlhf_live.model.lora import BASE
from rlhf_live.serving.leaderboard import Battle, head_to_head, leaderboard
from rlhf_live.serving.policy import Policy
from rlhf_live.store import Store, StoreError


def learner_of(metrics) -> str:
    """Which learner made a version, from its metrics (versions from before the choice existed were PPO's)."""
    return (metrics if isinstance(metrics, dict) else {}).get("learner", "ppo")


class Dashboard:
    """Read-only figures of a running app (the leaderboard is recomputed only when votes change)."""

    def __init__(self, policy: Policy, store: Store, cfg: Config, trainer=None):
        self.policy, self.store, self.cfg, self.trainer = policy, store, cfg, trainer
        self._board: tuple[int, list[dict]] | None = None  # (watermark, leaderboard rows)
        self.remote_rounds: dict[int, dict] = {}
        """Rounds a trainer on another machine runs for this app: run id -> its last heartbeat (api/trainer.py)."""

    def forget(self) -> None:
        """Drop the cached leaderboard (votes were deleted without moving the watermark)."""
        self._board = None

    def sources(self) -> list[dict]:
        """Admin view: every source with votes or a status, its votes, share of them and the last contrarian test."""
        statuses = {row["source"]: row for row in self.store.source_rows()}
        counts = self.store.votes_by_source()
        total = sum(counts.values()) or 1
        rows = []
        for source in sorted(set(counts) | set(statuses), key=lambda s: (-counts.get(s, 0), s)):
            flag = statuses.get(source, {})
            tested = flag.get("votes", 0) > 0  # an admin's ban or clear alone carries no evidence
            rows.append(
                {
                    "source": source,
                    "votes": counts.get(source, 0),
                    "share": counts.get(source, 0) / total,
                    "status": flag.get("status", "counted"),
                    "log_odds": flag["log_odds"] if tested else None,
                    "agree": flag["agree"] if tested else None,
                    "by": flag.get("by", ""),
                }
            )
        return rows

    # --- status ----------------------------------------------------------------------------------------------
    def _battles(self) -> list[Battle]:
        winner = {"A": "a", "B": "b", "tie": "tie"}
        return [Battle(r["a_source"], r["b_source"], winner[r["choice"]]) for r in self.store.version_battles()]

    def leaderboard(self) -> list[dict]:
        """Bradley-Terry ratings of versions from Compare votes between versions (recomputed only when votes change),
        then every live or retired version without such votes yet (rating None, 0 battles); each row has its status."""
        # The bootstrap costs seconds of CPU at 20 versions, and every page load and tab switch asks for it.
        mark = self.store.watermark()
        cached = self._board
        if cached is None or cached[0] != mark:
            cached = self._board = (mark, leaderboard(self._battles()))
        status = {a["version"]: a["status"] for a in self.store.adapters()}
        rows = [
            {**r, "status": status.get(r["version"], "original" if r["version"] == BASE else "")} for r in cached[1]
        ]
        rated = {r["version"] for r in rows}
        for version, state in reversed(status.items()):  # newest first
            if state in ("live", "retired") and version not in rated:
                rows.append(
                    {"version": version, "rating": None, "lower": None, "upper": None, "battles": 0, "win_rate": None}
                    | {"status": state}
                )
        return rows

    def learning_curve(self) -> list[dict]:
        """One row per trained version, oldest first: people's win-rates against the base and against earlier
        versions (Compare votes), the reward model's held-out accuracy and KL to the base of its round."""
        battles, rows, earlier = self._battles(), [], {BASE}
        for n, version in enumerate(self.store.adapters(), start=1):
            name, metrics = version["version"], version.get("metrics") or {}
            vs_base, n_base = head_to_head(battles, name, {BASE})
            vs_earlier, n_earlier = head_to_head(battles, name, earlier)
            rows.append(
                {
                    "round": n,
                    "version": name,
                    "status": version["status"],
                    "win_rate_vs_base": vs_base,
                    "votes_vs_base": n_base,
                    "win_rate_vs_earlier": vs_earlier,
                    "votes_vs_earlier": n_earlier,
                    "reward_accuracy": metrics.get("reward/accuracy"),
                    "reward_pairs": metrics.get("reward/n_eval_pairs"),  # held-out A/B pairs the accuracy is from
                    "learner": learner_of(metrics),
                    "kl": metrics.get("sample/kl", metrics.get("ppo/kl")),
                    "ppo_score": metrics.get("ppo/score"),
                }
            )
            earlier.add(name)
        return rows

    def trained_on(self, version: str, voter: str | None = None) -> int | None:
        """How many votes (of everyone, or of `voter`) the round that made `version` trained on; None if unknown."""
        try:
            metrics = self.store.adapter(version)["metrics"]
        except StoreError:  # the base model, or a version this DB does not know
            return None
        if "watermark" not in metrics:
            return None
        # Reward-model learners (PPO, rm-dpo) fit on every vote up to the round's watermark; DPO/KTO on new ones only.
        return self.store.votes_between(int(metrics.get("votes_since", 0)), int(metrics["watermark"]), voter)

    def live_notice(self, voter: str | None = None) -> dict:
        """What serves now, for the "new version is live" notice: version, votes it trained on, whether `voter`'s
        votes were among them (None where unknown, e.g. the base model)."""
        version = self.policy.version
        votes = self.trained_on(version)
        yours = bool(self.trained_on(version, voter)) if votes and voter else None
        return {"version": version, "votes": votes, "yours": yours}

    def _live_since(self, version: str, versions: list[dict], runs: list[dict]) -> str | None:
        """When `version` went live: the end of the round that made it, else its row's last change (None: base)."""
        for run in runs:
            if run.get("status") == "ok" and (run.get("metrics") or {}).get("version") == version:
                return run.get("finished")
        row = next((v for v in versions if v["version"] == version), None)
        return row["updated"] if row else None

    def status(self) -> dict:
        """Live version, trainer state, counts, last runs and versions: what the dashboard and /status show."""
        stats = self.store.stats()
        trainer = self.trainer.status() if self.trainer is not None else {"state": "not running", "running": False}
        versions = self.store.adapters()
        live = self.policy.version
        # Without a trainer here (a `train --watch` process may run beside), votes count from the live version's round.
        if self.trainer is not None:
            since = trainer.get("watermark") or 0
        else:
            live_row = next((v for v in versions if v["version"] == live), None)
            since = ((live_row or {}).get("metrics") or {}).get("watermark", 0)
        rounds = [r for r in stats["last_runs"] if r["kind"] == "round" and r["status"] != "running"]
        done = [r for r in rounds if r["status"] == "ok" and "seconds/round" in (r.get("metrics") or {})]
        elsewhere = [r for r in self.store.running_runs() if r["kind"] == "round"]
        flags = self.store.source_statuses().values()
        return {
            "live_version": live,
            "live_since": self._live_since(live, versions, stats["last_runs"]),
            "live_trained_on": self.trained_on(live),
            "engine": self.policy.engine_name,
            "engine_note": self.policy.engine_note,
            "trainer": trainer,
            # A round another process (`train --watch`) runs now: when it started.
            "round_running_since": elsewhere[0]["started"] if elsewhere else None,
            # A trainer on another machine (`train --watch --follow`): where, when last heard, what it was doing.
            "remote_trainer": max(self.remote_rounds.values(), key=lambda h: h["at"], default=None),
            # The newest finished round: {status, finished, error}; and how long the last successful one took.
            "last_round": {k: rounds[0].get(k) for k in ("status", "finished", "error")} if rounds else None,
            "last_round_s": done[0]["metrics"]["seconds/round"] if done else None,
            "votes_since_last_round": max(0, stats["watermark"] - int(since or 0)),
            "votes_per_round": self.cfg.train_min_new_votes,
            # Public deployments: distinct sources (accounts or addresses) of those votes, and how many a round needs.
            "sources_since_last_round": self.store.sources_between(int(since or 0), stats["watermark"]),
            "sources_per_round": self.cfg.sources_per_round() if self.cfg.public else 0,
            # Counts only, no ids: sources the contrarian test flagged, and those an admin banned (weight 0).
            "sources_flagged": list(flags).count("flagged"),
            "sources_banned": list(flags).count("banned"),
            "counts": stats["counts"],
            "votes": stats["votes"],
            "choices": stats["choices"],
            "last_runs": stats["last_runs"],
            # No server paths in what clients see (gradio_client also mistakes a path for a file to download).
            "versions": [{k: v for k, v in a.items() if k != "path"} for a in versions],
        }
