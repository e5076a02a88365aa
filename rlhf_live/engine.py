"""llama.cpp as the serving engine: token streams from a GGUF base with the live and comparison adapters as GGUF LoRAs.

Knows xllamacpp (llama.cpp's server, in process: continuous batching across requests, a LoRA chosen per request) and
the sampling settings that make it sample as transformers does; knows nothing of chat templates, SQL or training.
`Policy` builds the prompt tokens and the GGUF files (`gguf_export`) and hands them here.
"""

from __future__ import annotations

import queue
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

try:
    import xllamacpp
except ImportError:  # the torch engine serves instead
    xllamacpp = None


class EngineError(RuntimeError):
    """llama.cpp refused a model or adapter file, or failed while generating."""


@dataclass
class Sampling:
    """What one request samples with: temperature 0 is greedy."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None


def available() -> bool:
    """Whether the llama.cpp engine can run here (xllamacpp installed)."""
    return xllamacpp is not None


class _Server:
    """One llama.cpp server: the base plus a fixed list of adapters."""

    def __init__(self, model: Path, adapters: dict[str, Path], threads: int, parallel: int, n_ctx: int):
        p = xllamacpp.CommonParams()
        p.model.path = str(model)
        p.n_parallel = parallel
        p.n_ctx = n_ctx * parallel  # split evenly: every slot holds a whole context
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.warmup = False
        p.verbosity = -1
        # The embedded server also listens on loopback HTTP; a random key keeps other local processes out.
        p.api_keys = [secrets.token_hex(16)]
        # Loaded at scale 0: every request names its own adapter (https://github.com/xorbitsai/xllamacpp#lora).
        p.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(path), 0.0) for path in adapters.values()]
        try:
            self.server = xllamacpp.Server(p)
        except RuntimeError as exc:
            raise EngineError(f"llama.cpp could not load {model} with adapters {list(adapters)}: {exc}") from exc
        self.ids = {version: i for i, version in enumerate(adapters)}
        self.path = Path(model)

    def lora(self, version: str | None) -> list[dict]:
        """Every adapter with its scale: 1 for `version`, 0 for the rest (None = the base; unknown is an error)."""
        if version is not None and version not in self.ids:
            raise EngineError(f"Adapter {version!r} is not loaded in llama.cpp.")
        return [{"id": i, "scale": 1.0 if v == version else 0.0} for v, i in self.ids.items()]


class LlamaCppEngine:
    """Samples answers to prompt ids; `set_adapters` / `set_models` swap what serves without stopping running answers.

    A version is served either from its own GGUF with the adapter merged into the weights (`set_models`: no per-token
    LoRA work) or as a runtime LoRA on the base file (`set_adapters`); a version in neither samples as the base.
    """

    def __init__(self, model: str | Path, *, threads: int, parallel: int, n_ctx: int):
        if not available():
            raise EngineError("llama.cpp engine needs the xllamacpp package: pip install xllamacpp")
        self.model, self.threads, self.parallel, self.n_ctx = Path(model), threads, parallel, n_ctx
        self._lock = threading.Lock()
        self._server = _Server(self.model, {}, threads, parallel, n_ctx)
        self._merged: dict[str, _Server] = {}  # version -> a server on its merged GGUF

    def set_adapters(self, adapters: dict[str, Path]) -> None:
        """Serve exactly these adapters (version -> GGUF LoRA) from now on; answers already running finish first."""
        # llama.cpp's server takes adapter files only at start, so a new set is a new server on the same file
        # (~0.6 s for 135M); the old one is dropped when its last answer ends.
        new = _Server(self.model, dict(adapters), self.threads, self.parallel, self.n_ctx)
        with self._lock:
            self._server = new

    def set_models(self, models: dict[str, Path]) -> None:
        """Serve exactly these versions from their merged GGUF files (version -> path); running answers finish first."""
        with self._lock:
            current = dict(self._merged)
        new = {
            v: current[v] if v in current and current[v].path == Path(p) else self._start(Path(p))
            for v, p in models.items()
        }
        with self._lock:
            self._merged = new

    def _start(self, path: Path) -> _Server:
        return _Server(path, {}, self.threads, self.parallel, self.n_ctx)

    def _route(self, version: str | None) -> tuple[_Server, list[dict]]:
        """The server that samples `version` and the LoRA scales to send with the request."""
        with self._lock:  # a later set_* does not stop an answer: it keeps the server it started on
            merged = self._merged.get(version) if version is not None else None
            server = merged or self._server
        return server, [] if merged else server.lora(version)

    def submit(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        version: str | None,
        cancel: threading.Event,
        sink: queue.Queue,
        tag: int = 0,
    ) -> threading.Thread:
        """Start one answer; `sink` gets (tag, kind, value): 'token' id, 'finish' reason, 'error' exception, 'done'."""
        server, lora = self._route(version)
        request = {
            "prompt": list(prompt_ids),
            "max_tokens": sampling.max_new_tokens,
            "stream": True,
            "n_probs": 1,  # each chunk then carries its token id
            "cache_prompt": True,
            **({"lora": lora} if lora else {}),
            **_sampler(sampling),
        }

        def on_chunk(chunk: dict) -> bool:
            choice = (chunk.get("choices") or [{}])[0]
            for item in (choice.get("logprobs") or {}).get("content") or []:
                sink.put((tag, "token", item["id"]))
            if choice.get("finish_reason"):
                sink.put((tag, "finish", {"stop": "eos"}.get(choice["finish_reason"], choice["finish_reason"])))
            return cancel.is_set()  # True stops this request at the next token

        def work() -> None:
            try:
                server.server.handle_completions(request, on_chunk)
            except BaseException as exc:  # surfaced to the reader
                sink.put((tag, "error", EngineError(f"llama.cpp failed while generating: {exc}")))
            finally:
                sink.put((tag, "done", None))

        thread = threading.Thread(target=work, name="llama.cpp", daemon=True)
        thread.start()
        return thread

    def next_logprobs(self, prompt_ids: list[int], version: str | None, n_vocab: int) -> dict[int, float]:
        """Log-softmax of the raw next-token logits after `prompt_ids` (token id -> logprob), for tests."""
        server, lora = self._route(version)
        request = {"prompt": list(prompt_ids), "max_tokens": 1, "temperature": 0, "n_probs": n_vocab}
        reply = server.server.handle_completions({**request, "cache_prompt": False, **({"lora": lora} if lora else {})})
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return {t["id"]: t["logprob"] for t in top}


def _sampler(s: Sampling) -> dict:
    """llama.cpp sampler settings equal to transformers' generate(do_sample, temperature, top_p, top_k=0)."""
    if s.temperature <= 0:
        return {"temperature": 0.0}
    # transformers applies temperature before top-p; llama.cpp's default chain has top-k 40, min-p 0.05 and
    # temperature last. Naming the samplers runs only these two, in this order.
    settings = {"temperature": s.temperature, "top_p": s.top_p, "samplers": ["temperature", "top_p"]}
    if s.seed is not None:
        settings["seed"] = s.seed
    return settings
