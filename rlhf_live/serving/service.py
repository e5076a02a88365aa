"""What each user request does: check it, generate with the policy, record it in the store, report status.

Knows Policy, Store and the trainer's status; knows nothing of Gradio (ui.py and the HTTP API both call it, and so
does the simulated rater, so people and simulations go through the same code).
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhf_live.config import Config
from rlhf_live.eval.leaderboard import Battle, head_to_head, leaderboard
from rlhf_live.learning import crowd
from rlhf_live.serving.policy import BASE, AdapterError, GenerationSettings, InvalidRequest, Policy
from rlhf_live.store import Store, StoreError, source_id, voter_id

USER_ERRORS = (StoreError, InvalidRequest, AdapterError)
"""Errors whose message is meant for the person who made the request."""

COMPARE_MODES = {
    "samples": "Two answers of the live model",
    "previous": "Live model vs its previous version",
    "base": "Live model vs the original (base) model",
}

COMPARE_UNAVAILABLE = {
    "previous": "Needs an earlier trained version: it applies once a second version has gone live.",
    "base": "The live model is still the base model: it applies once a trained version has gone live.",
}
"""Why a comparison mode cannot apply yet (shown before a request, not as an error after it)."""

PICK_AFTER_TOKENS = 16
"""Tokens of every candidate after which Compare picks the two to show (enough to tell answers apart)."""
PICK_WITHIN_S = 0.6
"""Seconds after which Compare picks with what exists, so the page shows text within a second on 2 cores."""


@dataclass(frozen=True)
class Caller:
    """Who makes a request: the voter (whose conversations), the source (whose influence) and whether signed in."""

    voter: str
    """Salted id of the browser, API session or signed-in account: owns conversations and votes."""
    source: str = ""
    """Salted id of the signed-in account, else of the network address: what limits and round budgets count."""
    signed_in: bool = False
    """A Hugging Face sign-in stands behind the request (Config.vote_requires_login)."""


def _caller(voter: str | Caller) -> Caller:
    return voter if isinstance(voter, Caller) else Caller(voter)


LOGIN_TO_VOTE = "Votes on this deployment need a Hugging Face sign-in: sign in at the top of the page, then vote."
BANNED = "This deployment's admins no longer accept votes from your address or account; chatting still works."


class Service:
    """The app's requests, independent of how they arrive (browser, HTTP API, simulation)."""

    def __init__(self, policy: Policy, store: Store, cfg: Config, trainer=None):
        self.policy, self.store, self.cfg, self.trainer = policy, store, cfg, trainer
        self._salt = store.voter_salt()
        self._rng = random.Random()
        self._recent: dict[str, collections.deque] = {}  # voter -> times of their requests in the last minute
        self._recent_lock = threading.Lock()
        self._board: tuple[int, list[dict]] | None = None  # (watermark, leaderboard rows)

    def voter(self, session_key: str, username: str | None = None) -> str:
        """Salted id of a browser session or logged-in user; the raw key is never stored."""
        return voter_id(session_key, username, self._salt)

    def caller(self, session_key: str, address: str = "", username: str | None = None) -> Caller:
        """The Caller behind a request: salted voter and source ids (raw keys and addresses are never stored)."""
        return Caller(
            self.voter(session_key, username), source_id(address, username, self._salt), signed_in=bool(username)
        )

    def _limit(self, who: str | Caller) -> None:
        """Refuse a request past the per-minute limits: per voter, and on a public deployment per source too."""
        who = _caller(who)
        self._limit_key(who.voter, self.cfg.max_requests_per_minute, "")
        if self.cfg.public and who.source:
            # Fresh sessions are free to mint; addresses and accounts are not: one person with many tabs shares this.
            self._limit_key(who.source, self.cfg.max_source_requests_per_minute, " from your address or account")

    def _limit_key(self, key: str, limit: int, whose: str) -> None:
        """One sliding-minute limit (0 = no limit) on `key`."""
        if limit <= 0:
            return
        now = time.monotonic()
        with self._recent_lock:
            times = self._recent.setdefault(key, collections.deque())
            while times and now - times[0] > 60:
                times.popleft()
            if len(times) >= limit:
                wait = 60 - (now - times[0])
                raise InvalidRequest(f"Too many requests{whose}: at most {limit} a minute. Please wait {wait:.0f} s.")
            times.append(now)
            if len(self._recent) > 10_000:  # forget voters idle for a minute, so the map stays small
                self._recent = {v: t for v, t in self._recent.items() if t and now - t[-1] <= 60}

    # --- chat ------------------------------------------------------------------------------------------------
    def _settings(self, settings: GenerationSettings | None, system_prompt: str | None = None) -> GenerationSettings:
        s = settings or GenerationSettings.from_config(self.cfg)
        if not 1 <= s.max_new_tokens <= 4096:
            raise InvalidRequest("max_new_tokens must be between 1 and 4096.")
        if not 0 <= s.temperature <= 2 or not 0 < s.top_p <= 1:
            raise InvalidRequest("temperature must be in [0, 2] and top_p in (0, 1].")
        if system_prompt is not None:
            s.system_prompt = system_prompt
        if len(s.system_prompt or "") > self.cfg.max_system_prompt_chars:
            raise InvalidRequest(
                f"The system prompt is {len(s.system_prompt):,} characters long; the limit is "
                f"{self.cfg.max_system_prompt_chars:,}. Please shorten it."
            )
        return s

    def _start_turn(self, voter: str | Caller, message: str, conversation_id: str, parent_id: str | None, settings):
        """Validate, then record the user's message; return (conversation_id, user message id, prompt, settings)."""
        self._limit(voter)
        who = _caller(voter)
        voter = who.voter
        text = self.policy.check_message(message)
        conversation_id = "" if conversation_id is None else conversation_id
        if not isinstance(conversation_id, str):
            raise InvalidRequest("The conversation id must be text (or empty to start a new conversation).")
        if conversation_id:
            conv = self.store.conversation(conversation_id, session_id=voter)
            if parent_id is None and conv["messages"]:
                parent_id = conv["messages"][-1]["id"]
            elif parent_id is not None and parent_id not in {m["id"] for m in conv["messages"]}:
                raise InvalidRequest("That message is not part of this conversation.")
            turns = sum(m["role"] == "user" for m in self.store.context(parent_id)) + 1 if parent_id else 0
            if turns > self.cfg.max_turns:
                raise InvalidRequest(
                    f"This conversation has reached {self.cfg.max_turns} turns, the limit: please start a new one."
                )
            settings = self._settings(settings, conv["system_prompt"])
        else:
            settings = self._settings(settings)
            conversation_id = self.store.new_conversation(voter, system_prompt=settings.system_prompt, asker=who.source)
            parent_id = None
        user_id = self.store.add_message(conversation_id, "user", text, parent_id=parent_id)
        prompt = [*self.store.context(user_id), {"role": "user", "content": text}]
        return conversation_id, user_id, prompt, settings

    def _record_answer(self, conversation_id, user_id, answer, settings) -> str:
        return self.store.add_message(
            conversation_id,
            "assistant",
            answer.text,
            parent_id=user_id,
            adapter_version=answer.adapter_version,
            settings=settings.as_dict(),
            finish_reason=answer.finish_reason,
            n_tokens=len(answer.token_ids),
        )

    def chat(
        self,
        voter: str | Caller,
        message: str,
        conversation_id: str = "",
        *,
        parent_id: str | None = None,
        settings=None,
    ) -> Iterator[dict]:
        """Stream one answer: dicts with the text so far; the last one has response_id (the answer is stored)."""
        cid, user_id, prompt, settings = self._start_turn(voter, message, conversation_id, parent_id, settings)
        yield from self._answer(cid, user_id, prompt, settings)

    def retry(
        self, voter: str | Caller, response_id: str, settings: GenerationSettings | None = None
    ) -> Iterator[dict]:
        """Stream a new answer to the same user message as `response_id` (a sibling; the old one stays stored)."""
        self._limit(voter)
        voter = _caller(voter).voter
        old = self.store.message(response_id)
        conv = self.store.conversation(old["conversation_id"], session_id=voter)
        if old["role"] != "assistant" or not old["parent_id"]:
            raise InvalidRequest("Only an answer can be retried.")
        settings = self._settings(settings, conv["system_prompt"])
        user = self.store.message(old["parent_id"])
        prompt = [*self.store.context(user["id"]), {"role": "user", "content": user["content"]}]
        yield from self._answer(conv["id"], user["id"], prompt, settings)

    def _answer(self, cid, user_id, prompt, settings) -> Iterator[dict]:
        stream = self.policy.stream(prompt, settings)
        version = stream.answers[0].adapter_version
        try:
            for (text,) in stream:
                yield {
                    "conversation_id": cid,
                    "text": text,
                    "response_id": None,
                    "adapter_version": version,
                    "user_message_id": user_id,
                }
        finally:
            stream.cancel()
            (answer,) = stream.answers
            # Recorded even when the browser went away mid-answer (finish_reason 'cancelled'): nothing is lost.
            response_id = self._record_answer(cid, user_id, answer, settings)
        yield {
            "conversation_id": cid,
            "text": answer.text,
            "response_id": response_id,
            "adapter_version": version,
            "user_message_id": user_id,
            "finish_reason": answer.finish_reason,
        }

    def _vote_check(self, who: Caller) -> None:
        if self.cfg.vote_requires_login and not who.signed_in:
            raise InvalidRequest(LOGIN_TO_VOTE)
        if who.source and self.store.source_statuses().get(who.source) == "banned":
            raise InvalidRequest(BANNED)
        self._limit(who)

    def feedback(self, voter: str | Caller, response_id: str, value: str, reason: str = "") -> dict:
        """Thumb up/down or clear one answer (one row per answer and voter, updated in place)."""
        # Only the session that owns the conversation may thumb its answers (as with retry, history and choose).
        who = _caller(voter)
        self._vote_check(who)
        row = self.store.record_feedback(
            response_id, who.voter, value, reason or "", session_id=who.voter, source=who.source
        )
        return {"ok": True, "response_id": response_id, "value": row["value"]}

    def answers_to(self, voter: str, conversation_id: str, message_id: str) -> list[str]:
        """Ids of every stored answer to one user message (Retry's siblings included), oldest first."""
        conv = self.store.conversation(conversation_id, session_id=voter)
        return [m["id"] for m in conv["messages"] if m["parent_id"] == message_id and m["role"] == "assistant"]

    def history(self, voter: str, conversation_id: str, leaf_id: str | None = None) -> list[dict]:
        """The branch ending at `leaf_id` (default: the newest message), with this voter's thumbs on answers."""
        conv = self.store.conversation(conversation_id, session_id=voter)
        by_id = {m["id"]: m for m in conv["messages"]}
        node = by_id.get(leaf_id) if leaf_id else (conv["messages"][-1] if conv["messages"] else None)
        path = []
        while node is not None:
            path.append(node)
            node = by_id.get(node["parent_id"])
        out = []
        for m in reversed(path):
            fb = self.store.feedback_value(m["id"], voter) if m["role"] == "assistant" else None
            out.append(
                {
                    "id": m["id"],
                    "role": m["role"],
                    "content": m["content"],
                    "adapter_version": m.get("adapter_version"),
                    "feedback": fb,
                }
            )
        return out

    # --- compare ---------------------------------------------------------------------------------------------
    def _compare_versions(self, mode: str) -> list[str | None]:
        live = self.policy.version
        refusal = self.compare_modes().get(mode)
        if refusal is None:
            raise InvalidRequest(f"Unknown comparison mode {mode!r}; use one of {', '.join(COMPARE_MODES)}.")
        if refusal:
            raise InvalidRequest(refusal)
        if mode == "samples":
            return [None, None]  # whatever serves when generation starts (a swap may come first)
        other = BASE
        if mode == "previous":
            prev = self._previous_version(live)
            if prev is None:  # removed since compare_modes looked
                raise InvalidRequest(COMPARE_UNAVAILABLE["previous"])
            self.policy.load_for_comparison(prev["path"], prev["version"])
            other = prev["version"]
        pair = [live, other]
        self._rng.shuffle(pair)  # hide which side is which until the vote
        return pair

    def _previous_version(self, live: str) -> dict | None:
        """The version that served before the live one, with its folder on disk (None if there is none)."""
        # Its parent if that was live once (retired), else the newest retired version; never a rejected candidate or
        # a rolled-back version.
        rows = {a["version"]: a for a in self.store.adapters()}
        usable = {v: a for v, a in rows.items() if a["status"] == "retired" and v != live and Path(a["path"]).is_dir()}
        parent = (rows.get(live) or {}).get("parent")
        if parent in usable:
            return usable[parent]
        return max(usable.values(), key=lambda a: a["version"], default=None)

    def compare_modes(self) -> dict[str, str]:
        """Each comparison mode -> '' where it applies now, else the sentence saying why not (for the UI, up front)."""
        live = self.policy.version
        return {
            "samples": "",
            "previous": "" if self._previous_version(live) else COMPARE_UNAVAILABLE["previous"],
            "base": "" if live != BASE else COMPARE_UNAVAILABLE["base"],
        }

    def compare(
        self,
        voter: str | Caller,
        message: str,
        conversation_id: str = "",
        *,
        parent_id: str | None = None,
        mode: str = "samples",
        settings: GenerationSettings | None = None,
    ) -> Iterator[dict]:
        """Stream two answers side by side; the last dict has pair_id and both response ids (sources hidden)."""
        # In "samples" mode with `compare_candidates` > 2, that many answers are sampled in one batch and the two shown
        # are picked by the reward model's uncertainty (`pick_pair`: double Thompson sampling), so that votes land where
        # they teach the most. The pick is made on the first PICK_AFTER_TOKENS tokens (or what exists after
        # PICK_WITHIN_S), so the two shown start streaming within a second; the others stop there. Until the pick,
        # updates carry a `note` saying how far the candidates are.
        versions = self._compare_versions(mode)
        cid, user_id, prompt, settings = self._start_turn(voter, message, conversation_id, parent_id, settings)
        voter = _caller(voter).voter
        n = max(2, self.cfg.compare_candidates) if mode == "samples" else 2
        stream = self.policy.stream(prompt, settings, n=n, versions=versions * (n // 2) + versions[: n % 2])
        shown: tuple[int, int] | None = (0, 1) if n == 2 else None
        started = time.monotonic()
        try:
            for texts in stream:
                if shown is None:
                    answers = stream.answers
                    # A finished candidate is whole, however short: it waits for no more tokens.
                    written = min((len(a.token_ids) for a in answers if not a.finish_reason), default=PICK_AFTER_TOKENS)
                    if written >= PICK_AFTER_TOKENS or time.monotonic() - started >= PICK_WITHIN_S:
                        shown = self._pick_pair(prompt, list(texts))
                        for k in set(range(n)) - set(shown):
                            stream.stop(k)
                    else:
                        tokens = sum(len(a.token_ids) for a in answers)
                        note = f"Writing {n} answers to pick the two worth your vote… ({tokens} tokens so far)"
                        yield {
                            "conversation_id": cid,
                            "pair_id": None,
                            "a": {"text": ""},
                            "b": {"text": ""},
                            "note": note,
                        }
                        continue
                i, j = shown
                yield {
                    "conversation_id": cid,
                    "pair_id": None,
                    "a": {"text": texts[i]},
                    "b": {"text": texts[j]},
                    "note": "",
                }
        finally:
            stream.cancel()
            if shown is None:
                shown = self._pick_pair(prompt, [x.text for x in stream.answers])
            a, b = stream.answers[shown[0]], stream.answers[shown[1]]
            a_id = self._record_answer(cid, user_id, a, settings)
            b_id = self._record_answer(cid, user_id, b, settings)
            pair_id = self.store.new_comparison(
                cid, a_id, b_id, a_source=a.adapter_version, b_source=b.adapter_version, voter=voter
            )
        yield {
            "conversation_id": cid,
            "pair_id": pair_id,
            "a": {"response_id": a_id, "text": a.text},
            "b": {"response_id": b_id, "text": b.text},
        }

    def _pick_pair(self, prompt: list[dict], answers: list[str]) -> tuple[int, int]:
        """Two of several answers: by the trainer's last reward model where there is one, else at random."""
        model = self.trainer.reward_model() if self.trainer is not None else None
        if model is None:
            ok = [i for i, a in enumerate(answers) if a.split()]
            i, j = self._rng.sample(ok if len(ok) >= 2 else list(range(len(answers))), 2)
            return i, j
        return model.pick_pair(prompt, answers, self._rng)

    def choose(self, voter: str | Caller, pair_id: str, choice: str, reason: str = "") -> dict:
        """Record the A/B choice (once; the pair then locks) and reveal both sources."""
        who = _caller(voter)
        self._vote_check(who)
        row = self.store.choose(pair_id, who.voter, choice, reason or "", source=who.source)
        return {"ok": True, "a_version": row["a_source"], "b_version": row["b_source"], "choice": row["choice"]}

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

    def set_source_status(self, source: str, status: str, by: str = "admin") -> str:
        """Admin: ban, clear or flag the source whose id starts with `source`; the sentence the admin reads."""
        full = self.store.resolve_source(source)
        self.store.set_source_status(full, status, by=by)
        what = {
            "banned": "its votes weigh nothing and new ones are refused",
            "cleared": "its votes count again and the contrarian test no longer flags it",
            "flagged": "its votes weigh nothing until it is cleared",
        }[status]
        return f"Source {full[:12]} is {status}: {what} (from the next training round)."

    def delete_my_data(self, voter: str) -> str:
        """Delete this person's conversations and votes; a sentence saying how many of each went."""
        n = self.store.delete_voter(voter)
        self._board = None
        return (
            f"Deleted {n['conversations']} conversation(s) with {n['messages']} message(s), {n['thumbs']} thumb(s) "
            f"and {n['comparisons']} comparison(s). Versions trained before now keep what they learned."
        )

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
                    "learner": metrics.get("learner", "ppo"),  # versions from before learners were PPO's
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
            # The newest finished round: {status, finished, error}; and how long the last successful one took.
            "last_round": {k: rounds[0].get(k) for k in ("status", "finished", "error")} if rounds else None,
            "last_round_s": done[0]["metrics"]["seconds/round"] if done else None,
            "votes_since_last_round": max(0, stats["watermark"] - int(since or 0)),
            "votes_per_round": self.cfg.train_min_new_votes,
            # Public deployments: distinct sources (accounts or addresses) of those votes, and how many a round needs.
            "sources_since_last_round": self.store.sources_between(int(since or 0), stats["watermark"]),
            "sources_per_round": crowd.sources_needed(self.cfg.min_round_sources, self.cfg.max_source_share)
            if self.cfg.public
            else 0,
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
