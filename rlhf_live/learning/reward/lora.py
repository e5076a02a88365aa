"""Reward model: a scalar head on the base LM (4-bit NF4 + its own LoRA), trained on people's votes.

What it knows:
- Architecture. The causal LM from `model.base.load_base` (the same loader, dtype and NF4 setting as the policy),
  its own LoRA, and a linear head H -> 1 on the final (normed) hidden state of the last token of
  "chat template(conversation) + answer + end of turn". We call the LM's decoder (`get_decoder()`) directly,
  never `lm_head`, so the 49k-vocabulary projection is not computed. Chosen over
  `AutoModelForSequenceClassification` because (1) the base is loaded once by the project's loader (GGUF
  conversion, NF4, devices) and may be handed in by the trainer, (2) the sequence-classification head finds the
  last token by searching for `pad_token_id`, which for SmolLM2 equals the end-of-turn token that ends every
  answer; we pad on the right ourselves and index the last real token from the attention mask.
  The LoRA sits on the top `reward_lora_layers` layers only (backward stops below them: faster steps), and
  on CPU the NF4 linears are dequantized to bf16 with the same values (`model.base.dequantize_cpu_4bit` says why).
- Objective (one loss, per example, averaged over the batch):
  A/B choice   Bradley-Terry  -logsigmoid(r_chosen - r_rejected)             (InstructGPT, arXiv 2203.02155, eq. 1)
  tie          w_tie * -0.5 * (logsigmoid(d) + logsigmoid(-d)), d = r_a - r_b  (BT with target 1/2: min at d = 0)
  thumbs       w_point * -logsigmoid(+r) for up, -logsigmoid(-r) for down     (logistic loss: "up" means r > 0)
  Ties and thumbs weights are Config.reward_tie_weight / reward_pointwise_weight. "Both bad" is not a kind of its
  own: the caller sends it as two thumbs-down. Thumbs anchor the reward's zero (BT alone is shift invariant).
- Length (optional, `reward_length_head`): ODIN's second head (arXiv 2402.07319). Training fits quality + length
  to the votes and adds `length_loss` (length correlates with the length head, not the quality head; orthogonal
  heads); `score` returns the quality head only, so PPO cannot buy reward with longer answers. Off by default: on
  data where length and quality always agree it leaves the quality head with nothing to learn (tests show both).
- Data hygiene: exact duplicates are dropped, pairs with identical answers carry no preference and are dropped,
  contradictory votes (A>B and B>A) are both kept (together they act like a tie). The held-out split is by
  conversation (`conversation_id` when given, else the first user message) so no conversation is in both parts.
- Training: AdamW, linear warm-up then linear decay, gradient clipping at 1, batches of similar lengths
  (less padding), held-out loss twice per epoch, early stopping on it and the best weights restored.
- Truncation: at most Config.reward_max_tokens per sequence; the conversation is cut by the one renderer
  (model/prompt.py: the oldest turns go, the system prompt stays), the answer is never cut at its end; an answer
  longer than the whole budget keeps its end and is counted in the metrics (`n_answer_truncated`).
- Normalisation: mean/std of raw scores over a set of answers, applied by `score(normalise=True)`. `fit` uses
  `reward_norm_samples` training answers: in the live app those are the served model's own answers to users, so
  close to the reference-policy samples TRL/OpenAI normalised on, without an extra rollout; `set_normalisation`
  takes any other set.

What it does not know: where votes come from (no store, no UI), PPO, or adapter versioning.
"""

from __future__ import annotations

import math
import random

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from rlhf_live.config import Config
from rlhf_live.learning.reward.base import Scorer
from rlhf_live.learning.reward.data import (
    PAIR,
    TIE,
    Example,
    length_batches,
    micro_batches,
)
from rlhf_live.learning.reward.losses import bt_loss, length_loss, pointwise_loss, tie_loss
from rlhf_live.model.base import load_base, prepare_cpu_4bit
from rlhf_live.model.lora import lora_targets

EVALS_PER_EPOCH = 2
MAX_TOKENS_PER_FORWARD = 4096
"""Padded tokens per forward pass in training (~3 GB of activations for SmolLM2-135M with LoRA on all layers)."""


def _lora_config(cfg: Config, base) -> LoraConfig:
    """The reward LoRA: the policy's target modules, on all layers or (reward_lora_layers) only the top N."""
    if cfg.reward_lora_layers <= 0:
        targets = lora_targets(cfg)
    else:
        # PEFT refuses layers_to_transform with "all-linear": list the linear modules of the top layers by name.
        n_layers = base.config.get_text_config().num_hidden_layers
        keep = {str(i) for i in range(max(0, n_layers - cfg.reward_lora_layers), n_layers)}
        wanted = None if cfg.lora_target == "all-linear" else {t.strip() for t in cfg.lora_target.split(",")}
        targets = []
        for name, module in base.named_modules():
            parts = name.split(".")
            if not isinstance(module, torch.nn.Linear) or "layers" not in parts:
                continue
            layer = parts[parts.index("layers") + 1]
            if layer in keep and (wanted is None or parts[-1] in wanted):
                targets.append(name)
        if not targets:
            raise ValueError(f"no linear modules found in the top {cfg.reward_lora_layers} layers for LoRA")
    return LoraConfig(
        r=cfg.reward_lora_r,
        lora_alpha=cfg.reward_lora_alpha,
        lora_dropout=0.0,  # deterministic scores: PPO calls score() on the same answers the fit saw
        target_modules=targets,
        task_type="FEATURE_EXTRACTION",
    )


