"""Reward model for few votes: a linear Bradley-Terry head on frozen features of the base LM, fitted in seconds.

What it knows:
- Features of (conversation, answer): the frozen base LM (no LoRA) reads template(conversation) + answer + end of
  turn, exactly as `RewardModel.encode` cuts it; the hidden states are mean-pooled over the answer's tokens at 1/3,
  1/2 and 2/3 of the depth and after the final norm, and the final state of the last token is added: 5 x H numbers
  (2,880 for SmolLM2-135M), standardised with the training answers' mean and std. Middle layers carry the words and
  the layout of an answer, the last token what the model makes of it as a whole.
- Why not fine-tune: with tens of votes a LoRA reward model memorises them (measured on a simulated rater's votes,
  64 pairs: 0.44 held-out accuracy for the LoRA model vs 0.78 for this one; bench/RESULTS.md ## Simulated raters).
  A linear probe on frozen features has few degrees of freedom, needs no backward pass through the LM, and
  an answer's features never change, so they are cached and a round computes only the new answers'.
- Objective: the losses of `reward.py` (Bradley-Terry on A/B choices, the tie loss, the thumbs loss, same weights)
  plus `reward_probe_l2` * |w|^2, minimised over all feedback at once with L-BFGS (a convex problem: no epochs,
  no learning rate, the same result every time). Held-out accuracy comes from a fit on the split's training part
  (split by conversation, as reward.py does); the model then keeps the fit on all feedback, since with few votes
  every vote counts.

What it does not know: where votes come from, PPO, or how to save itself (a round refits it in seconds).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import Config
from .models import load_base, prepare_cpu_4bit
from .reward import PAIR, TIE, RewardDataError, RewardModel

DEPTHS = (1 / 3, 1 / 2, 2 / 3)
"""Fractions of the depth whose hidden states are mean-pooled over the answer (the final norm's output is added)."""
CACHE_LIMIT = 50_000
"""Most answers whose features are kept (about 11 KB each for SmolLM2-135M)."""


class ProbeRewardModel(RewardModel):
    """Scores (conversation, answer) with a linear head on frozen LM features; same interface as RewardModel."""

    def __init__(self, base, tokenizer, cfg: Config):
        self._setup(base, tokenizer, cfg, next(base.parameters()).device)
        self._decoder = base.get_decoder()
        n_layers = len(self._decoder.layers)
        self._layers = sorted({max(0, min(n_layers - 1, round(d * n_layers) - 1)) for d in DEPTHS})
        hidden = base.config.get_text_config().hidden_size
        self.n_features = hidden * (len(self._layers) + 2)
        self.head = torch.nn.Linear(self.n_features, 1, dtype=torch.float32)  # on CPU: the fit is tiny
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.feat_mean = torch.zeros(self.n_features)
        self.feat_std = torch.ones(self.n_features)
        self._features: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def create(cls, cfg: Config, base=None, tokenizer=None) -> ProbeRewardModel:
        """A reward model on `base` (frozen; loaded by models.load_base(cfg) unless given) with an untrained head."""
        if base is None or tokenizer is None:
            base, tokenizer = load_base(cfg)
        prepare_cpu_4bit(base, cfg)  # on CPU: plain linears with the NF4 values (fast whole-sequence forwards)
        base.requires_grad_(False)
        base.eval()
        return cls(base, tokenizer, cfg)

    # --- features ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _compute(self, seqs: list[tuple[list[int], int]]) -> torch.Tensor:
        """Features (N, F) of (ids, answer length) sequences in one right-padded forward."""
        n, t = len(seqs), max(len(s) for s, _ in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, t), pad, dtype=torch.long)  # (N, T)
        mask = torch.zeros((n, t), dtype=torch.long)  # (N, T)
        answer = torch.zeros((n, t), dtype=torch.bool)  # (N, T) the answer's tokens
        for i, (s, n_answer) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            answer[i, len(s) - n_answer : len(s)] = True
        captured: list[torch.Tensor] = []
        hooks = [
            self._decoder.layers[i].register_forward_hook(
                lambda m, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
            )
            for i in self._layers
        ]
        try:
            final = self._decoder(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
            ).last_hidden_state  # (N, T, H)
        finally:
            for h in hooks:
                h.remove()
        weights = (answer.float() / answer.sum(1, keepdim=True).clamp(min=1)).to(self.device)  # (N, T)
        pooled = [torch.einsum("nt,nth->nh", weights, h.float()) for h in (*captured, final)]  # each (N, H)
        last = final[torch.arange(n), mask.sum(1).to(self.device) - 1].float()  # (N, H)
        return torch.cat([*pooled, last], dim=1).cpu()  # (N, F)

    def features(self, prompts: list, answers: list[str], batch_size: int = 8) -> torch.Tensor:
        """Raw features (N, F) of each answer to its conversation, from the cache where it has them."""
        seqs = [self.encode_parts(p, a)[::2] for p, a in zip(prompts, answers, strict=True)]
        keys = [(*s, n) for s, n in seqs]
        todo = sorted({k for k in keys if k not in self._features}, key=len)
        if len(self._features) + len(todo) > CACHE_LIMIT:
            self._features.clear()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            feats = self._compute([(list(k[:-1]), k[-1]) for k in chunk])
            self._features.update(zip(chunk, feats))
        if not keys:
            return torch.empty(0, self.n_features)
        return torch.stack([self._features[k] for k in keys])

    def _standardised(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.feat_mean) / self.feat_std

    # --- scoring: RewardModel.score, accuracy and set_normalisation call this ---------------------------
    def _raw_scores(self, prompts: list[list[dict]], answers: list[str], batch_size: int) -> torch.Tensor:
        """Unnormalised rewards (B,) float32 on CPU: the linear head on the standardised features."""
        with torch.no_grad():
            return self.head(self._standardised(self.features(prompts, answers, batch_size)))[:, 0]

    # --- training ----------------------------------------------------------------------------------------
    def _objective(self, x: torch.Tensor, examples: list, index: list[list[int]]) -> Callable[[], torch.Tensor]:
        """Mean weighted loss of the examples + L2 on the weights, as a function of the head's current weights."""
        kinds = [e.kind for e in examples]
        first = torch.tensor([ix[0] for ix in index])  # (E,) first sequence of each example
        second = torch.tensor([ix[-1] for ix in index])  # (E,) second (= first for a thumb)
        is_pair = torch.tensor([k == PAIR for k in kinds])
        is_tie = torch.tensor([k == TIE for k in kinds])
        up = torch.tensor([e.up for e in examples])
        cfg = self.cfg

        def loss() -> torch.Tensor:
            r = self.head(x)[:, 0]  # (S,)
            d = r[first] - r[second]  # (E,) chosen - rejected, or a - b for a tie
            per = torch.where(
                is_pair,
                -F.logsigmoid(d),
                torch.where(
                    is_tie,
                    cfg.reward_tie_weight * -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d)),
                    cfg.reward_pointwise_weight * -F.logsigmoid(torch.where(up, r[first], -r[first])),
                ),
            )
            return per.mean() + cfg.reward_probe_l2 * self.head.weight.pow(2).sum()

        return loss

    def _fit_head(self, x: torch.Tensor, examples: list, index: list[list[int]]) -> float:
        """Minimise the objective from zero weights with L-BFGS; the final loss."""
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        loss_fn = self._objective(x, examples, index)
        opt = torch.optim.LBFGS(
            self.head.parameters(), max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return float(loss_fn())

    def _pair_accuracy(self, x: torch.Tensor, examples: list, index: list[list[int]]) -> float | None:
        with torch.no_grad():
            r = self.head(x)[:, 0]
        right = [
            float(r[ix[0]] > r[ix[1]]) + 0.5 * float(r[ix[0]] == r[ix[1]])
            for e, ix in zip(examples, index)
            if e.kind == PAIR
        ]
        return sum(right) / len(right) if right else None

    def _fit(self, examples: list, train: list, held: list, counts: dict, eval_fraction: float, progress) -> dict:
        """Fit the head on A/B pairs, ties and thumbs (from scratch: the problem is convex); held-out metrics."""
        progress({"step": 0, "steps": 2, "stage": "features"})
        prompts = [e.prompt for e in examples for _ in e.answers]
        answers = [a for e in examples for a in e.answers]
        feats = self.features(prompts, answers)  # (S, F)
        index, pos = {}, 0
        for e in examples:
            index[id(e)] = list(range(pos, pos + len(e.answers)))
            pos += len(e.answers)
        train_rows = [i for e in train for i in index[id(e)]]
        self.feat_mean = feats[train_rows].mean(0)
        self.feat_std = (
            feats[train_rows].std(0).nan_to_num(0.0) + 1e-3 if len(train_rows) > 1 else torch.ones_like(feats[0])
        )
        x = self._standardised(feats)
        eval_loss = accuracy = None
        if held:
            self._fit_head(x, train, [index[id(e)] for e in train])
            with torch.no_grad():
                eval_loss = float(self._objective(x, held, [index[id(e)] for e in held])())
            accuracy = self._pair_accuracy(x, held, [index[id(e)] for e in held])
        progress({"step": 1, "steps": 2, "stage": "fit"})
        train_loss = self._fit_head(x, examples, [index[id(e)] for e in examples])
        progress({"step": 2, "steps": 2, "loss": train_loss})
        sample = [(e.prompt, a) for e in examples for a in e.answers]
        random.Random(self.cfg.seed).shuffle(sample)
        sample = sample[: self.cfg.reward_norm_samples]
        norm = self.set_normalisation([p for p, _ in sample], [a for _, a in sample])
        return {
            "kind": "probe",
            "train_loss": train_loss,
            "eval_loss": eval_loss,
            "accuracy": accuracy,
            "norm_mean": norm["mean"],
            "norm_std": norm["std"],
            "n_features": self.n_features,
            "warning": "" if held or not eval_fraction else "Too few conversations to hold any out: no accuracy.",
        }


__all__ = ["ProbeRewardModel", "RewardDataError"]
