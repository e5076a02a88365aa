"""The OpenAI-compatible API: /v1/models, /v1/chat/completions (streamed as server-sent events or not), and our
small extension for votes, /v1/feedback and /v1/comparisons.

Knows OpenAI's wire format (objects, chunks, errors), API keys and who a request comes from; every request goes to
the Service (serving/completions.py), with the page's limits, sources and engine. Knows nothing of Gradio.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from rlhf_live.model.lora import AdapterError
from rlhf_live.serving.callers import Caller
from rlhf_live.serving.completions import Completion, Completions
from rlhf_live.serving.samplers import coalesced
from rlhf_live.serving.service import Service
from rlhf_live.serving.settings import GenerationSettings, InvalidRequest, TooManyRequests
from rlhf_live.store import StoreError, UnknownId

JsonBody = Annotated[dict, Body()]
"""A request's JSON object (FastAPI parses it; malformed JSON gets an OpenAI-shaped 400, see add_openai_api)."""


class ApiError(Exception):
    """An error in OpenAI's shape: HTTP status, type, message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def api_keys(spec: str) -> set[str]:
    """Config.api_keys as a set: 'k1,k2' or '@FILE' with one key per line ('' = no keys: the API is open)."""
    text = Path(spec[1:]).read_text() if spec.startswith("@") else spec.replace(",", "\n")
    return {line.strip() for line in text.splitlines() if line.strip()}


def _error(exc: Exception) -> ApiError:
    """A refusal of ours as the HTTP error an OpenAI client expects."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TooManyRequests):
        return ApiError(429, str(exc), "rate_limit_error", "rate_limit_exceeded")
    if isinstance(exc, UnknownId):
        return ApiError(404, str(exc), code="not_found")
    if isinstance(exc, LookupError):
        return ApiError(404, str(exc), code="model_not_found")
    return ApiError(400, str(exc))


REFUSALS = (ApiError, InvalidRequest, StoreError, AdapterError, LookupError)
"""Errors a request gets as a sentence in OpenAI's error shape; anything else is a 500 with its traceback logged."""


