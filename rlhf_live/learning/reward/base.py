"""What every reward model does, whatever it is made of: fit on votes, score answers, tell which of two is better.

`Scorer` is the protocol the trainer, PPO, rm-dpo and Compare use; a reward model supplies `_fit` (its training)
and `_raw_scores` (its forward). Knows votes as examples and scores as tensors; knows nothing of the store or serving.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

import torch

from rlhf_live.config import Config
from rlhf_live.learning.reward.data import RewardDataError, as_messages, collect, get_field, split, split_counts
from rlhf_live.learning.reward.encoding import Encoder


class Scorer:
    """Fit on A/B choices, ties and thumbs; score (conversation, answer); P(a beats b); which two to show."""

    def _setup(self, model, tokenizer, cfg: Config, device: torch.device) -> None:
        """What every reward model holds: the LM, its tokenizer, settings, device, normalisation, prompt cache."""
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.norm_mean: float | None = None
        self.norm_std: float | None = None
        self.norm_spread: float | None = None
        """Mean std of the ensemble members' normalised scores on the voted answers; None: no ensemble."""
        self.encoder = Encoder(tokenizer, cfg.reward_max_tokens)

    # --- encoding ----------------------------------------------------------------------------------------
    def encode(self, prompt, answer: str) -> tuple[list[int], str]:
        """Token ids of template(prompt) + answer + end of turn, within reward_max_tokens; (ids, what was cut)."""
        ids, cut, _ = self.encoder.parts(prompt, answer)
        return ids, cut

    def encode_parts(self, prompt, answer: str) -> tuple[list[int], str, int]:
        """encode() and how many of the last ids are the answer's (its end-of-turn tokens included)."""
        return self.encoder.parts(prompt, answer)

    def fit(
        self,
        pairs: Iterable = (),
        *,
        ties: Iterable = (),
        pointwise: Iterable = (),
        eval_fraction: float = 0.1,
        progress: Callable[[str], None] | None = None,
    ) -> dict:
        """Train on A/B pairs, ties and thumbs; metrics of the held-out part (split by conversation).

        `progress(detail)` is called after every step with a line such as 'step 3/46, loss 0.690'; it may block,
        e.g. to let serving go first (the same shape as the direct learners' and PPO's progress within a round).
        """
        start = time.time()
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        examples, counts = collect(list(pairs or ()), list(ties or ()), list(pointwise or ()))
        train, held = split(examples, eval_fraction, self.cfg.seed)
        metrics = self._fit(examples, train, held, counts, eval_fraction, progress or (lambda detail: None))
        return {**metrics, **split_counts(train, held), **counts, "seconds": round(time.time() - start, 2)}

    def _fit(self, examples, train, held, counts: dict, eval_fraction: float, progress) -> dict:
        raise NotImplementedError

    def _raw_scores(self, prompts: list[list[dict]], answers: list[str], batch_size: int) -> torch.Tensor:
        raise NotImplementedError

    def score(
        self, prompts: list[list[dict]], answers: list[str], *, normalise: bool = False, batch_size: int = 8
    ) -> torch.Tensor:
        """Reward (B,) float32 on CPU of each answer to its conversation; normalised to the stored mean/std if asked."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers: one answer per prompt")
        if not answers:
            return torch.empty(0, dtype=torch.float32)
        r = self._raw_scores(prompts, answers, batch_size)
        if normalise:
            if self.norm_mean is None or self.norm_std is None:
                raise RuntimeError("No normalisation statistics: call fit() or set_normalisation() first.")
            r = (r - self.norm_mean) / self.norm_std
        return r

    def member_scores(self, prompts: list[list[dict]], answers: list[str]) -> torch.Tensor | None:
        """Each ensemble member's normalised reward (B, K), the fit on all votes first; None: no ensemble."""
        return None

    def prob_better(self, prompts: list[list[dict]], a: list[str], b: list[str]) -> torch.Tensor:
        """P(a beats b) (N,) by Bradley-Terry on the scores (a point estimate: no uncertainty)."""
        return torch.sigmoid(self.score(prompts, a) - self.score(prompts, b))

    def pick_pair(self, prompt: list[dict], answers: list[str], rng: random.Random) -> tuple[int, int] | None:
        """Which two of several sampled answers to show in Compare; None: no opinion (the caller picks at random)."""
        return None

    def accuracy(self, pairs: Iterable, batch_size: int = 8) -> float:
        """Fraction of pairs where the chosen answer scores higher (a tie counts half)."""
        pairs = list(pairs)
        if not pairs:
            raise RewardDataError("accuracy() needs at least one pair.")
        prompts = [as_messages(get_field(p, "prompt", i, "pair")) for i, p in enumerate(pairs)]
        chosen = [get_field(p, "chosen", i, "pair") for i, p in enumerate(pairs)]
        rejected = [get_field(p, "rejected", i, "pair") for i, p in enumerate(pairs)]
        r = self.score(prompts + prompts, chosen + rejected, batch_size=batch_size)
        rc, rr = r[: len(pairs)], r[len(pairs) :]
        return ((rc > rr).float() + 0.5 * (rc == rr).float()).mean().item()

    def set_normalisation(self, prompts: list[list[dict]], answers: list[str]) -> dict:
        """Store mean/std of raw scores of these answers (e.g. reference-policy samples) for score(normalise=True)."""
        if not answers:
            raise RewardDataError("set_normalisation() needs at least one answer.")
        r = self.score(prompts, answers)
        std = r.std().item() if len(r) > 1 else 0.0
        self.norm_mean = r.mean().item()
        self.norm_std = std if std > 1e-6 else 1.0  # one answer, or all equal: centre only
        return {"mean": self.norm_mean, "std": self.norm_std, "n": len(r)}
