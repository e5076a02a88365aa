"""What each user request does: check it, generate with the policy, record it in the store, report status.

Knows Policy, Store and the trainer's status; knows nothing of Gradio (ui.py and the HTTP API both call it, and so
does the simulated rater, so people and simulations go through the same code).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

from rlhf_live.config import Config
from rlhf_live.model.lora import BASE, AdapterError
from rlhf_live.serving.callers import Caller, Callers, as_caller
from rlhf_live.serving.dashboard import Dashboard
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.settings import GenerationSettings, InvalidRequest
from rlhf_live.store import Store, StoreError

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


LOGIN_TO_VOTE = "Votes on this deployment need a Hugging Face sign-in: sign in at the top of the page, then vote."
BANNED = "This deployment's admins no longer accept votes from your address or account; chatting still works."


class Service:
    """The app's requests, independent of how they arrive (browser, HTTP API, simulation)."""

    def __init__(self, policy: Policy, store: Store, cfg: Config, trainer=None):
        self.policy, self.store, self.cfg, self.trainer = policy, store, cfg, trainer
        self._rng = random.Random()
        self.callers = Callers(store.voter_salt(), cfg)
        """Who asks (salted ids) and the per-minute limits."""
        self.dashboard = Dashboard(policy, store, cfg, trainer)
        """What the Training tab and /status show."""

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

    def _start_turn(
        self, voter: str | Caller, message: str, conversation_id: str, parent_id: str | None, settings, history=()
    ):
        """Validate, then record the user's message; return (conversation_id, user message id, prompt, settings).

        `history`: earlier turns a client sent with a new conversation (the OpenAI API), stored before the message.
        """
        self._limit(voter)
        who = as_caller(voter)
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
            for turn in history:  # a client's own record of the conversation; its answers carry no version of ours
                parent_id = self.store.add_message(conversation_id, turn["role"], turn["content"], parent_id=parent_id)
        user_id = self.store.add_message(conversation_id, "user", text, parent_id=parent_id)
        prompt = [*self.store.context(user_id), {"role": "user", "content": text}]
        return conversation_id, user_id, prompt, settings

    def record_answer(self, conversation_id, user_id, answer, settings) -> str:
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
        voter = as_caller(voter).voter
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
            response_id = self.record_answer(cid, user_id, answer, settings)
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
        who = as_caller(voter)
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
        voter = as_caller(voter).voter
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
            a_id = self.record_answer(cid, user_id, a, settings)
            b_id = self.record_answer(cid, user_id, b, settings)
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
        pair = model.pick_pair(prompt, answers, self._rng) if model is not None else None
        if pair is None:  # at random, non-blank answers where there are two
            ok = [i for i, a in enumerate(answers) if a.split()]
            pair = tuple(self._rng.sample(ok if len(ok) >= 2 else list(range(len(answers))), 2))
        return pair

    def choose(self, voter: str | Caller, pair_id: str, choice: str, reason: str = "") -> dict:
        """Record the A/B choice (once; the pair then locks) and reveal both sources."""
        who = as_caller(voter)
        self._vote_check(who)
        row = self.store.choose(pair_id, who.voter, choice, reason or "", source=who.source)
        return {"ok": True, "a_version": row["a_source"], "b_version": row["b_source"], "choice": row["choice"]}

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
        self.dashboard.forget()
        return (
            f"Deleted {n['conversations']} conversation(s) with {n['messages']} message(s), {n['thumbs']} thumb(s) "
            f"and {n['comparisons']} comparison(s). Versions trained before now keep what they learned."
        )

    def voter(self, session_key: str, username: str | None = None) -> str:
        """Salted id of a browser session or logged-in user; the raw key is never stored."""
        return self.callers.voter(session_key, username)

    def caller(self, session_key: str, address: str = "", username: str | None = None) -> Caller:
        """The Caller behind a request: salted voter and source ids (raw keys and addresses are never stored)."""
        return self.callers.caller(session_key, address, username)

    def _limit(self, who: str | Caller) -> None:
        self.callers.limit(who)
