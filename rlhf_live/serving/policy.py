"""Serving policy: base model + LoRA adapter, the prompt it answers, streaming answers, adapter swap under a lock.

Knows which version serves, which adapters are loaded for comparison and the lock that keeps a swap from changing
them under a running generation; a sampler (samplers.py: torch or llama.cpp) writes the tokens. Knows nothing of
SQL, the UI or how adapters are trained.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel

from rlhf_live.config import Config
from rlhf_live.model.base import load_base, prepare_cpu_4bit
from rlhf_live.model.lora import BASE, AdapterError, attach_adapter, check_folder, lora_config
from rlhf_live.model.prompt import prompt_budget, render, with_system
from rlhf_live.serving import llamacpp as llama
from rlhf_live.serving import scoring
from rlhf_live.serving.engine_files import engine_unavailable, prune_engine_files, start_engine, version_file
from rlhf_live.serving.samplers import Answer, LlamaCppSampler, Sampler, Steps, Stream, TorchSampler
from rlhf_live.serving.settings import GenerationSettings, InvalidRequest

WARM_WINDOW_S = 900.0
"""Chats active this many seconds ago or later are prefilled into a new version's llama.cpp cache at a swap."""
_PEFT_BASE = "__base__"


class _RWLock:
    """Many generations at once, or one adapter swap alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    @property
    def readers(self) -> int:
        return self._readers

    def acquire_write(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._writer = True
            self._cond.wait_for(lambda: self._readers == 0)

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class Policy:
    """The served model; `stream()` answers chats, `swap()` changes the adapter between requests."""

    def __init__(
        self,
        model: PeftModel,
        tokenizer,
        cfg: Config,
        version: str = BASE,
        engine: llama.LlamaCppEngine | None = None,
        adapter_path: str | Path | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.version = version
        self.device = next(model.parameters()).device
        self.engine = engine
        """llama.cpp sampling the same weights, or None: torch samples (it always computes log-probs and KL)."""
        self.sampler: Sampler = TorchSampler(model, tokenizer) if engine is None else LlamaCppSampler(engine, tokenizer)
        self.engine_note = ""
        """Why `engine='auto'` fell back to torch (said once at start and in /status), else empty."""
        self._lock = _RWLock()
        self._extra: dict[str, str] = {}  # version -> PEFT adapter name, for comparisons with older versions
        self._recent: collections.OrderedDict[int, tuple[float, list[int]]] = collections.OrderedDict()
        self._recent_lock = threading.Lock()
        if engine is not None and adapter_path:
            self.sampler.files = {version: version_file(cfg, model, adapter_path)}
            self._engine_serve(self.sampler.files)

    @classmethod
    def from_config(cls, cfg: Config, adapter_path: str | Path | None = None, version: str | None = None) -> Policy:
        """Load the base (NF4 unless turned off) and attach the given adapter or a fresh one."""
        base, tokenizer = load_base(cfg)
        prepare_cpu_4bit(base, cfg)  # never bitsandbytes' packed CPU format: a later adapter swap would corrupt it
        path = adapter_path or cfg.adapter or None
        model = attach_adapter(base, cfg, path)
        model.eval()
        note = ""
        try:
            engine = start_engine(cfg, model)
        except (llama.EngineError, OSError) as exc:  # e.g. a wheel this CPU cannot run: 'auto' serves on with torch
            if cfg.engine != "auto":
                raise
            engine, note = None, f"serving with torch: llama.cpp failed to start ({exc})"
        if engine is None and cfg.engine == "auto" and not note:
            note = f"serving with torch: llama.cpp cannot run here ({engine_unavailable(cfg, model)})"
        policy = cls(model, tokenizer, cfg, version or (Path(path).name if path else BASE), engine, path)
        policy.engine_note = note
        return policy

    @property
    def engine_name(self) -> str:
        """'llamacpp' or 'torch': what samples answers."""
        return "torch" if self.engine is None else "llamacpp"

    def _engine_serve(self, files: dict[str, Path]) -> None:
        """Serve exactly these versions in the engine (merged models, or runtime LoRAs on the base file)."""
        if self.cfg.engine_merge:
            self.engine.set_models(files)
        else:
            self.engine.set_adapters(files)
        prune_engine_files(self.cfg, set(files.values()))

    # --- prompts -------------------------------------------------------------------------------------------
    def check_message(self, text: str) -> str:
        """The user's message, stripped; InvalidRequest if empty or over the configured limit."""
        if not isinstance(text, str):
            raise InvalidRequest("The message must be text.")
        if not text.strip():
            raise InvalidRequest("Please type a message first: it is empty.")
        if len(text) > self.cfg.max_message_chars:
            raise InvalidRequest(
                f"Your message is {len(text):,} characters long; the limit is {self.cfg.max_message_chars:,}. "
                "Please shorten it."
            )
        return text.strip()

    def build_prompt(self, messages: list[dict], settings: GenerationSettings) -> tuple[list[int], int]:
        """Token ids of system + newest turns that fit the context with room for the answer; (ids, turns dropped)."""
        turns = [m for m in messages if m["role"] != "system"]
        if not turns or turns[-1]["role"] != "user":
            raise InvalidRequest("A conversation must end with a user message to be answered.")
        try:
            budget = prompt_budget(self.cfg.max_context_tokens, settings.max_new_tokens)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        rendered = render(self.tokenizer, with_system(turns, settings.system_prompt), budget)
        return rendered.ids, rendered.dropped

    # --- generation ----------------------------------------------------------------------------------------
    def stream(
        self,
        messages: list[dict],
        settings: GenerationSettings | None = None,
        *,
        n: int = 1,
        versions: list[str] | None = None,
    ) -> Stream:
        """Start sampling `n` answers (batched) to `messages`; `versions` picks an adapter per answer."""
        settings = settings or GenerationSettings.from_config(self.cfg)
        if settings.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be at least 1.")
        prompt_ids, dropped = self.build_prompt(messages, settings)
        versions = versions or [None] * n
        if len(versions) != n:
            raise ValueError("one version per answer")
        cancel = threading.Event()
        stops = [threading.Event() for _ in range(n)]  # one per answer: a loop stop or Stream.stop ends it alone
        answers = [Answer() for _ in range(n)]
        names, release = self._hold(versions)  # None: the version serving now, resolved under the lock
        for a, v in zip(answers, versions):
            a.adapter_version = v or self.version
        steps = self._guarded(self._run(prompt_ids, settings, answers, names, cancel, stops), cancel, release)
        next(steps)  # primed: from here on, closing or dropping the stream (even unread) releases the read lock
        s = Stream(answers, steps, cancel, stops)
        s.prompt_tokens, s.dropped_messages = len(prompt_ids), dropped
        return s

    def _run(self, prompt_ids, settings, answers, names, cancel, stops) -> Steps:
        yield from self.sampler.run([prompt_ids], settings, answers, names, cancel, stops)
        if self.engine is not None and answers[0].adapter_version == self.version:
            self._remember(prompt_ids, answers[0])  # what a swap prefills into the next version's cache

    def _hold(self, versions: list[str | None]) -> tuple[list[str], Callable[[], None]]:
        """Lock the adapters for one generation: (PEFT adapter names, the release function)."""
        # Shared when every answer uses the serving adapter; exclusive when a batch mixes adapters, because PEFT's
        # mixed-batch hooks are global to the model and a generation running beside one would read them ("Length of
        # adapter_names should be the same as the number of inputs", found by the 20-user load test).
        for exclusive in (False, True):
            (self._lock.acquire_write if exclusive else self._lock.acquire_read)()
            release = self._lock.release_write if exclusive else self._lock.release_read
            try:
                names = [self._peft_name(v or self.version) for v in versions]
            except Exception:
                release()
                raise
            if exclusive or self.sampler.batches_versions or all(n == self.model.active_adapter for n in names):
                return names, release
            release()
        raise AssertionError("unreachable")

    def _guarded(self, steps: Iterator[tuple[str, ...]], cancel: threading.Event, release: Callable) -> Iterator:
        """The steps of a generation holding the lock taken in stream(); released however the stream ends."""
        try:
            yield None
            yield from steps
        finally:
            cancel.set()
            steps.close()  # stops the generation thread if it started
            release()

    def _peft_name(self, version: str) -> str:
        if version == BASE:
            return _PEFT_BASE
        if version == self.version:
            return self.model.active_adapter
        if version in self._extra:
            return self._extra[version]
        raise InvalidRequest(f"Adapter version {version!r} is not loaded for comparison.")

    @contextmanager
    def holding(self, versions: list[str]) -> Iterator[list[str]]:
        """The PEFT adapter names of `versions`, locked against a swap for the duration."""
        names, release = self._hold(versions)
        try:
            yield names
        finally:
            release()

    def generate(self, messages: list[dict], settings: GenerationSettings | None = None, **kw) -> list[Answer]:
        """Blocking version of stream()."""
        return self.stream(messages, settings, **kw).wait()

    def generate_many(
        self,
        conversations: list[list[dict]],
        settings: GenerationSettings | None = None,
        *,
        versions: list[str] | None = None,
    ) -> list[Answer]:
        """One answer per conversation, sampled in batches (evaluation); `versions` picks each adapter."""
        settings = settings or GenerationSettings.from_config(self.cfg)
        versions = versions or [self.version] * len(conversations)
        if len(versions) != len(conversations):
            raise ValueError("one version per conversation")
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        answers = [Answer(adapter_version=v) for v in versions]
        size = self.sampler.batch_size or max(1, len(conversations))
        for start in range(0, len(conversations), size):
            chunk = range(start, min(start + size, len(conversations)))
            prompts = [self.build_prompt(conversations[i], settings)[0] for i in chunk]
            with self.holding([versions[i] for i in chunk]) as names:  # a swap may come between batches
                self.sampler.many(prompts, settings, [answers[i] for i in chunk], names)
        return answers

    def kl_to_base(
        self, conversations: list[list[dict]], answers: list[Answer], settings: GenerationSettings, batch_size: int = 8
    ) -> list[float]:
        """Per answer, sum over its tokens of log pi(y_t) - log pi_base(y_t) at the sampling temperature (k1)."""
        return scoring.kl_to_base(self, conversations, answers, settings, batch_size)

    # --- adapters ------------------------------------------------------------------------------------------
    def swap(self, adapter_path: str | Path | None, version: str) -> None:
        """Serve `version` from now on (None path = base with a fresh LoRA); waits for running generations."""
        if adapter_path is not None:
            check_folder(adapter_path)
        # Comparison adapters are dropped with the old live one: they are loaded again when a Compare asks for them.
        served = {}
        if self.engine is not None and adapter_path is not None:
            # Converted before anything changes: a bad file changes nothing.
            served[version] = version_file(self.cfg, self.model, adapter_path)
        servers = None
        if served and self.cfg.engine_merge:  # started and prefilled before the lock: nobody waits for it
            servers = self.engine.prepare_models(served, warm={version: self._warm_sequences()})
        self._lock.acquire_write()
        try:
            old = self.model.active_adapter
            name = f"a{int(time.time() * 1000)}"
            if adapter_path is None:
                self.model.add_adapter(name, lora_config(self.cfg))
            else:
                try:
                    self.model.load_adapter(str(adapter_path), adapter_name=name)
                except Exception as exc:
                    raise AdapterError(f"Could not load adapter {version} from {adapter_path}: {exc}") from exc
            if servers is not None:
                self.engine.use_models(servers)
                prune_engine_files(self.cfg, set(served.values()))
            elif self.engine is not None:
                self._engine_serve(served)
            self.sampler.files = served
            self.model.set_adapter(name)
            self.model.requires_grad_(False)
            for gone in {old, *self._extra.values()}:
                self.model.delete_adapter(gone)
            self._extra = {}
            self.version = version
        finally:
            self._lock.release_write()

    def _remember(self, prompt: list[int], answer: Answer) -> None:
        """Keep a served chat's tokens, so that a swap can prefill them into the next version's cache."""
        ids = [*prompt, *answer.token_ids]
        key = hash(tuple(ids[:256]))  # a conversation's turns share their start: its newest turn replaces the older
        with self._recent_lock:
            self._recent.pop(key, None)
            self._recent[key] = (time.monotonic(), ids)
            while len(self._recent) > 4 * max(1, self.cfg.engine_warm_conversations):
                self._recent.popitem(last=False)

    def _warm_sequences(self) -> list[list[int]]:
        """The newest chats of the last WARM_WINDOW_S seconds (engine_warm_conversations of them), newest first."""
        now = time.monotonic()
        with self._recent_lock:
            recent = [ids for t, ids in reversed(self._recent.values()) if now - t <= WARM_WINDOW_S]
        return recent[: self.cfg.engine_warm_conversations]

    def load_for_comparison(self, adapter_path: str | Path, version: str) -> None:
        """Keep an older version loaded beside the live one, for A/B answers between versions."""
        if version in self._extra or version == self.version or version == BASE:
            return
        check_folder(adapter_path)
        lora = version_file(self.cfg, self.model, adapter_path) if self.engine is not None else None
        self._lock.acquire_write()
        try:
            name = f"cmp_{version}"
            if self.engine is not None:
                served = {**self.sampler.files, version: lora}
                self._engine_serve(served)
                self.sampler.files = served
            self.model.load_adapter(str(adapter_path), adapter_name=name)
            self.model.requires_grad_(False)
            self._extra[version] = name
        finally:
            self._lock.release_write()

    @property
    def generating(self) -> int:
        """How many generations are running now (the trainer yields to them)."""
        return self._lock.readers

    @property
    def comparable_versions(self) -> list[str]:
        """Versions that answers can be sampled from right now."""
        return [self.version, BASE, *self._extra]
