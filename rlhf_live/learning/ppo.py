"""PPO on a LoRA policy: rollouts, KL-shaped rewards, value head, GAE, clipped updates.

Read top to bottom in the order an update runs (cleanrl's ppo.py style): load prompts -> sample answers ->
score them -> KL to the reference -> values -> GAE -> epochs of clipped minibatch updates -> metrics.
Follows "The N Implementation Details of RLHF with PPO" (Huang et al. 2023,
https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo), its N+ follow-up
(https://arxiv.org/abs/2403.17031), cleanrl (https://github.com/vwxyzjn/cleanrl/blob/master/cleanrl/ppo.py) and
TRL's last PPO defaults (TRL removed PPO in 2026).

What it knows:
- The policy is a PeftModel with one trainable LoRA on a (4-bit) base. The reference policy is the *same* model
  under `disable_adapter()`: no second copy of the weights, and a fresh LoRA (B=0) has exactly zero KL.
- The value function is a zero-initialised linear head on the policy's last hidden state (shared trunk), not a
  separate value adapter. Why: on 2 CPU cores the minibatch forward+backward dominates an update; a shared trunk
  gives log-probs and values from one pass, whereas a value adapter costs a second full pass per minibatch (and
  adapter switching). Zero init makes V=0 at the start, so the first advantages are plain KL-shaped returns with
  no random baseline noise; vf_coef=0.1 keeps the value gradient from swamping the policy's LoRA (the original
  OpenAI lm-human-preferences setup also shared the trunk). Its weights are saved beside the adapter.
- Rewards: `reward_fn(prompts, answers) -> (B,)` is called once per answer (the caller normalises, e.g. a reward
  model's `score(..., normalise=True)`); answers with no EOS get `missing_eos_penalty` added (the EOS trick; off
  by default: it rewards short answers whether or not voters want them).
  Per-token reward = -beta * (logp - logp_ref) (k1 estimator), plus the score on the answer's last token; with
  `ppo_samples_per_prompt` k > 1 that score is taken relative to the mean of the other k-1 answers to the same
  prompt first (RLOO's leave-one-out baseline, https://arxiv.org/abs/2402.14740).
- Advantages: GAE with gamma = lambda = 1 by default, i.e. every token of an answer is credited with the whole
  answer's score minus the value baseline. The reward is one number per answer, and the zero-initialised value
  head knows nothing at first, so lambda < 1 would give the early tokens (where an answer's style is decided)
  almost no credit: 0.95^60 = 0.05. Ahmadian et al. 2024 (https://arxiv.org/abs/2402.14740) make the same case
  for lambda = 1 in RLHF; with a perfect reward it also won more here (bench/RESULTS.md ## Simulated raters).
- Rollouts sample with temperature only (top_k=0, top_p=1): PPO's ratio needs the log-prob of the distribution
  that was actually sampled, so the serving top_p is not used here.
- Logits = lm_head(final hidden state), computed in float32 on the response slice only (49k vocab). This holds for
  Llama/Qwen2/Mistral/SmolLM-like models; models with logit soft-capping or scaling (Gemma 2, Cohere) are not
  handled.
- CPU NF4: bitsandbytes' packed inference kernel has no backward, so PPOTrainer turns packing off
  (`model.base.disable_cpu_4bit_packing`); the live-loop trainer's copy comes from `model.base.prepare_cpu_4bit`
  (on CPU: NF4 values as plain linears, faster).
- A loss or gradient that is NaN/inf raises PPODivergence after restoring the LoRA, value head, optimizer and KL
  controller to their state before the update (bit-identical); a non-finite reward raises before anything moves.

What it does not know: the store, the reward model, gradio, or when to train (the trainer decides).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_live.config import Config
from rlhf_live.learning.rollout import Rollouts, trim_padding

RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]


class PPODivergence(RuntimeError):
    """A PPO update hit NaN/inf; the adapter, value head and optimizer were restored to before the update."""


# --- maths (pure tensor functions; tested against plain loops) -----------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is true; padded values (even NaN/inf) never leak in."""
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding comes out as 0."""
    # Advantage whitening: https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo (batch-level)
    mask = mask.bool()
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)  # unbiased, as TRL
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (arXiv 1506.02438) over right-padded answers; (advantages, returns)."""
    # rewards, values, mask: (B, T); the episode ends at the last masked-in token (V after it = 0).
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values * next_mask - values[:, t]
        lastgaelam = delta + gamma * gae_lambda * next_mask * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask  # (B, T)
    returns = advantages + values  # (B, T)
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (arXiv 1707.06347); (loss, clipfrac, approx_kl), all token-level masked means."""
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)  # (B, T)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
        # k3 estimator of KL(old || new), http://joschu.net/blog/kl-approx.html (cleanrl's approx_kl)
        approx_kl = masked_mean((ratio - 1) - logratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (N details #9 of https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/)."""
    vpredclipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # (B, T)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return loss, vf_clipfrac


