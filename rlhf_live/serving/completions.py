"""Chat completions as OpenAI's API has them (a whole message list per request, n samples, stop sequences), stored
like a chat answer so that votes on them train the model, and votes by completion id and choice index.

Knows messages, the Service's checks and limits, the store's conversations and votes; knows nothing of HTTP, JSON
shapes or Gradio (api/openai.py speaks the wire format).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from rlhf_live.model.lora import BASE
from rlhf_live.serving.callers import Caller
from rlhf_live.serving.settings import GenerationSettings, InvalidRequest

ROLES = ("system", "user", "assistant")
MAX_N = 8
"""Most samples one request may ask for (they are sampled in one batch)."""
MAX_STOPS = 4
"""Most stop sequences one request may give (OpenAI's limit)."""
FINISH = {"eos": "stop", "loop": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
"""Our finish reasons as OpenAI's: the loop stop ends an answer as EOS does; 'length' is the token cap."""


@dataclass
class Completion:
    """One request's state as it streams: texts so far, finish reasons, and once stored, the ids."""

    id: str = ""
    """'chatcmpl-' + the stored user message's id (the completion id clients vote with)."""
    model: str = ""
    texts: list[str] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    answer_ids: list[str] = field(default_factory=list)
    """The stored answers, one per choice index (empty until the last update)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


def completion_id(user_message_id: str) -> str:
    """The id a client sees for the answers to one stored user message."""
    return f"chatcmpl-{user_message_id}"


def _user_message_id(cid: str) -> str:
    if not isinstance(cid, str) or not cid.startswith("chatcmpl-"):
        raise InvalidRequest(f"{cid!r} is not a completion id of this server (they start with 'chatcmpl-').")
    return cid.removeprefix("chatcmpl-")


class Completions:
    """OpenAI-style requests through one Service: its limits, store and policy."""

    def __init__(self, service):
        self.service = service

    # --- models ----------------------------------------------------------------------------------------------
    def models(self, name: str) -> list[str]:
        """Model names a request may use: `name` (the live version), `name`-base and `name`-vNNNN of each version."""
        versions = [a["version"] for a in self.service.store.adapters() if a["status"] in ("live", "retired")]
        return [name, f"{name}-{BASE}", *(f"{name}-{v}" for v in versions)]

    def _version(self, model: str, name: str) -> str | None:
        """The adapter version a model name asks for (None: whatever serves now)."""
        if model in ("", name, f"{name}-{self.service.policy.version}"):
            return None
        if model == f"{name}-{BASE}":
            return BASE
        version = model.removeprefix(f"{name}-")
        rows = {a["version"]: a for a in self.service.store.adapters()}
        if model == version or version not in rows or rows[version]["status"] not in ("live", "retired"):
            raise LookupError(f"The model {model!r} does not exist here; GET /v1/models lists them.")
        self.service.policy.load_for_comparison(rows[version]["path"], version)
        return version

    # --- a completion ----------------------------------------------------------------------------------------
    def create(
        self, who: Caller, messages: list[dict], settings: GenerationSettings, *, n: int, stop: list[str], model: str
    ) -> Iterator[Completion]:
        """Store the conversation, then stream `n` answers to its last user message (the last update has the ids)."""
        if not 1 <= n <= MAX_N:
            raise InvalidRequest(f"n must be between 1 and {MAX_N}.")
        if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest(f"stop is up to {MAX_STOPS} non-empty strings.")
        version = self._version(model, self.service.cfg.api_model_name)
        cid, user_id, prompt, settings = self._store_turns(who, messages, settings)
        out = Completion(id=completion_id(user_id), model=model or self.service.cfg.api_model_name)
        stream = self.service.policy.stream(prompt, settings, n=n, versions=[version] * n)
        out.prompt_tokens, out.texts, out.finish = stream.prompt_tokens, [""] * n, [None] * n
        try:
            for texts in stream:
                for i, text in enumerate(texts):
                    if out.finish[i] is None:
                        out.texts[i] = self._until_stop(text, stop, i, stream, out)
                yield out
        finally:
            stream.cancel()
            for i, answer in enumerate(stream.answers):
                if out.finish[i] is None:  # not cut by a stop sequence: the engine's reason, and its whole text
                    out.texts[i], out.finish[i] = answer.text, FINISH.get(answer.finish_reason, "stop")
                answer.text = out.texts[i]  # what the client got is what is stored
                out.answer_ids.append(self.service.record_answer(cid, user_id, answer, settings))
            out.completion_tokens = sum(len(a.token_ids) for a in stream.answers)
        yield out

    @staticmethod
    def _until_stop(text: str, stop: list[str], i: int, stream, out: Completion) -> str:
        """`text` up to the first stop sequence (which ends answer `i`: OpenAI's finish_reason 'stop')."""
        cuts = [text.find(s) for s in stop if s in text]
        if not cuts:
            return text
        stream.stop(i)
        out.finish[i] = "stop"
        return text[: min(cuts)]

    def _store_turns(self, who: Caller, messages: list[dict], settings: GenerationSettings):
        """Check the message list, store it as a new conversation and its last user turn: what the Service returns."""
        service = self.service
        turns = _checked(messages, service.cfg.max_turns, service.cfg.max_stored_message_chars)
        system = turns[0]["content"] if turns and turns[0]["role"] == "system" else None
        turns = turns[1:] if system is not None else turns
        history, last = turns[:-1], turns[-1]["content"]
        if system is not None:
            settings.system_prompt = system
        # A new conversation per request, holding the client's history as it sent it, then the last user turn.
        return service._start_turn(who, last, "", None, settings, history=history)

    # --- votes -----------------------------------------------------------------------------------------------
    def answer_id(self, who: Caller, cid: str, index: int) -> str:
        """The stored answer behind choice `index` of completion `cid` (only the caller's own completions)."""
        user_id = _user_message_id(cid)
        message = self.service.store.message(user_id)
        answers = self.service.answers_to(who.voter, message["conversation_id"], user_id)
        if not isinstance(index, int) or not 0 <= index < len(answers):
            raise InvalidRequest(f"Completion {cid} has {len(answers)} choice(s); index {index!r} is not one of them.")
        return answers[index]

    def feedback(self, who: Caller, cid: str, index: int, value: str, reason: str = "") -> dict:
        """Thumb up/down or clear one choice of a completion."""
        return self.service.feedback(who, self.answer_id(who, cid, index), value, reason)

    def compare(self, who: Caller, cid: str, a: int, b: int, choice: str, reason: str = "") -> dict:
        """Record a preference between two choices of one completion (A, B, tie or both_bad)."""
        a_id, b_id = self.answer_id(who, cid, a), self.answer_id(who, cid, b)
        if a_id == b_id:
            raise InvalidRequest("A comparison needs two different choices.")
        store = self.service.store
        versions = [store.message(x)["adapter_version"] or BASE for x in (a_id, b_id)]
        conversation = store.message(a_id)["conversation_id"]
        pair = store.new_comparison(
            conversation, a_id, b_id, a_source=versions[0], b_source=versions[1], voter=who.voter
        )
        return self.service.choose(who, pair, choice, reason)


def _checked(messages, max_turns: int, max_chars: int) -> list[dict]:
    """Messages as {role, content} with text content, at most one system message (first), ending with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content}.")
    out = []
    for k, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if isinstance(content, list):  # OpenAI's content parts: the text parts, joined
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if role not in ROLES or not isinstance(content, str):
            raise InvalidRequest(f"messages[{k}] must have a role ({', '.join(ROLES)}) and text content.")
        if role == "system" and k > 0:
            raise InvalidRequest("A system message may only come first.")
        if len(content) > max_chars:  # checked before anything is stored: a refused request writes nothing
            raise InvalidRequest(f"messages[{k}] is {len(content):,} characters long; the limit is {max_chars:,}.")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise InvalidRequest("The last message must be the user's: it is the one answered.")
    if sum(m["role"] == "user" for m in out) > max_turns:
        raise InvalidRequest(f"This conversation has more than {max_turns} turns, the limit: please start a new one.")
    return out
