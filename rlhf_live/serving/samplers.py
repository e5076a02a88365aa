"""What samples answers for the Policy: one interface, two implementations (torch on the served PeftModel, and
llama.cpp on the same weights in its own process), and the answers they stream.

A sampler turns prompt ids into answers token by token, with the served chain (repetition penalty, temperature, top-p)
and the loop stop; it knows nothing of conversations, locks, versions' folders or the store: the Policy resolves which
adapter each answer uses and holds the lock while a sampler runs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from rlhf_live.model.lora import BASE
from rlhf_live.model.sampling import LoopStop, loop_cut
from rlhf_live.serving import llamacpp as llama
from rlhf_live.serving.settings import GenerationSettings, sampling_kwargs

_clock = time.monotonic
Steps = Iterator[tuple[str, ...]]
"""The texts so far of every answer after each new token; the last item is the final texts."""


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
        steps: Steps,
        cancel: threading.Event,
        stops: list[threading.Event] | None = None,
    ):
        self.answers = answers
        self._steps = steps
        self._cancel = cancel
        self._stops = stops or [threading.Event() for _ in answers]
        self.prompt_tokens = 0
        self.dropped_messages = 0

    def __iter__(self) -> Steps:
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


class Sampler:
    """Prompt ids in, answers out, token by token; what both implementations share (texts, loop stop, endings)."""

    batches_versions = False
    """Whether one batch may mix adapter versions without the Policy's exclusive lock."""
    batch_size: int | None = None
    """Conversations per call of `many` (None: all at once)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def run(self, prompts, settings, answers, names, cancel, stops) -> Steps:
        """Sample `answers` (one per prompt id list) with adapter `names`; texts after every token, then final."""
        raise NotImplementedError

    def many(self, prompts: list[list[int]], settings: GenerationSettings, answers: list[Answer], names) -> None:
        """Fill `answers` (one per prompt), as fast as a batch allows; nothing streamed."""
        for _ in self.run(prompts, settings, answers, names, threading.Event(), None):
            pass

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


class _AllStopped(StoppingCriteria):
    """generate() ends once every answer has ended (EOS, its loop stop, or the whole stream cancelled)."""

    def __init__(self, cancel: threading.Event, stops: list[threading.Event]):
        self.cancel, self.stops = cancel, stops

    def __call__(self, input_ids, scores, **kwargs):
        done = self.cancel.is_set() or all(s.is_set() for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class TorchSampler(Sampler):
    """transformers' generate() on the served PeftModel: the reference implementation, and the CUDA path."""

    batch_size = 16  # on 2 CPU cores a batch of 16 decodes several times the tokens/s of 2 (bench/RESULTS.md)

    def __init__(self, model: PeftModel, tokenizer):
        super().__init__(tokenizer)
        self.model = model
        self.device = next(model.parameters()).device

    def _adapters(self, kwargs: dict, names: list[str]) -> dict:
        # Mixed-adapter batch (https://huggingface.co/docs/peft/developer_guides/lora#inference-with-different-lora-adapters-in-the-same-batch)
        if any(name != self.model.active_adapter for name in names):
            kwargs["adapter_names"] = names
        return kwargs

    def run(self, prompts, settings, answers, names, cancel, stops) -> Steps:
        """One prompt, `len(answers)` samples in one batch, read from generate()'s streamer in a worker thread."""
        n, eos = len(answers), self.tokenizer.eos_token_id
        tokens = _TokenQueue()
        input_ids = torch.tensor([prompts[0]] * n, device=self.device)
        loops = [LoopStop() if settings.stop_loops else None for _ in answers]
        stops = stops or [threading.Event() for _ in answers]
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
            streamer=tokens,
            stopping_criteria=StoppingCriteriaList([_AllStopped(cancel, stops)]),
            **sampling_kwargs(settings),
        )
        self._adapters(kwargs, names)
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

    def many(self, prompts: list[list[int]], settings: GenerationSettings, answers: list[Answer], names) -> None:
        """One left-padded generate() over every prompt; the loop stop applied afterwards, as streaming would cut."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # (B, P)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            **sampling_kwargs(settings, [width - len(p) for p in prompts]),
        )
        with torch.inference_mode():
            out = self.model.generate(**self._adapters(kwargs, names))[:, width:]  # (B, T)
        for row, a in zip(out.tolist(), answers):
            ids = row[: row.index(eos)] if eos in row else row
            finish = "eos" if eos in row else "length"
            cut = loop_cut(ids) if settings.stop_loops else None
            if cut is not None:  # what the streaming loop stop would have kept
                ids, finish = ids[:cut], "loop"
            a.text, a.token_ids, a.finish_reason = self.tokenizer.decode(ids, skip_special_tokens=True), ids, finish


class _Either:
    """Set when either event is (the engine's cancel flag for one answer of several)."""

    def __init__(self, a: threading.Event, b: threading.Event):
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()


def engine_sampling(settings: GenerationSettings, i: int) -> llama.Sampling:
    """llama.cpp's sampling of answer `i` of a request: the same chain, a seed of its own."""
    seed = None if settings.seed is None else settings.seed + i  # n answers to one prompt must differ
    s = settings
    return llama.Sampling(s.max_new_tokens, s.temperature, s.top_p, seed, s.repetition_penalty, s.repetition_last_n)


class LlamaCppSampler(Sampler):
    """llama.cpp in its own process on the same weights (merged per version): one request per answer, batched there."""

    batches_versions = True  # each version is its own server or runtime LoRA: no PEFT hooks to share

    def __init__(self, engine: llama.LlamaCppEngine, tokenizer):
        super().__init__(tokenizer)
        self.engine = engine
        self.files: dict[str, Path] = {}
        """version -> its file in the engine; a version not here samples as the base."""

    def run(self, prompts, settings, answers, names, cancel, stops) -> Steps:
        """Answers sampled by llama.cpp, one request each (one prompt for all, or one per answer)."""
        prompts = prompts * len(answers) if len(prompts) == 1 else prompts
        eos = self.tokenizer.eos_token_id
        sink: queue.Queue = queue.Queue()
        threads, errors = [], []
        loops = [LoopStop() if settings.stop_loops else None for _ in answers]
        stops = stops or [threading.Event() for _ in answers]  # one answer's stop ends that request only
        try:
            for i, (prompt, a) in enumerate(zip(prompts, answers)):
                version = a.adapter_version if a.adapter_version in self.files else None
                sampling = engine_sampling(settings, i)
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
            yield self._finish(answers, errors, cancel)
        finally:
            cancel.set()
            for t in threads:
                t.join()


def coalesced(updates: Iterator, interval: float) -> Iterator:
    """The first update, then the newest at most every `interval` seconds, and always the last one."""
    # One update per token costs the server and a browser on the same cores more than the engine takes to write
    # it (bench/RESULTS.md, "Page streaming"), so the tokens in between go together (Config.stream_interval_s).
    sent_at, pending, held = -float("inf"), None, False
    for update in updates:
        now = _clock()
        if now - sent_at >= interval:
            sent_at, held = now, False
            yield update
        else:
            pending, held = update, True
    if held:
        yield pending