def leave_one_out(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each score minus the mean of the other k-1 answers to its prompt (RLOO, arXiv 2402.14740); k = 1: unchanged."""
    if k <= 1:
        return scores
    grouped = scores.view(-1, k)  # (P, k): a prompt's k answers are consecutive
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)  # (P, k) mean of the siblings
    return (grouped - baseline).flatten()  # (B,)


class KLController:
    """Beta: fixed, or adaptive towards a target KL (Ziegler et al. 2019, arXiv 1909.08593, section 2.2)."""

    def __init__(self, init: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = init, adaptive, target, horizon

    def update(self, current_kl: float, n_answers: int) -> None:
        """Move beta up when the KL per answer is above target, down when below (clipped to +/-20%)."""
        if not self.adaptive:
            return
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_answers / self.horizon


# --- the trainer ---------------------------------------------------------------------------------------------
class PPOTrainer(Rollouts):
    """PPO on the trainer's own copy of the base + policy LoRA; `step(prompts)` is one update."""

    def __init__(self, model: PeftModel, tokenizer, cfg: Config, reward_fn: RewardFn):
        super().__init__(model, tokenizer, cfg)
        self.reward_fn = reward_fn
        lm = model.get_base_model()
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, device=self.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("The policy has no trainable parameters: attach the LoRA with trainable=True.")
        self.params += list(self.value_head.parameters())
        # Adam eps 1e-5 (cleanrl / N details); no weight decay, as in PPO.
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.ppo_lr, eps=1e-5, weight_decay=0.0)
        self.kl_ctl = KLController(cfg.kl_coef, cfg.kl_adaptive, cfg.kl_target, cfg.kl_horizon)
        self.updates = 0

    # the whole update -----------------------------------------------------------------------------------------
    def step(self, prompts: list[list[dict]]) -> dict:
        """One PPO update: rollout -> score -> KL-shaped rewards -> GAE -> epochs of minibatches; metrics dict."""
        if not prompts:
            raise ValueError("PPO step needs at least one prompt.")
        cfg = self.cfg
        k = max(1, cfg.ppo_samples_per_prompt)
        prompts = [p for p in prompts for _ in range(k)]  # a prompt's k answers side by side: leave_one_out's groups
        torch.manual_seed(cfg.seed + self.updates)  # reproducible given cfg.seed and the update number
        t0 = time.perf_counter()

        # 1. rollouts
        batch = self.rollout(prompts)
        query, query_mask = batch["query"], batch["query_mask"]
        responses, mask, has_eos = batch["responses"], batch["response_mask"], batch["has_eos"]
        B, T = responses.shape
        if T == 0:
            raise PPODivergence("Every rollout answer was empty (max_new_tokens 0?): nothing to train on.")
        t1 = time.perf_counter()

        # 2. scores, KL to the reference, values
        raw_scores = torch.as_tensor(self.reward_fn(prompts, batch["answers"])).detach().float().flatten()
        if raw_scores.shape != (B,):
            raise ValueError(f"reward_fn returned shape {tuple(raw_scores.shape)}, expected ({B},)")
        if not torch.isfinite(raw_scores).all():
            bad = [i for i, s in enumerate(raw_scores.tolist()) if not math.isfinite(s)]
            raise PPODivergence(f"reward_fn returned NaN/inf for answers {bad}; nothing was updated.")
        raw_scores = raw_scores.to(self.device)
        # EOS trick (https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo), as TRL applied it
        # last: a penalty on top of the score, so the reward model's opinion of a cut answer still counts.
        scores = torch.where(has_eos, raw_scores, raw_scores + cfg.missing_eos_penalty)  # (B,)
        # With k answers per prompt, what the prompt adds to every answer's score cancels: the reward model's
        # features carry the prompt, and without this its between-prompt spread dominates the whitened advantages.
        relative = leave_one_out(scores, k)  # (B,)
        with torch.no_grad():
            logprobs, values, entropy = self._forward_micro(
                query, query_mask, responses, mask, values=True, entropy=True
            )
            with self.model.disable_adapter():  # reference policy = base model, same weights, no LoRA
                ref_logprobs, _, _ = self._forward_micro(query, query_mask, responses, mask, values=False)
        mask_f = mask.float()
        kl = (logprobs - ref_logprobs) * mask_f  # (B, T) k1 per token
        beta = self.kl_ctl.value
        non_score_reward = -beta * kl  # (B, T)
        rewards = non_score_reward.clone()
        last = mask.sum(1) - 1  # (B,) index of each answer's last token (EOS or the cut)
        rewards[torch.arange(B, device=self.device), last] += relative
        values = values * mask_f
        t2 = time.perf_counter()

        # 3. advantages
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T)
        advantages = masked_whiten(advantages, mask)

        # 4. epochs of clipped minibatch updates; restore everything on NaN/inf
        snapshot = self._snapshot()
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "grad_norm")
        }
        mb_size = max(1, math.ceil(B / cfg.ppo_minibatches))
        early_stopped, epochs_done = False, 0
        self.model.train(cfg.gradient_checkpointing)  # HF checkpoints only in train mode; dropout is 0 anyway
        try:
            for epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(B, device=self.device)
                for start in range(0, B, mb_size):
                    idx = perm[start : start + mb_size]
                    self.optimizer.zero_grad(set_to_none=True)
                    mb_stats, n_tokens = dict.fromkeys(stats, 0.0), mask[idx].sum()
                    for micro in idx.split(cfg.ppo_micro_batch_size or len(idx)):
                        q, qm, r, m = trim_padding(query[micro], query_mask[micro], responses[micro], mask[micro])
                        Tm = r.shape[1]
                        new_logprobs, new_values, _ = self.forward(q, qm, r, m, values=True)
                        pg_loss, clipfrac, approx_kl = policy_loss(
                            new_logprobs, logprobs[micro, :Tm], advantages[micro, :Tm], m, cfg.cliprange
                        )
                        vf_loss, vf_clipfrac = value_loss(
                            new_values, values[micro, :Tm], returns[micro, :Tm], m, cfg.cliprange_value
                        )
                        # Token-weighted: the micro-batches' masked means add up to the minibatch's masked mean.
                        share = m.sum() / n_tokens
                        loss = (pg_loss + cfg.vf_coef * vf_loss) * share
                        if not torch.isfinite(loss):
                            raise PPODivergence(
                                f"non-finite loss in epoch {epoch + 1}, minibatch {start // mb_size + 1}: "
                                f"policy loss {pg_loss.item()}, value loss {vf_loss.item()}"
                            )
                        loss.backward()
                        for k, v in (
                            ("policy_loss", pg_loss),
                            ("value_loss", vf_loss),
                            ("clipfrac", clipfrac),
                            ("vf_clipfrac", vf_clipfrac),
                            ("approx_kl", approx_kl),
                        ):
                            mb_stats[k] += float(v.detach() * share)
                    grad_norm = nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    if not torch.isfinite(grad_norm):
                        raise PPODivergence(
                            f"non-finite gradient norm in epoch {epoch + 1}, minibatch {start // mb_size + 1}"
                        )
                    self.optimizer.step()
                    mb_stats["grad_norm"] = float(grad_norm)
                    for k, v in mb_stats.items():
                        stats[k].append(v)
                    # Early stop (cleanrl's target_kl), checked per minibatch so one bad step does not repeat.
                    if cfg.target_kl > 0 and mb_stats["approx_kl"] > cfg.target_kl:
                        early_stopped = True
                        break
                epochs_done = epoch + 1
                if early_stopped:
                    break
        except BaseException as exc:
            self._restore(snapshot)
            if isinstance(exc, PPODivergence):
                raise PPODivergence(f"{exc}; adapter, value head and optimizer restored to before the update") from None
            raise
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        t3 = time.perf_counter()

        # 5. metrics (flat floats, recorded by the trainer)
        kl_per_answer = kl.sum(1)  # (B,)
        self.kl_ctl.update(float(kl_per_answer.mean()), B)
        self.updates += 1
        lengths = mask_f.sum(1)
        y_pred, y_true = values[mask], returns[mask]
        var_y = torch.var(y_true) if y_true.numel() > 1 else torch.tensor(float("nan"))
        explained_var = 1 - torch.var(y_true - y_pred) / var_y if y_true.numel() > 1 else torch.tensor(float("nan"))
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return {
            "update": float(self.updates),
            "prompts": float(B),
            "score": float(scores.mean()),
            "score_raw": float(raw_scores.mean()),
            "kl": float(kl_per_answer.mean()),
            "kl_per_token": float(masked_mean(kl, mask)),
            "beta": float(beta),
            "non_score_reward": float(non_score_reward.sum(1).mean()),
            "rlhf_reward": float((scores + non_score_reward.sum(1)).mean()),
            "entropy": float(masked_mean(entropy, mask)),
            "eos_rate": float(has_eos.float().mean()),
            "answer_tokens": float(lengths.mean()),
            "prompt_tokens": float(query_mask.sum(1).float().mean()),
            "value_mean": float(masked_mean(values, mask)),
            "return_mean": float(masked_mean(returns, mask)),
            "explained_variance": float(explained_var),
            **{k: mean(v) for k, v in stats.items()},
            "epochs": float(epochs_done),
            "optimizer_steps": float(len(stats["policy_loss"])),
            "early_stopped": float(early_stopped),
            "lr": float(cfg.ppo_lr),
            "seconds_rollout": t1 - t0,
            "seconds_scoring": t2 - t1,
            "seconds_optimisation": t3 - t2,
            "seconds_total": t3 - t0,
        }

    # 6. divergence guard ------------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        """Copies of every trainable tensor, the optimizer state and beta."""
        return {
            "params": [p.detach().clone() for p in self.params],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "beta": self.kl_ctl.value,
        }

    def _restore(self, snapshot: dict) -> None:
        """Put back what _snapshot saved (bit-identical)."""
        with torch.no_grad():
            for p, saved in zip(self.params, snapshot["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.kl_ctl.value = snapshot["beta"]

    def _values(self, h: torch.Tensor) -> torch.Tensor:
        return self.value_head(h.float()).squeeze(-1)  # (B, T)

    def save_adapter(self, folder: str | Path) -> None:
        """The adapter (Rollouts.save_adapter) and value_head.safetensors beside it (the next round resumes it)."""
        super().save_adapter(folder)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
            str(Path(folder) / "value_head.safetensors"),
        )

    def load_value_head(self, folder: str | Path) -> bool:
        """Load value_head.safetensors from an adapter folder if there is one (resume); True when loaded."""
        path = Path(folder) / "value_head.safetensors"
        if not path.is_file():
            return False
        self.value_head.load_state_dict({k: v.to(self.device) for k, v in load_file(str(path)).items()})
        return True