# --- the model ---------------------------------------------------------------------------------------------
class RewardModel(Scorer):
    """A LoRA on the base LM and a linear head: scores (conversation, answer) with one float, learned from votes."""

    def __init__(self, model: PeftModel, head: torch.nn.Linear, tokenizer, cfg: Config):
        self._setup(model, tokenizer, cfg, next(head.parameters()).device)
        self.head = head
        self._backbone = model.get_base_model().get_decoder()  # LoRA layers are injected in place: it sees them

    @classmethod
    def create(cls, cfg: Config, base=None, tokenizer=None) -> RewardModel:
        """A fresh reward model: base/tokenizer from model.base.load_base(cfg) unless given, a new LoRA and head."""
        if isinstance(base, PeftModel):
            raise ValueError("Pass a plain base model: the reward model adds its own LoRA (this one already has one).")
        if base is None or tokenizer is None:
            base, tokenizer = load_base(cfg)
        prepare_cpu_4bit(base, cfg)
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, _lora_config(cfg, base))
        model.eval()  # no dropout anywhere: scores are deterministic ("N implementation details", #dropout)
        hidden = base.config.get_text_config().hidden_size
        device = next(base.parameters()).device
        head = torch.nn.Linear(hidden, 2 if cfg.reward_length_head else 1, device=device, dtype=torch.float32)
        # Reward head init std 1/sqrt(d_model + 1) (openai/lm-human-preferences; "N implementation details" #reward)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(head.bias)
        return cls(model, head, tokenizer, cfg)

    # --- forward -----------------------------------------------------------------------------------------
    def _rewards(self, seqs: list[list[int]]) -> torch.Tensor:
        """Raw rewards (N, K) float32 of token sequences, one right-padded forward: K=1, or 2 with the length head."""
        n, t = len(seqs), max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, t), pad, dtype=torch.long)  # (N, T)
        mask = torch.zeros((n, t), dtype=torch.long)  # (N, T)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self._backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (N, T, H)
        last = mask.sum(dim=1) - 1  # (N,) index of the last real token (end of turn)
        h_last = hidden[torch.arange(n, device=self.device), last]  # (N, H)
        return self.head(h_last.float())  # (N, K)

    def _losses(self, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted loss per example (E,) and quality rewards of all its sequences (S,), one forward for the batch."""
        seqs = [s for ex in batch for s in ex.ids]
        rk = self._rewards(seqs)  # (S, K)
        r = rk.sum(-1)  # (S,) ODIN trains quality + length on the preferences; without the length head K=1
        first, out = 0, []
        for ex in batch:  # E small (batch size): a Python loop over scalars is cheaper than gathering by kind
            if ex.kind == PAIR:
                loss = bt_loss(r[first], r[first + 1])
            elif ex.kind == TIE:
                loss = self.cfg.reward_tie_weight * tie_loss(r[first], r[first + 1])
            else:
                loss = self.cfg.reward_pointwise_weight * pointwise_loss(r[first], torch.tensor(ex.up))
            out.append(ex.weight * loss)
            first += len(ex.ids)
        losses = torch.stack(out)  # (E,)
        if rk.shape[1] == 2 and len(seqs) > 2:  # a batch-level term on every example: the batch mean carries it once
            lengths = torch.tensor([len(a) for ex in batch for a in ex.answers], device=rk.device)  # (S,) chars
            w = self.head.weight  # (2, H)
            term = length_loss(rk[:, 0], rk[:, 1], lengths, w[0], w[1])
            losses = losses + self.cfg.reward_length_weight * term
        return losses, rk[:, 0]  # (E,), (S,)

    def _evaluate(self, examples: list[Example], batch_size: int) -> tuple[float, float | None]:
        """(mean weighted loss, accuracy on its pairs or None) with no gradients."""
        losses, right, n_pairs = [], 0.0, 0
        with torch.no_grad():
            for idx in length_batches([e.length for e in examples], batch_size, random.Random(0)):
                batch = [examples[i] for i in idx]
                loss, r = self._losses(batch)
                losses += loss.tolist()
                first = 0
                for ex in batch:
                    if ex.kind == PAIR:
                        n_pairs += 1
                        right += float(r[first] > r[first + 1]) + 0.5 * float(r[first] == r[first + 1])
                    first += len(ex.ids)
        return sum(losses) / len(losses), (right / n_pairs if n_pairs else None)

    # --- training ----------------------------------------------------------------------------------------
    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())

    def _state(self) -> dict[str, torch.Tensor]:
        params = {f"model.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        params.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        return {k: v.detach().clone() for k, v in params.items()}

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        params = {f"model.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        params.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def _fit(self, examples, train, held, counts: dict, eval_fraction: float, progress) -> dict:
        """The LoRA reward model's training (continuing from the current weights), then its normalisation."""
        counts.update(self.encoder.fill(examples))
        warning = ""
        if eval_fraction > 0 and not held:
            n_groups = len({e.group for e in examples})
            warning = (
                f"Only {len(examples)} usable example(s) from {n_groups} conversation(s): nothing could be held out, "
                "so held-out loss and accuracy are not measured (None) and there is no early stopping."
            )
        result = self._train(train, held, progress)
        sample = [(e.prompt, a) for e in train for a in e.answers]
        random.Random(self.cfg.seed).shuffle(sample)
        sample = sample[: self.cfg.reward_norm_samples]
        norm = self.set_normalisation([p for p, _ in sample], [a for _, a in sample])
        return {**result, "norm_mean": norm["mean"], "norm_std": norm["std"], "warning": warning}

    def _train(self, train: list[Example], held: list[Example], progress) -> dict:
        """Epochs of length-grouped batches, held-out loss EVALS_PER_EPOCH times an epoch, early stopping on it."""
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        bs = max(1, cfg.reward_batch_size)
        steps_per_epoch = math.ceil(len(train) / bs)
        total = steps_per_epoch * max(1, cfg.reward_epochs)
        eval_every = max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))
        warmup = max(1, round(0.1 * total))
        opt = torch.optim.AdamW(self._trainable(), lr=cfg.reward_lr, weight_decay=0.0)
        # Linear warm-up then linear decay to 0 (the schedule of transformers' get_linear_schedule_with_warmup).
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
        )
        history: list[dict] = []
        best = {"eval_loss": math.inf, "state": None, "step": 0, "train_loss": None, "accuracy": None}
        interval: list[float] = []
        first_interval_loss = None
        step, bad_evals, stopped_early = 0, 0, False
        for _ in range(max(1, cfg.reward_epochs)):
            for idx in length_batches([e.length for e in train], bs, rng):
                batch = [train[i] for i in idx]
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros(())
                # Gradient accumulation over micro-batches: each example's loss needs only its own sequences, so
                # the sum is exact, and activation memory stays bounded (8 pairs x 512 tokens took ~20 GB at once).
                for micro in micro_batches(batch, MAX_TOKENS_PER_FORWARD):
                    part = self._losses(micro)[0].sum() / len(batch)
                    part.backward()
                    loss += part.detach()
                torch.nn.utils.clip_grad_norm_(self._trainable(), 1.0)
                opt.step()
                sched.step()
                step += 1
                interval.append(loss.item())
                detail = f"step {step}/{total}, loss {interval[-1]:.3f}"
                if step % eval_every == 0 or step == total or step % steps_per_epoch == 0:
                    train_loss = sum(interval) / len(interval)
                    first_interval_loss = train_loss if first_interval_loss is None else first_interval_loss
                    interval = []
                    point = {"step": step, "epoch": round(step / steps_per_epoch, 3), "train_loss": train_loss}
                    if held:
                        eval_loss, acc = self._evaluate(held, bs)
                        point.update(eval_loss=eval_loss, accuracy=acc)
                        if eval_loss < best["eval_loss"]:
                            best.update(eval_loss=eval_loss, state=self._state(), step=step, accuracy=acc)
                            best["train_loss"], bad_evals = train_loss, 0
                        else:
                            bad_evals += 1
                    else:
                        best.update(step=step, train_loss=train_loss)
                    history.append(point)
                    stopped_early = bool(held) and bad_evals >= cfg.reward_patience
                if progress is not None:
                    progress(detail)
                if stopped_early:
                    break
            if stopped_early:
                break
        if best["state"] is not None and best["step"] != step:
            self._restore(best["state"])
        self.model.eval()
        return {
            "train_loss": best["train_loss"],
            "train_loss_first": first_interval_loss,
            "eval_loss": best["eval_loss"] if held else None,
            "accuracy": best["accuracy"] if held else None,
            "epochs": round(step / steps_per_epoch, 3),
            "steps": step,
            "best_step": best["step"],
            "stopped_early": stopped_early,
            "history": history,
        }

    # --- inference ---------------------------------------------------------------------------------------
    def _score_ids(self, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
        """Raw rewards (N,) in the given order, computed in batches sorted by length."""
        out = torch.empty(len(seqs), dtype=torch.float32)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                out[idx] = self._rewards([seqs[i] for i in idx])[:, 0].float().cpu()  # the quality head only
        return out

    def _raw_scores(self, prompts: list[list[dict]], answers: list[str], batch_size: int) -> torch.Tensor:
        """Unnormalised rewards (B,) of non-empty inputs."""
        return self._score_ids([self.encode(p, a)[0] for p, a in zip(prompts, answers)], batch_size)
