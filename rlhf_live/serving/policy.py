"""Serving policy: base model + LoRA adapter, chat template, streaming generation, adapter swap under a lock.

Knows prompts, sampling and adapters in memory; knows nothing of SQL, the UI or how adapters are trained.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from rlhf_live.config import Config
from rlhf_live.model.base import load_base, prepare_cpu_4bit, source_gguf
from rlhf_live.model.lora import BASE, AdapterError, attach_adapter, check_folder, lora_config
from rlhf_live.model.prompt import prompt_budget, render, with_system
from rlhf_live.model.sampling import LoopStop, generate_kwargs, loop_cut, penalize_positions
from rlhf_live.serving import llamacpp as llama
from rlhf_live.serving.gguf_export import cached_lora_gguf, cached_merged_gguf, cached_model_gguf, prune_cache

WARM_WINDOW_S = 900.0
"""Chats active this many seconds ago or later are prefilled into a new version's llama.cpp cache at a swap."""
_PEFT_BASE = "__base__"


class InvalidRequest(ValueError):
    """A request the policy refuses, with a sentence a person understands."""


@dataclass
class GenerationSettings:
    """How one answer is sampled; stored beside every answer."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    system_prompt: str = ""
    seed: int | None = None
    repetition_penalty: float = 1.0
    repetition_last_n: int = 64
    stop_loops: bool = False

    @classmethod
    def from_config(cls, cfg: Config, **overrides) -> GenerationSettings:
        """Defaults from Config, then per-request overrides (None means keep)."""
        base = cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.system_prompt)
        base.repetition_penalty, base.repetition_last_n = cfg.repetition_penalty, cfg.repetition_last_n
        base.stop_loops = cfg.stop_loops
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base

    def as_dict(self) -> dict:
        """Plain dict for storage."""
        return asdict(self)


def start_engine(cfg: Config, model: PeftModel) -> llama.LlamaCppEngine | None:
    """llama.cpp on the exact weights `model` serves, when `cfg.engine` asks for it or 'auto' finds it can run."""
    if cfg.engine not in ("auto", "torch", "llamacpp"):
        raise ValueError(f"engine must be auto, torch or llamacpp, not {cfg.engine!r}")
    if cfg.engine == "torch":
        return None
    reason = engine_unavailable(cfg, model)
    if reason:
        if cfg.engine == "llamacpp":
            raise llama.EngineError(f"--engine llamacpp cannot run: {reason}.")
        return None
    # Not the original GGUF file: the values the trained adapter was trained against (NF4, dequantized). An adapter
    # trained on NF4 weights moved the next-token distribution 0.61 nats there but 0.10 on the original Q4_1 weights.
    template = source_gguf(cfg)
    path = cached_model_gguf(served_base(model), model.config.to_dict(), template, cfg.cache_dir, cfg.engine_weights)
    threads = cfg.engine_threads or os.cpu_count() or 1
    return llama.LlamaCppEngine(
        path,
        threads=threads,
        parallel=cfg.engine_parallel,
        n_ctx=cfg.max_context_tokens,
        cache_mib=cfg.engine_cache_mib,
    )


def engine_unavailable(cfg: Config, model: PeftModel) -> str:
    """Why llama.cpp cannot serve this model here ('' when it can)."""
    template = source_gguf(cfg)
    state = served_base(model)
    reason = ""
    if not llama.available():
        reason = "the xllamacpp package is not installed"
    elif next(model.parameters()).device.type != "cpu":
        reason = "the model is on CUDA, where torch serves"  # llama.cpp's CPU wheel; CUDA stays on the reference
    elif template is None:
        reason = "the base is not from a GGUF file (llama.cpp needs its tokenizer metadata)"
    elif any(not v.is_floating_point() for v in state.values()):
        reason = "the NF4 weights are packed (--cpu-dequantize is off)"
    return reason


def prebuild_engine_file(cfg: Config, model: PeftModel | None, adapter_path: str | Path) -> bool:
    """Write the merged llama.cpp model of a published version into the cache, where serving's swap will find it."""
    if model is None or cfg.engine == "torch" or not cfg.engine_merge or not llama.available():
        return False
    template = source_gguf(cfg)
    if template is None or next(model.parameters()).device.type != "cpu":
        return False
    try:
        base = served_base(model)
        path = cached_merged_gguf(
            base, adapter_path, model.config.to_dict(), template, cfg.cache_dir, cfg.engine_weights
        )
    except Exception:  # serving will try again (and report) at the swap
        return False
    prune_engine_files(cfg, {path})
    return True