class OpenAIApi:
    """The /v1 routes over one Service."""

    def __init__(self, service: Service):
        self.service, self.cfg = service, service.cfg
        self.completions = Completions(service)
        self.keys = api_keys(self.cfg.api_keys)
        limit = self.cfg.engine_parallel if service.policy.engine is not None else self.cfg.generation_concurrency
        self._slots = threading.BoundedSemaphore(max(1, limit))  # as many generations at once as the page's queue
        self._waiting, self._lock = 0, threading.Lock()

    def caller(self, request: Request) -> Caller:
        """Who calls: their API key (a voter and a source of its own) or, where keys are off, their address."""
        address = request.client.host if request.client else ""
        if not self.keys:
            return self.service.caller(f"api:{address}", address)
        auth = request.headers.get("authorization", "")
        key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if key not in self.keys:
            raise ApiError(401, "A valid API key is needed: Authorization: Bearer <key>.", "invalid_api_key")
        name = "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]  # a signed-in identity, never the key itself
        return self.service.caller(name, address, username=name)

    def router(self) -> APIRouter:
        """The routes, for an app to include."""
        r = APIRouter(prefix="/v1")
        r.add_api_route("/models", self.models, methods=["GET"])
        r.add_api_route("/chat/completions", self.chat_completions, methods=["POST"])
        r.add_api_route("/feedback", self.feedback, methods=["POST"])
        r.add_api_route("/comparisons", self.comparisons, methods=["POST"])
        return r

    # --- routes ----------------------------------------------------------------------------------------------
    def models(self, request: Request):
        """The live version and, by name, earlier versions and the original model."""
        try:
            self.caller(request)
        except REFUSALS as exc:
            return _error(exc).response()
        created = int(time.time())
        names = self.completions.models(self.cfg.api_model_name)
        data = [{"id": n, "object": "model", "created": created, "owned_by": "rlhf-live"} for n in names]
        return {"object": "list", "data": data}

    def chat_completions(self, request: Request, body: JsonBody):
        """One chat completion (n samples), streamed as chat.completion.chunk events when `stream` is true."""
        try:
            who = self.caller(request)
            settings, n, stop = self._settings(body)
            self._enter()
        except REFUSALS as exc:
            return _error(exc).response()
        try:
            updates = self.completions.create(
                who, body.get("messages"), settings, n=n, stop=stop, model=str(body.get("model") or "")
            )
            first = next(updates)  # the request is checked (and stored) here: a refusal is an HTTP error, not a stream
        except REFUSALS as exc:
            self._slots.release()
            return _error(exc).response()
        except BaseException:
            self._slots.release()
            raise
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._events(first, updates, usage), media_type="text/event-stream")
        try:
            *_, last = [first, *updates]
        finally:
            self._slots.release()
        return _completion_object(last)

    def feedback(self, request: Request, body: JsonBody):
        """Our extension: thumb a completion's choice up or down (or clear it), with an optional reason."""
        try:
            who = self.caller(request)
            cid, index = _field(body, "id", str), _field(body, "index", int, 0)
            out = self.completions.feedback(
                who, cid, index, _field(body, "value", str), _field(body, "reason", str, "")
            )
        except REFUSALS as exc:
            return _error(exc).response()
        return {"ok": True, "id": cid, "index": index, "value": out["value"]}

    def comparisons(self, request: Request, body: JsonBody):
        """Our extension: which of two choices of one completion was better (A, B, tie or both_bad)."""
        try:
            who = self.caller(request)
            cid, a, b = _field(body, "id", str), _field(body, "a", int, 0), _field(body, "b", int, 1)
            choice, reason = _field(body, "choice", str), _field(body, "reason", str, "")
            out = self.completions.compare(who, cid, a, b, choice, reason)
        except REFUSALS as exc:
            return _error(exc).response()
        return {
            "ok": True,
            "id": cid,
            "choice": out["choice"],
            "a_version": out["a_version"],
            "b_version": out["b_version"],
        }

    # --- helpers ---------------------------------------------------------------------------------------------
    def _settings(self, body: dict) -> tuple[GenerationSettings, int, list[str]]:
        """Sampling settings, n and stop sequences from a request body (OpenAI's names)."""
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        settings = GenerationSettings.from_config(
            self.cfg,
            max_new_tokens=_number(max_tokens, "max_tokens", int),
            temperature=_number(body.get("temperature"), "temperature", float),
            top_p=_number(body.get("top_p"), "top_p", float),
            seed=_number(body.get("seed"), "seed", int),
        )
        settings = self.service._settings(settings)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list):
            raise ApiError(400, "stop must be a string or a list of strings.")
        return settings, _number(body.get("n"), "n", int) or 1, stop

    def _enter(self) -> None:
        """Wait for a generation slot, as the page's queue does; past queue_max_size waiting, the app is busy."""
        with self._lock:
            if self._waiting >= self.cfg.queue_max_size:
                raise ApiError(
                    429, "This app is busy: too many requests are waiting. Try again shortly.", "server_error"
                )
            self._waiting += 1
        try:
            self._slots.acquire()
        finally:
            with self._lock:
                self._waiting -= 1

    def _events(self, first: Completion, updates: Iterator[Completion], usage: bool) -> Iterator[str]:
        """Server-sent events: a role chunk, content deltas (coalesced as the page's), finish reasons, [DONE]."""
        sent = [""] * len(first.texts)
        done = [False] * len(first.texts)
        created = int(time.time())
        try:
            yield _sse(
                _chunk(
                    first,
                    created,
                    [{"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(len(sent))],
                )
            )
            last = first
            for c in coalesced(_chain(first, updates), self.cfg.stream_interval_s):
                last, choices = c, []
                for i, text in enumerate(c.texts):
                    delta = text[len(sent[i]) :] if text.startswith(sent[i]) else text
                    finish = c.finish[i] if c.answer_ids else None
                    if delta or (finish and not done[i]):
                        choices.append(
                            {"index": i, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
                        )
                        sent[i], done[i] = text, done[i] or bool(finish)
                if choices:
                    yield _sse(_chunk(c, created, choices))
            if usage:
                yield _sse({**_chunk(last, created, []), "usage": _usage(last)})
            yield "data: [DONE]\n\n"
        finally:
            updates.close()  # a client that went away: the answers written so far are stored ('cancelled')
            self._slots.release()


def _chain(first: Completion, rest: Iterator[Completion]) -> Iterator[Completion]:
    yield first
    yield from rest


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunk(c: Completion, created: int, choices: list[dict]) -> dict:
    for choice in choices:
        choice.setdefault("finish_reason", None)
    return {"id": c.id, "object": "chat.completion.chunk", "created": created, "model": c.model, "choices": choices}


def _usage(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def _completion_object(c: Completion) -> dict:
    """A finished completion as OpenAI's chat.completion object."""
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": c.finish[i], "logprobs": None}
        for i, text in enumerate(c.texts)
    ]
    return {
        "id": c.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": c.model,
        "choices": choices,
        "usage": _usage(c),
    }


def _number(value, name: str, kind: type):
    """`value` as `kind` (None stays None); a 400 with the parameter's name otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"{name} must be a{'n integer' if kind is int else ' number'}, not {value!r}.")
    return kind(value)


_MISSING = object()


def _field(body, name: str, kind: type, default=_MISSING):
    """A field of a JSON body, of `kind`; a 400 naming it when absent (without a default) or of another type."""
    value = body.get(name, default) if isinstance(body, dict) else default
    if value is _MISSING:
        raise ApiError(400, f"'{name}' is required.")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ApiError(400, f"'{name}' must be a{'n integer' if kind is int else ' string'}.")
    return value


def add_openai_api(app: FastAPI, service: Service) -> OpenAIApi:
    """Serve /v1 from `app`; malformed JSON gets OpenAI's error shape too."""
    api = OpenAIApi(service)
    app.include_router(api.router())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith("/v1/"):
            return JSONResponse({"error": "The request body must be valid JSON (an object)."}, status_code=400)
        return ApiError(400, "The request body must be valid JSON (an object).").response()

    return api
