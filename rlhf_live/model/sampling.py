"""How logits become the served next-token distribution, the same in every engine: repetition penalty, loop stop.

Knows tensors, token ids and llama.cpp's penalty rule; knows nothing of models, prompts, engines or SQL. Serving
(torch and llama.cpp), PPO's rollouts, PPO's recomputed log-probs and the KL the gate measures all go through here,
so the trained policy is the served one (tests/unit/test_sampling.py checks each against the others).

- Repetition penalty, exactly llama.cpp's `penalties` sampler (CTRL, Keskar et al. 2019, https://arxiv.org/abs/1909.05858,
  with llama.cpp's fix for negative logits): every token seen in the last `last_n` tokens of prompt + answer has its
  logit divided by `penalty` when positive, multiplied when negative. It comes first, before temperature and top-p,
  as in llama.cpp's chain (https://github.com/ggml-org/llama.cpp/blob/master/src/llama-sampling.cpp).
- Loop stop: an answer whose newest tokens are the same unit repeated (3+ copies covering `LOOP_MIN_SPAN` tokens)
  is cut after its first copy. A deterministic function of the sampled tokens, like the length cap, so it changes no
  log-prob: the answer kept is a prefix of what was sampled.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

LOOP_MAX_UNIT = 64
"""Longest repeated unit (tokens) the loop stop looks for."""
LOOP_MIN_SPAN = 24
"""Fewest tokens the repeated copies must cover before an answer counts as looping (at least 3 copies)."""


def penalize(logits: torch.Tensor, window: torch.Tensor, valid: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition-penalised logits (..., V): tokens in `window` (..., W) where `valid` are penalised (llama.cpp)."""
    if penalty == 1.0 or window.shape[-1] == 0:
        return logits
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)  # (..., V)
    # Dense (not gather/scatter) so that a token seen twice is penalised once and its gradient is counted once.
    seen.scatter_(-1, torch.where(valid, window, 0), valid)
    if not bool(valid.all()):  # index 0 received False from invalid slots; set it again where it was really seen
        seen[..., 0] = ((window == 0) & valid).any(-1)
    penalised = torch.where(logits <= 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def windows(ids: torch.Tensor, start: torch.Tensor, positions: torch.Tensor, last_n: int) -> tuple:
    """For each row b and position t, the ids of ids[b, max(start[b], t - last_n) : t]: ((B, T, W), valid (B, T, W))."""
    offsets = torch.arange(-last_n, 0, device=ids.device)  # (W,)
    pos = positions[:, None] + offsets[None, :]  # (T, W)
    pos = pos[None].expand(ids.shape[0], -1, -1)  # (B, T, W)
    valid = pos >= start[:, None, None]
    gathered = ids.gather(1, pos.clamp(min=0).reshape(ids.shape[0], -1)).reshape(pos.shape)
    return gathered, valid


def penalize_positions(
    logits: torch.Tensor, ids: torch.Tensor, start: torch.Tensor, first: int, penalty: float, last_n: int
) -> torch.Tensor:
    """Penalised logits (B, T, V) predicting ids[:, first + t], from the tokens before each position (PPO, KL)."""
    if penalty == 1.0 or last_n <= 0:
        return logits
    positions = torch.arange(first, first + logits.shape[1], device=ids.device)  # (T,)
    window, valid = windows(ids, start, positions, last_n)
    return penalize(logits, window, valid, penalty)


class RepetitionPenalty(LogitsProcessor):
    """transformers' generate() with llama.cpp's penalty; `start[b]` is row b's first real (not padding) token."""

    def __init__(self, penalty: float, last_n: int, start: list[int] | None = None):
        self.penalty, self.last_n, self.start = penalty, last_n, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.penalty == 1.0 or self.last_n <= 0:
            return scores
        start = torch.tensor(self.start or [0] * input_ids.shape[0], device=input_ids.device)  # (B,)
        position = torch.tensor([input_ids.shape[1]], device=input_ids.device)  # predicting the next token
        window, valid = windows(input_ids, start, position, self.last_n)  # (B, 1, W)
        return penalize(scores[:, None], window, valid, self.penalty)[:, 0]


def generate_kwargs(
    temperature: float, top_p: float, penalty: float, last_n: int, start: list[int] | None = None
) -> dict:
    """transformers generate() arguments that sample as llama.cpp's chain: penalty, then temperature, then top-p."""
    # generate()'s own warpers are turned off (temperature 1, top-p 1, top-k 0) and ours run in llama.cpp's order;
    # its built-in repetition_penalty would look at the whole padded input, not the last `last_n` real tokens.
    chain = LogitsProcessorList([RepetitionPenalty(penalty, last_n, start)] if penalty != 1.0 else [])
    off = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    if temperature <= 0:
        return {"do_sample": False, "logits_processor": chain, **off}
    chain.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    return {"do_sample": True, "logits_processor": chain, **off}


class LoopStop:
    """Watches an answer token by token; `push` returns where to cut it once it loops, else None."""

    def __init__(self, max_unit: int = LOOP_MAX_UNIT, min_span: int = LOOP_MIN_SPAN):
        self.max_unit, self.min_span = max_unit, min_span
        self.ids: list[int] = []
        self._run = [0] * (max_unit + 1)  # _run[L]: how many newest tokens equal the token L before them

    def push(self, token: int) -> int | None:
        """Add one token; the length to cut the answer to (its first copy of the loop) when it now loops."""
        self.ids.append(token)
        n = len(self.ids)
        for unit in range(1, min(self.max_unit, n - 1) + 1):
            run = self._run[unit] + 1 if self.ids[-1] == self.ids[-1 - unit] else 0
            self._run[unit] = run
            if run >= 2 * unit and run + unit >= self.min_span:
                return n - run
        return None


def loop_cut(ids: list[int], max_unit: int = LOOP_MAX_UNIT, min_span: int = LOOP_MIN_SPAN) -> int | None:
    """Where LoopStop would have cut `ids` (the first time it loops), or None if it never does."""
    stop = LoopStop(max_unit, min_span)
    for token in ids:
        cut = stop.push(token)
        if cut is not None:
            return cut
    return None