def prune_engine_files(cfg: Config, keep: set[Path]) -> None:
    """Delete per-version llama.cpp files past as many as the data dir keeps versions (+ live, parent), never `keep`."""
    prune_cache(cfg.cache_dir, keep, newest=cfg.keep_versions + 2)


def served_base(model: PeftModel) -> dict:
    """The base weights serving uses (the dequantized NF4 values), under transformers' names, without any LoRA."""
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    return {k.replace("base_model.model.", "", 1).replace(".base_layer.", "."): v for k, v in state.items()}


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


class _TokenQueue(BaseStreamer):
    """Receives each generation step's (B,) new tokens from generate() and hands them to the reader thread."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first puts the prompt ids
            self._prompt_seen = True
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self):
        self.q.put(None)


def sampling_kwargs(settings: GenerationSettings, start: list[int] | None = None) -> dict:
    """generate() arguments for these settings (`start`: each row's left padding)."""
    s = settings
    return generate_kwargs(s.temperature, s.top_p, s.repetition_penalty, s.repetition_last_n, start)


class _Either:
    """Set when either event is (the engine's cancel flag for one answer of several)."""

    def __init__(self, a: threading.Event, b: threading.Event):
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()


class _AllStopped(StoppingCriteria):
    """generate() ends once every answer has ended (EOS or its loop stop)."""

    def __init__(self, stops: list[threading.Event]):
        self.stops = stops

    def __call__(self, input_ids, scores, **kwargs):
        done = all(s.is_set() for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Cancel(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Answer:
    """One streamed answer; fields are final once its stream is exhausted."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    """'eos' (the model ended it), 'length' (max_new_tokens), 'loop' (cut after its first repeat), 'cancelled'."""
    adapter_version: str = BASE
    cached_prompt_tokens: int = 0
    """Prompt tokens the engine reused from an earlier request (llama.cpp's prefix cache); always 0 on torch."""


class Stream:
    """Iterate to get a tuple of texts-so-far per answer after each step; `.answers` holds the results."""

    def __init__(
        self,
        answers: list[Answer],
        steps: Iterator[tuple[str, ...]],
        cancel: threading.Event,
        stops: list[threading.Event] | None = None,
    ):
        self.answers = answers
        self._steps = steps
        self._cancel = cancel
        self._stops = stops or [threading.Event() for _ in answers]
        self.prompt_tokens = 0
        self.dropped_messages = 0

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return self._steps

    def cancel(self) -> None:
        """Stop generating at the next token (e.g. the browser went away); unfinished answers read 'cancelled'."""
        self._cancel.set()
        for a in self.answers:
            a.finish_reason = a.finish_reason or "cancelled"

    def stop(self, i: int) -> None:
        """Stop generating answer `i` only (its text stays as far as it got, finish_reason 'cancelled')."""
        if not self.answers[i].finish_reason:
            self.answers[i].finish_reason = "cancelled"
        self._stops[i].set()

    def wait(self) -> list[Answer]:
        """Consume the stream and return the finished answers."""
        for _ in self._steps:
            pass
        return self.answers


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
        self.engine_note = ""
        """Why `engine='auto'` fell back to torch (said once at start and in /status), else empty."""
        self._lock = _RWLock()
        self._extra: dict[str, str] = {}  # version -> PEFT adapter name, for comparisons with older versions
        self._gguf: dict[str, Path] = {}  # version -> its GGUF in the engine; a version not here samples as base
        self._recent: collections.OrderedDict[int, tuple[float, list[int]]] = collections.OrderedDict()
        self._recent_lock = threading.Lock()
        if engine is not None and adapter_path:
            self._gguf[version] = self._lora_gguf(adapter_path)
            self._engine_serve(self._gguf)

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

    def _lora_gguf(self, adapter_path: str | Path) -> Path:
        """The engine's file for a version: the whole model with the adapter merged (engine_merge), or a GGUF LoRA."""
        config = self.model.config.to_dict()
        try:
            if self.cfg.engine_merge:
                template = source_gguf(self.cfg)
                base, qtype = served_base(self.model), self.cfg.engine_weights
                return cached_merged_gguf(base, adapter_path, config, template, self.cfg.cache_dir, qtype)
            return cached_lora_gguf(adapter_path, config, self.cfg.cache_dir)
        except Exception as exc:  # safetensors, gguf and the OS raise many kinds for a bad folder
            raise AdapterError(f"Could not convert the adapter in {adapter_path} for llama.cpp: {exc}") from exc

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
            if exclusive or self.engine is not None or all(n == self.model.active_adapter for n in names):
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

    def _run(self, prompt_ids, settings, answers, names, cancel, stops) -> Iterator[tuple[str, ...]]:
        if self.engine is not None:
            return self._run_engine([prompt_ids] * len(answers), settings, answers, cancel, remember=True, stops=stops)
        return self._run_torch(prompt_ids, settings, answers, names, cancel, stops)

    def _sampling(self, settings: GenerationSettings, i: int) -> llama.Sampling:
        seed = None if settings.seed is None else settings.seed + i  # n answers to one prompt must differ
        s = settings
        return llama.Sampling(s.max_new_tokens, s.temperature, s.top_p, seed, s.repetition_penalty, s.repetition_last_n)

    def _run_engine(self, prompts, settings, answers, cancel, remember=False, stops=None) -> Iterator[tuple[str, ...]]:
        """Answers sampled by llama.cpp, one request each (batched there); texts after every token."""
        eos = self.tokenizer.eos_token_id
        sink: queue.Queue = queue.Queue()
        threads, errors = [], []
        loops = [LoopStop() if settings.stop_loops else None for _ in answers]
        stops = stops or [threading.Event() for _ in answers]  # one answer's stop ends that request only
        try:
            for i, (prompt, a) in enumerate(zip(prompts, answers)):
                version = a.adapter_version if a.adapter_version in self._gguf else None
                sampling = self._sampling(settings, i)
                threads.append(self.engine.submit(prompt, sampling, version, _Either(cancel, stops[i]), sink, i))
            running = len(threads)
            while running:
                i, kind, value = sink.get()
                a = answers[i]
                if kind == "token" and value != eos and not stops[i].is_set():
                    self._push(a, value, loops[i], stops[i])
                    yield tuple(x.text for x in answers)
                elif kind == "finish":
                    if not a.finish_reason:
                        a.finish_reason = value if value in ("eos", "length") else ""
                elif kind == "error":
                    errors.append(value)
                elif kind == "cached":
                    a.cached_prompt_tokens = value
                elif kind == "done":
                    running -= 1
            final = self._finish(answers, errors, cancel)
            if remember and answers[0].adapter_version == self.version:
                self._remember(prompts[0], answers[0])
            yield final
        finally:
            cancel.set()
            for t in threads:
                t.join()

    def _push(self, a: Answer, token: int, loop: LoopStop | None, stop: threading.Event) -> None:
        """One new token of an answer: its text so far, or the cut after the loop's first copy."""
        a.token_ids.append(token)
        cut = loop.push(token) if loop is not None else None
        if cut is not None:
            del a.token_ids[cut:]
            a.finish_reason = "loop"
            stop.set()
        text = self.tokenizer.decode(a.token_ids, skip_special_tokens=True)
        if cut is not None or not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            a.text = text

    def _finish(self, answers: list[Answer], errors: list[BaseException], cancel: threading.Event) -> tuple:
        """Raise a generation error, else the final texts and finish reasons of every answer."""
        if errors:
            raise errors[0]
        for a in answers:
            a.text = self.tokenizer.decode(a.token_ids, skip_special_tokens=True)
            if not a.finish_reason:
                a.finish_reason = "cancelled" if cancel.is_set() else "length"
        return tuple(a.text for a in answers)

    def _run_torch(self, prompt_ids, settings, answers, names, cancel, stops=None) -> Iterator[tuple[str, ...]]:
        n = len(answers)
        eos = self.tokenizer.eos_token_id
        tokens = _TokenQueue()
        input_ids = torch.tensor([prompt_ids] * n, device=self.device)
        loops = [LoopStop() if settings.stop_loops else None for _ in answers]
        stops = stops or [threading.Event() for _ in answers]
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
            streamer=tokens,
            stopping_criteria=StoppingCriteriaList([_Cancel(cancel), _AllStopped(stops)]),
            **sampling_kwargs(settings),
        )
        # Mixed-adapter batch (https://huggingface.co/docs/peft/developer_guides/lora#inference-with-different-lora-adapters-in-the-same-batch)
        if any(name != self.model.active_adapter for name in names):
            kwargs["adapter_names"] = names
        errors: list[BaseException] = []

        def work():
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced to the reader below
                errors.append(exc)
                tokens.end()

        thread = threading.Thread(target=work, name="generate", daemon=True)
        try:
            thread.start()
            while (step := tokens.q.get()) is not None:
                for i, tok in enumerate(step[:n]):
                    if stops[i].is_set():
                        continue
                    if tok == eos:
                        stops[i].set()
                        answers[i].finish_reason = "eos"
                        continue
                    self._push(answers[i], tok, loops[i], stops[i])
                yield tuple(a.text for a in answers)
            thread.join()
            yield self._finish(answers, errors, cancel)
        finally:
            cancel.set()
            thread.join()

    def generate(self, messages: list[dict], settings: GenerationSettings | None = None, **kw) -> list[Answer]:
        """Blocking version of stream()."""
        return self.stream(messages, settings, **kw).wait()

    def generate_many(
        self,
        conversations: list[list[dict]],
        settings: GenerationSettings | None = None,
        *,
        versions: list[str] | None = None,
        batch_size: int = 16,
    ) -> list[Answer]:
        """One answer per conversation, sampled in left-padded batches (evaluation); `versions` picks each adapter."""
        # On 2 CPU cores a batch of 16 decodes ~3x the tokens/s of 2 (bench/RESULTS.md ## Simulated raters).
        settings = settings or GenerationSettings.from_config(self.cfg)
        versions = versions or [self.version] * len(conversations)
        if len(versions) != len(conversations):
            raise ValueError("one version per conversation")
        if self.engine is not None:  # llama.cpp batches across its slots itself
            prompts = [self.build_prompt(c, settings)[0] for c in conversations]
            answers = [Answer(adapter_version=v) for v in versions]
            _, release = self._hold(versions)  # InvalidRequest for a version that is not loaded, as with torch
            try:
                for _ in self._run_engine(prompts, settings, answers, threading.Event()):
                    pass
            finally:
                release()
            return answers
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        answers: list[Answer] = []
        for start in range(0, len(conversations), batch_size):
            chunk = range(start, min(start + batch_size, len(conversations)))
            prompts = [self.build_prompt(conversations[i], settings)[0] for i in chunk]
            answers += self._generate_padded(prompts, settings, [versions[i] for i in chunk])
        return answers

    def _generate_padded(self, prompts: list[list[int]], settings: GenerationSettings, versions: list[str]):
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # (B, P)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
            **sampling_kwargs(settings, [width - len(p) for p in prompts]),
        )
        names, release = self._hold(versions)
        try:
            if any(name != self.model.active_adapter for name in names):
                kwargs["adapter_names"] = names
            with torch.inference_mode():
                out = self.model.generate(**kwargs)[:, width:]  # (B, T)
        finally:
            release()
        answers = []
        for row, version in zip(out.tolist(), versions):
            eos = self.tokenizer.eos_token_id
            ids = row[: row.index(eos)] if eos in row else row
            finish = "eos" if eos in row else "length"
            cut = loop_cut(ids) if settings.stop_loops else None
            if cut is not None:  # what the streaming loop stop would have kept
                ids, finish = ids[:cut], "loop"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            answers.append(Answer(text=text, token_ids=ids, finish_reason=finish, adapter_version=version))
        return answers

    def kl_to_base(
        self, conversations: list[list[dict]], answers: list[Answer], settings: GenerationSettings, batch_size: int = 8
    ) -> list[float]:
        """Per answer, sum over its tokens of log pi(y_t) - log pi_base(y_t) at the sampling temperature (k1)."""
        # The KL that PPO's leash and the trainer's gate measure: penalised logits / temperature, no top-p, answers
        # sampled from the version itself (k1 is unbiased then; http://joschu.net/blog/kl-approx.html).
        temperature = settings.temperature if settings.temperature > 0 else 1.0
        out: list[float] = []
        for start in range(0, len(answers), batch_size):
            chunk = range(start, min(start + batch_size, len(answers)))
            prompts = [self.build_prompt(conversations[i], settings)[0] for i in chunk]
            replies = [
                answers[i].token_ids + ([self.tokenizer.eos_token_id] if answers[i].finish_reason == "eos" else [])
                for i in chunk
            ]
            versions = [answers[i].adapter_version for i in chunk]
            lp = self._answer_logprobs(prompts, replies, versions, temperature, settings)
            lp_base = self._answer_logprobs(prompts, replies, [BASE] * len(prompts), temperature, settings)
            out += [a - b for a, b in zip(lp, lp_base)]
        return out

    def _answer_logprobs(self, prompts, replies, versions, temperature: float, settings) -> list[float]:
        """Summed log-probs of each reply after its prompt under its version, one right-padded forward."""
        seqs = [p + r for p, r in zip(prompts, replies)]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)  # (B, S)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)  # (B, S)
        names, release = self._hold(versions)
        try:
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, adapter_names=names).logits  # (B, S, V)
        finally:
            release()
        sums = []
        for i, (p, r) in enumerate(zip(prompts, replies)):
            if not r:
                sums.append(0.0)
                continue
            row = logits[i, len(p) - 1 : len(p) - 1 + len(r)].float()  # (T, V), predicting each reply token
            penalty, last_n = settings.repetition_penalty, settings.repetition_last_n
            row = penalize_positions(
                row[None], ids[i : i + 1], torch.zeros(1, dtype=torch.long), len(p), penalty, last_n
            )
            row = row[0] / temperature
            target = torch.tensor(r, device=row.device)
            sums.append(float((row.gather(-1, target[:, None])[:, 0] - torch.logsumexp(row, -1)).sum()))
        return sums

    # --- adapters ------------------------------------------------------------------------------------------
    def swap(self, adapter_path: str | Path | None, version: str) -> None:
        """Serve `version` from now on (None path = base with a fresh LoRA); waits for running generations."""
        if adapter_path is not None:
            check_folder(adapter_path)
        # Comparison adapters are dropped with the old live one: they are loaded again when a Compare asks for them.
        served = {}
        if self.engine is not None and adapter_path is not None:
            served[version] = self._lora_gguf(adapter_path)  # before anything changes: a bad file changes nothing
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
            self._gguf = served
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
        lora = self._lora_gguf(adapter_path) if self.engine is not None else None
        self._lock.acquire_write()
        try:
            name = f"cmp_{version}"
            if self.engine is not None:
                served = {**self._gguf, version: lora}
                self._engine_serve(served)
                self._gguf = served
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
