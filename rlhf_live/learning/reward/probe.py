"""Reward model for few votes: a linear Bradley-Terry head on frozen features of the base LM, fitted in seconds.

What it knows:
- Features of (conversation, answer): the frozen base LM (no LoRA) reads template(conversation) + answer + end of
  turn, exactly as `Scorer.encode` cuts it; the hidden states are mean-pooled over the answer's tokens at 1/3,
  1/2 and 2/3 of the depth and after the final norm, and the final state of the last token is added: 5 x H numbers
  (2,880 for SmolLM2-135M), standardised with the training answers' mean and std. Middle layers carry the words and
  the layout of an answer, the last token what the model makes of it as a whole.
- Why not fine-tune: with tens of votes a LoRA reward model memorises them, where this one generalises (held-out
  accuracy on a simulated rater's votes: bench/RESULTS.md ## Simulated raters).
  A linear probe on frozen features has few degrees of freedom, needs no backward pass through the LM, and
  an answer's features never change, so they are cached and a round computes only the new answers'.
- Objective: the losses of `losses.py` (Bradley-Terry on A/B choices, the tie loss, the thumbs loss, same weights)
  plus `reward_probe_l2` * |w|^2, minimised over all feedback at once with L-BFGS (a convex problem: no epochs,
  no learning rate, the same result every time). Held-out accuracy comes from a fit on the split's training part
  (split by conversation, as reward/data.py does); the model then keeps the fit on all feedback, since with few votes
  every vote counts.

What it does not know: where votes come from, PPO, or how to save itself (a round refits it in seconds).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_live.config import Config
from rlhf_live.learning.reward.base import Scorer
from rlhf_live.learning.reward.data import PAIR, POINT, TIE, RewardDataError, collect
from rlhf_live.model.base import load_base, prepare_cpu_4bit

DEPTHS = (1 / 3, 1 / 2, 2 / 3)
"""Fractions of the depth whose hidden states are mean-pooled over the answer (the final norm's output is added)."""
CACHE_LIMIT = 50_000
"""Most answers whose features are kept (about 11 KB each for SmolLM2-135M)."""


@dataclass(frozen=True)
class Posterior:
    """What the votes leave open, frozen after a fit: serving draws from it while the trainer refits."""

    members: torch.Tensor
    """(K, F+1) head weights with the bias last: the fit on all votes, then prior + fit on bootstrap resamples."""
    feat_mean: torch.Tensor
    """(F,) the features' standardisation at fit time."""
    feat_std: torch.Tensor
    """(F,) likewise."""

    def design(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardised features with a constant 1 for the bias, (N, F+1)."""
        x = (feats - self.feat_mean) / self.feat_std
        return torch.cat([x, torch.ones(len(x), 1)], dim=1)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One member's weights (F+1,), drawn uniformly: a Thompson draw of the reward."""
        return self.members[int(torch.randint(len(self.members), (1,), generator=generator))]

    def prob_better(self, d: torch.Tensor) -> torch.Tensor:
        """P(first beats second) (N,) for design differences d (N, F+1): Bradley-Terry averaged over the members."""
        return torch.sigmoid(d @ self.members.T).mean(1)


class ProbeRewardModel(Scorer):
    """Scores (conversation, answer) with a linear head on frozen LM features (a Scorer, as the LoRA RewardModel)."""

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
        self.posterior: Posterior | None = None
        """The head's uncertainty after the last fit (None before the first)."""

    @classmethod
    def create(cls, cfg: Config, base=None, tokenizer=None) -> ProbeRewardModel:
        """A reward model on `base` (frozen; loaded by load_base(cfg) unless given) with an untrained head."""
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
        # output_hidden_states, not forward hooks: serving threads pick Compare pairs with these features while the
        # trainer fits (transformers records hidden states per call, in a ContextVar).
        out = self._decoder(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            use_cache=False,
            output_hidden_states=True,
        )
        final = out.last_hidden_state  # (N, T, H)
        captured = [out.hidden_states[i + 1] for i in self._layers]  # each layer's output, (N, T, H)
        weights = (answer.float() / answer.sum(1, keepdim=True).clamp(min=1)).to(self.device)  # (N, T)
        pooled = [torch.einsum("nt,nth->nh", weights, h.float()) for h in (*captured, final)]  # each (N, H)
        last = final[torch.arange(n), mask.sum(1).to(self.device) - 1].float()  # (N, H)
        return torch.cat([*pooled, last], dim=1).cpu()  # (N, F)

    def features(self, prompts: list, answers: list[str], batch_size: int = 8) -> torch.Tensor:
        """Raw features (N, F) of each answer to its conversation, from the cache where it has them."""
        seqs = [self.encode_parts(p, a)[::2] for p, a in zip(prompts, answers, strict=True)]
        keys = [(*s, n) for s, n in seqs]
        found = {k: self._features.get(k) for k in keys}  # a local view: another thread may clear the cache
        todo = sorted((k for k, v in found.items() if v is None), key=len)
        if len(self._features) + len(todo) > CACHE_LIMIT:
            self._features.clear()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            feats = self._compute([(list(k[:-1]), k[-1]) for k in chunk])
            found.update(zip(chunk, feats))
            self._features.update(zip(chunk, feats))
        if not keys:
            return torch.empty(0, self.n_features)
        return torch.stack([found[k] for k in keys])

    def _standardised(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.feat_mean) / self.feat_std

    # --- scoring: Scorer.score, accuracy and set_normalisation call this ---------------------------
    def _raw_scores(self, prompts: list[list[dict]], answers: list[str], batch_size: int) -> torch.Tensor:
        """Unnormalised rewards (B,) float32 on CPU: the linear head on the standardised features."""
        with torch.no_grad():
            return self.head(self._standardised(self.features(prompts, answers, batch_size)))[:, 0]

    def member_scores(self, prompts: list[list[dict]], answers: list[str]) -> torch.Tensor | None:
        """Each ensemble member's normalised reward (B, K), the fit on all votes first; None before a fit."""
        post = self.posterior
        if post is None or self.norm_mean is None or not answers:
            return None
        raw = post.design(self.features(prompts, answers)) @ post.members.T  # (B, K); column 0 = _raw_scores
        return (raw - self.norm_mean) / self.norm_std

    def prob_better(self, prompts: list[list[dict]], a: list[str], b: list[str]) -> torch.Tensor:
        """P(a beats b) (N,) averaged over the ensemble (what the votes leave open pulls it towards 1/2)."""
        post = self.posterior
        if post is None:
            return super().prob_better(prompts, a, b)
        d = post.design(self.features(prompts, a)) - post.design(self.features(prompts, b))  # (N, F+1)
        return post.prob_better(d)

    def pick_pair(self, prompt: list[dict], answers: list[str], rng: random.Random) -> tuple[int, int] | None:
        """Double Thompson sampling (Dwaracherla et al. 2024, arXiv 2402.00396): two answers worth asking about."""
        # The first is the best under one draw of the reward from the posterior; the second the best of the others under
        # a fresh draw (up to 8 draws for one that differs, else the others' best). Where the model is sure, the pair is
        # its best guess against its next; where it is unsure, the draws disagree and the pair explores.
        post = self.posterior
        ok = [i for i, a in enumerate(answers) if a.split()] or list(range(len(answers)))
        if post is None or len(ok) < 3:
            return None
        x = post.design(self.features([prompt] * len(ok), [answers[i] for i in ok]))  # (K, F+1)
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        first = int((x @ post.sample(gen)).argmax())
        for _ in range(8):
            second = int((x @ post.sample(gen)).argmax())
            if second != first:
                break
        else:
            scores = x @ post.sample(gen)
            scores[first] = -math.inf
            second = int(scores.argmax())
        return ok[first], ok[second]

    # --- training ----------------------------------------------------------------------------------------
    def _per_example(self, examples: list, index: list[list[int]]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Each example's weighted loss (E,) as a function of the sequences' scores r (S,)."""
        kinds = [e.kind for e in examples]
        first = torch.tensor([ix[0] for ix in index])  # (E,) first sequence of each example
        second = torch.tensor([ix[-1] for ix in index])  # (E,) second (= first for a thumb)
        is_pair = torch.tensor([k == PAIR for k in kinds])
        is_tie = torch.tensor([k == TIE for k in kinds])
        up = torch.tensor([e.up for e in examples])
        weight = torch.tensor([e.weight for e in examples], dtype=torch.float32)  # (E,) crowd.capped_weights
        cfg = self.cfg

        def per(r: torch.Tensor) -> torch.Tensor:
            d = r[first] - r[second]  # (E,) chosen - rejected, or a - b for a tie
            return weight * torch.where(
                is_pair,
                -F.logsigmoid(d),
                torch.where(
                    is_tie,
                    cfg.reward_tie_weight * -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d)),
                    cfg.reward_pointwise_weight * -F.logsigmoid(torch.where(up, r[first], -r[first])),
                ),
            )

        return per

    def _objective(
        self, x: torch.Tensor, examples: list, index: list[list[int]], head=None, prior: torch.Tensor | None = None
    ) -> Callable[[], torch.Tensor]:
        """Mean weighted loss of the examples + L2 on the weights, as a function of the head's current weights."""
        # `prior` (S,) is a fixed score added to the head's (a randomised prior function); the L2 is on the head alone.
        per, head = self._per_example(examples, index), head or self.head
        offset = 0.0 if prior is None else prior
        return lambda: per(head(x)[:, 0] + offset).mean() + self.cfg.reward_probe_l2 * head.weight.pow(2).sum()

    def _fit_head(self, x: torch.Tensor, examples: list, index: list[list[int]], head=None, prior=None) -> float:
        """Minimise the objective from zero weights with L-BFGS (of `head`, default the model's); the final loss."""
        head = head or self.head
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        loss_fn = self._objective(x, examples, index, head, prior)
        opt = torch.optim.LBFGS(head.parameters(), max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return float(loss_fn())

    def _ensemble(self, x: torch.Tensor, examples: list, index: list[list[int]]) -> Posterior:
        """The fit on all votes plus heads with randomised priors on bootstrap resamples (Osband et al. 2018)."""
        # Member k scores x . (w_k + p_k): p_k is a fixed random direction (scores of std `reward_prior_scale`), w_k is
        # fitted on a bootstrap resample with p_k's scores added. Where votes constrain the reward, w_k cancels p_k and
        # the members agree; elsewhere p_k stays and they disagree, so one or two votes never make the ensemble sure
        # about answers unlike them (Osband et al., arXiv 1806.03335; the ensemble of Dwaracherla et al., 2402.00396).
        gen = torch.Generator().manual_seed(self.cfg.seed)
        rng = random.Random(self.cfg.seed)
        head = torch.nn.Linear(self.n_features, 1, dtype=torch.float32)
        members = [torch.cat([self.head.weight[0], self.head.bias]).detach().clone()]  # the fit on all votes
        for _ in range(self.cfg.reward_ensemble - 1):
            # Standardised features have |x|^2 ~ F, so N(0, scale^2 / F) weights give scores of std ~ scale.
            p = torch.randn(self.n_features, generator=gen) * self.cfg.reward_prior_scale / self.n_features**0.5
            picks = [rng.randrange(len(examples)) for _ in examples]
            self._fit_head(x, [examples[i] for i in picks], [index[i] for i in picks], head, prior=x @ p)
            members.append(torch.cat([head.weight[0] + p, head.bias]).detach().clone())
        return Posterior(torch.stack(members), self.feat_mean.clone(), self.feat_std.clone())

    def _pair_accuracy(self, x: torch.Tensor, examples: list, index: list[list[int]]) -> float | None:
        with torch.no_grad():
            r = self.head(x)[:, 0]
        right = [
            float(r[ix[0]] > r[ix[1]]) + 0.5 * float(r[ix[0]] == r[ix[1]])
            for e, ix in zip(examples, index)
            if e.kind == PAIR
        ]
        return sum(right) / len(right) if right else None

    def held_out_probs(
        self, pairs=(), ties=(), pointwise=(), min_votes: int = 1, most: int | None = None, without=frozenset()
    ) -> dict[str, list[float]]:
        """Per source with `min_votes` A/B choices and thumbs (the `most` largest): each vote's probability under a
        head fitted without that source (nor the sources in `without`, which are left out of every fit).

        The leave-one-source-out consensus of crowd.evidence: the features are the fitted model's (cached), the head
        is refitted per source on everyone else's weighted votes. Call after `fit` (it reuses its standardisation).
        """
        examples, _ = collect(list(pairs or ()), list(ties or ()), list(pointwise or ()))
        examples = [e for e in examples if e.source not in without]
        index, pos = [], 0
        for e in examples:
            index.append(list(range(pos, pos + len(e.answers))))
            pos += len(e.answers)
        votes: dict[str, list[int]] = {}
        for i, e in enumerate(examples):
            if e.source and e.kind in (PAIR, POINT):
                votes.setdefault(e.source, []).append(i)
        tested = dict(sorted(((s, ix) for s, ix in votes.items() if len(ix) >= min_votes), key=lambda kv: -len(kv[1])))
        tested = dict(list(tested.items())[:most]) if most is not None else tested
        if not tested:
            return {}
        x = self._standardised(
            self.features([e.prompt for e in examples for _ in e.answers], [a for e in examples for a in e.answers])
        )
        head = torch.nn.Linear(self.n_features, 1, dtype=torch.float32)
        out = {}
        for source, mine in tested.items():
            others = [i for i, e in enumerate(examples) if e.source != source]
            if not any(examples[i].kind in (PAIR, POINT) for i in others):
                continue  # nobody else voted: no consensus to compare with
            self._fit_head(x, [examples[i] for i in others], [index[i] for i in others], head)
            with torch.no_grad():
                r = head(x)[:, 0]  # (S,)
            out[source] = [
                float(torch.sigmoid(r[index[i][0]] - r[index[i][1]]))
                if examples[i].kind == PAIR
                else float(torch.sigmoid(r[index[i][0]] if examples[i].up else -r[index[i][0]]))
                for i in mine
            ]
        return out

    def _fit(self, examples: list, train: list, held: list, counts: dict, eval_fraction: float, progress) -> dict:
        """Fit the head on A/B pairs, ties and thumbs (from scratch: the problem is convex); held-out metrics."""
        progress("step 0/2, features of the answers")
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
        progress("step 1/2, fitting the head")
        train_loss = self._fit_head(x, examples, [index[id(e)] for e in examples])
        self.posterior = self._ensemble(x, examples, [index[id(e)] for e in examples])
        progress(f"step 2/2, loss {train_loss:.3f}")
        sample = [(e.prompt, a) for e in examples for a in e.answers]
        random.Random(self.cfg.seed).shuffle(sample)
        sample = sample[: self.cfg.reward_norm_samples]
        norm = self.set_normalisation([p for p, _ in sample], [a for _, a in sample])
        members = self.member_scores([p for p, _ in sample], [a for _, a in sample])  # (N, K)
        self.norm_spread = float(members.std(1).mean()) if members.shape[1] > 1 else None
        return {
            "kind": "probe",
            "spread": self.norm_spread,
            "train_loss": train_loss,
            "eval_loss": eval_loss,
            "accuracy": accuracy,
            "norm_mean": norm["mean"],
            "norm_std": norm["std"],
            "n_features": self.n_features,
            "warning": "" if held or not eval_fraction else "Too few conversations to hold any out: no accuracy.",
        }


__all__ = ["ProbeRewardModel", "RewardDataError"]
