"""llama.cpp as the serving engine: token streams from a GGUF base with the live and comparison adapters as GGUF LoRAs.

Knows the llama.cpp server's requests (continuous batching across requests, a LoRA chosen per request, a prefix cache
per slot), the sampling settings that make it sample as transformers does, and the processes that run it
(`engine_worker`, one per served file); knows nothing of chat templates, SQL or training.
`Policy` builds the prompt tokens and the GGUF files (`gguf_export`) and hands them here.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


class EngineError(RuntimeError):
    """llama.cpp refused a model or adapter file, or failed while generating."""


@dataclass
class Sampling:
    """What one request samples with: temperature 0 is greedy."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64


def available() -> bool:
    """Whether the llama.cpp engine can run here (xllamacpp installed)."""
    return importlib.util.find_spec("xllamacpp") is not None


class _Server:
    """One llama.cpp server in its own process (`engine_worker`): a GGUF model plus a fixed list of adapters."""

    def __init__(
        self,
        model: Path,
        adapters: dict[str, Path],
        threads: int,
        parallel: int,
        n_ctx: int,
        cache_mib: int,
        options: dict | None = None,
    ):
        self.ids = {version: i for i, version in enumerate(adapters)}
        self.path = Path(model)
        settings = {"model": str(model), "adapters": [str(p) for p in adapters.values()], "threads": threads}
        settings |= {"parallel": parallel, "n_ctx": n_ctx, "cache_mib": cache_mib, **(options or {})}
        path = [_PACKAGE_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self._proc = _SPAWNER.submit(
            subprocess.Popen,
            [sys.executable, "-m", "rlhf_live.serving.engine_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        ).result()
        self._proc.stdin.write(json.dumps(settings) + "\n")
        self._proc.stdin.flush()
        first = json.loads(self._proc.stdout.readline() or '{"error": "the llama.cpp process exited"}')
        if not first.get("ready"):
            self._proc.kill()
            raise EngineError(f"llama.cpp could not load {model} with adapters {list(adapters)}: {first['error']}")
        self._write = threading.Lock()
        self._ids = itertools.count()
        self._routes: dict[int, Callable[[dict], None]] = {}
        threading.Thread(target=_read, args=(self._proc, self._routes), name="llama.cpp reader", daemon=True).start()
        weakref.finalize(self, _stop, self._proc)  # the process ends when the last answer using it does

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def lora(self, version: str | None) -> list[dict]:
        """Every adapter with its scale: 1 for `version`, 0 for the rest (None = the base; unknown is an error)."""
        if version is not None and version not in self.ids:
            raise EngineError(f"Adapter {version!r} is not loaded in llama.cpp.")
        return [{"id": i, "scale": 1.0 if v == version else 0.0} for v, i in self.ids.items()]

    def new_id(self) -> int:
        """A request id not used before on this server."""
        return next(self._ids)

    def request(self, rid: int, body: dict, on_message: Callable[[dict], None]) -> None:
        """Send one completion request; `on_message` gets every reply line for it, the last one with `done`."""
        self._routes[rid] = on_message
        self._send({"id": rid, "op": "complete", "body": body}, rid)

    def cancel(self, rid: int) -> None:
        """Stop request `rid` at its next token (nothing if it already ended)."""
        if rid in self._routes:
            self._send({"id": rid, "op": "cancel"}, None)

    def _send(self, message: dict, rid: int | None) -> None:
        try:
            with self._write:
                self._proc.stdin.write(json.dumps(message) + "\n")
                self._proc.stdin.flush()
        except (OSError, ValueError) as exc:  # the process died: the request ends with an error
            route = self._routes.pop(rid, None) if rid is not None else None
            if route is not None:
                route({"error": f"the llama.cpp process is gone ({exc})"})
                route({"done": True})


def _read(proc: subprocess.Popen, routes: dict[int, Callable[[dict], None]]) -> None:
    """Hand each reply line to its request; if the process dies, end every open request with an error."""
    for line in proc.stdout:
        message = json.loads(line)
        route = routes.pop(message["id"], None) if message.get("done") else routes.get(message["id"])
        if route is not None:
            route(message)
        # Waiting for the next line, this frame must not keep the last answer's callback: it holds its server, so a
        # server left idle by a swap would never be collected, and its process (~450 MB) never stopped.
        route = message = None
    code = proc.wait()
    for rid in list(routes):
        route = routes.pop(rid, None)
        if route is not None:
            route({"error": f"the llama.cpp process exited ({code})"})
            route({"done": True})


def _stop(proc: subprocess.Popen) -> None:
    """End a server's process: closing its stdin ends it; kill if it does not go at once."""
    try:
        proc.stdin.close()
        proc.wait(timeout=2)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        proc.kill()


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp spawner")
"""Starts every llama.cpp process from one thread: a child inherits the niceness of the thread that forks it, and
the trainer's thread (which publishes versions) is niced; this one is made now, by whoever imports the engine."""
_SPAWNER.submit(int).result()


class LlamaCppEngine:
    """Samples answers to prompt ids; `set_adapters` / `set_models` swap what serves without stopping running answers.

    A version is served either from its own GGUF with the adapter merged into the weights (`set_models`: no per-token
    LoRA work) or as a runtime LoRA on the base file (`set_adapters`); a version in neither samples as the base.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        threads: int,
        parallel: int,
        n_ctx: int,
        cache_mib: int = 1024,
        options: dict | None = None,
    ):
        if not available():
            raise EngineError("llama.cpp engine needs the xllamacpp package: pip install xllamacpp")
        self.model, self.threads, self.parallel, self.n_ctx = Path(model), threads, parallel, n_ctx
        self.cache_mib, self.options = cache_mib, dict(options or {})  # more engine_worker settings: flash_attn, ubatch
        self._lock = threading.Lock()
        self._adapters: dict[str, Path] = {}
        self._server = self._start(self.model, self._adapters)
        self._merged: dict[str, _Server] = {}  # version -> a server on its merged GGUF

    def set_adapters(self, adapters: dict[str, Path]) -> None:
        """Serve exactly these adapters (version -> GGUF LoRA) from now on; answers already running finish first."""
        # llama.cpp's server takes adapter files only at start, so a new set is a new server on the same file
        # (~0.6 s for 135M); the old one is dropped when its last answer ends.
        new = self._start(self.model, dict(adapters))
        with self._lock:
            self._server, self._adapters = new, dict(adapters)

    def set_models(self, models: dict[str, Path]) -> None:
        """Serve exactly these versions from their merged GGUF files (version -> path); running answers finish first."""
        self.use_models(self.prepare_models(models))

    def prepare_models(
        self, models: dict[str, Path], warm: dict[str, list[list[int]]] | None = None, timeout: float = 30.0
    ) -> dict[str, _Server]:
        """Servers for these versions (running ones reused); a new one first prefills its `warm` token sequences."""
        with self._lock:
            current = dict(self._merged)
        new = {}
        for v, p in models.items():
            old = current.get(v)
            if old is not None and old.path == Path(p) and old.alive:
                new[v] = old
            else:
                new[v] = self._start(Path(p))
                _prefill(new[v], (warm or {}).get(v, []), timeout)
        return new

    def use_models(self, servers: dict[str, _Server]) -> None:
        """Serve from these servers (from `prepare_models`) from now on."""
        with self._lock:
            self._merged = dict(servers)

    def _start(self, path: Path, adapters: dict[str, Path] | None = None) -> _Server:
        return _Server(path, adapters or {}, self.threads, self.parallel, self.n_ctx, self.cache_mib, self.options)

    def _route(self, version: str | None) -> tuple[_Server, list[dict]]:
        """The server that samples `version` and the LoRA scales to send with the request."""
        with self._lock:  # a later set_* does not stop an answer: it keeps the server it started on
            merged = self._merged.get(version) if version is not None else None
            server = merged or self._server
        if not server.alive:  # llama.cpp crashed (its process, not ours): serve on from a fresh one
            server = self._start(server.path, None if merged else self._adapters)
            with self._lock:
                if merged:
                    self._merged[version] = server
                else:
                    self._server = server
        return server, [] if merged else server.lora(version)

    def submit(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        version: str | None,
        cancel: threading.Event,
        sink: queue.Queue,
        tag: int = 0,
    ) -> Request:
        """Start one answer; `sink` gets (tag, kind, value): token, finish, cached (reused prompt), error, done."""
        server, lora = self._route(version)
        request = {
            "prompt": list(prompt_ids),
            "max_tokens": sampling.max_new_tokens,
            "stream": True,
            "n_probs": 1,  # each chunk then carries its token id
            # A chat's next turn starts with the whole previous prompt and answer: llama.cpp keeps them in the slot's
            # KV cache and prefills only what is new (https://github.com/ggml-org/llama.cpp/tree/master/tools/server).
            "cache_prompt": True,
            **({"lora": lora} if lora else {}),
            **_sampler(sampling),
        }
        handle, rid = Request(), server.new_id()

        def on_message(m: dict) -> None:
            if "tok" in m:
                sink.put((tag, "token", m["tok"]))
                if cancel.is_set():
                    server.cancel(rid)  # `server` is held here until the answer ends: it must outlive it
            elif "finish" in m:
                sink.put((tag, "finish", {"stop": "eos"}.get(m["finish"], m["finish"])))
                sink.put((tag, "cached", m.get("cached", 0)))
            elif "error" in m:
                sink.put((tag, "error", EngineError(f"llama.cpp failed while generating: {m['error']}")))
            elif m.get("done"):
                sink.put((tag, "done", None))
                handle.done.set()

        server.request(rid, request, on_message)
        return handle

    def next_logprobs(
        self, prompt_ids: list[int], version: str | None, n_vocab: int, penalty: tuple[float, int] | None = None
    ) -> dict[int, float]:
        """Next-token log-probs after `prompt_ids` (token id -> logprob), raw or after (penalty, last_n), for tests."""
        server, lora = self._route(version)
        # Without post_sampling_probs the log-probs are the model's own, whatever samples the token.
        request = {"prompt": list(prompt_ids), "max_tokens": 1, "temperature": 1.0, "n_probs": n_vocab}
        request |= {"samplers": ["temperature"], "cache_prompt": False, **({"lora": lora} if lora else {})}
        if penalty is not None:  # the distribution after the penalties sampler alone (temperature 1)
            request |= {"samplers": ["penalties"], "post_sampling_probs": True}
            request |= {"repeat_penalty": penalty[0], "repeat_last_n": penalty[1]}
        # A sampled token that ends inside a UTF-8 character (a byte token) is held back with its log-probs until the
        # character completes, which one token never does; the distribution is the same whichever token is sampled,
        # so another seed samples again, from the whole vocabulary at temperature 1 (greedy would pick it every time).
        for seed in range(8):
            first = self._first_logprobs(server, request | {"seed": seed})
            if first is not None:
                break
        else:
            raise EngineError("llama.cpp sent no log-probs for the next token")
        if penalty is not None:
            return {t["id"]: math.log(t["prob"]) for t in first["top_probs"] if t["prob"] > 0}
        return {t["id"]: t["logprob"] for t in first["top_logprobs"]}

    @staticmethod
    def _first_logprobs(server: _Server, request: dict) -> dict | None:
        """The log-probs entry of the one token `request` samples, or None when llama.cpp sent none."""
        replies: queue.Queue = queue.Queue()
        server.request(server.new_id(), request, replies.put)
        first = None
        while "done" not in (m := replies.get()):
            if "error" in m:
                raise EngineError(f"llama.cpp failed: {m['error']}")
            # A reply can arrive in parts, and only the part with the token carries its log-probs.
            content = ((m["reply"].get("choices") or [{}])[0].get("logprobs") or {}).get("content")
            first = first or (content[0] if content else None)
        return first


def _prefill(server: _Server, sequences: list[list[int]], timeout: float) -> None:
    """Put these token sequences into a new server's prompt cache (a chat's next turn then reuses its history)."""
    # A swap to a new version starts a server with empty caches: without this, every conversation's next turn
    # would prefill its whole history again (~2-3 s for 1,000 tokens on 2 cores) right after the swap.
    replies: queue.Queue = queue.Queue()
    for ids in sequences:
        body = {"prompt": list(ids), "max_tokens": 1, "temperature": 0.0, "cache_prompt": True}
        server.request(server.new_id(), body, replies.put)
    left, deadline = len(sequences), time.monotonic() + timeout
    while left:
        try:
            left -= "done" in replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:  # serving matters more than a warm cache: go on with what was prefilled
            return


class Request:
    """One answer in flight: `join` waits until llama.cpp has sent its last token."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def join(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)


def _sampler(s: Sampling) -> dict:
    """llama.cpp sampler settings equal to `sampling.generate_kwargs`: penalty, temperature, top-p, nothing else."""
    # llama.cpp's default chain has DRY, top-k 40, min-p 0.05 and temperature last; naming the samplers runs only
    # these, in this order. The penalty window counts the prompt's tokens too, as `sampling.windows` does.
    penalty = {"repeat_penalty": s.repeat_penalty, "repeat_last_n": s.repeat_last_n}
    penalty |= {"frequency_penalty": 0.0, "presence_penalty": 0.0, "dry_multiplier": 0.0}
    if s.temperature <= 0:
        return {"temperature": 0.0, "samplers": ["penalties", "temperature"], **penalty}
    settings = {"temperature": s.temperature, "top_p": s.top_p, "samplers": ["penalties", "temperature", "top_p"]}
    settings |= penalty
    if s.seed is not None:
        settings["seed"] = s.seed
    return settings
