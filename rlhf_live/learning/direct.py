"""Direct learners: DPO and KTO train the policy LoRA through TRL's trainers, on votes or on reward-ranked samples.

Knows how the store's vote views become TRL datasets (A/B choices -> chosen/rejected for DPO; thumbs, both-bad and
A/B choices -> desirable/undesirable for KTO), how a reward model turns the policy's own samples into more pairs
(best vs worst of N per prompt, `reward_ranked_pairs`), the TRL settings of one CPU-or-CUDA round and the reference
(the base: the adapter disabled, the same leash PPO has); knows nothing of SQL, serving or Gradio, and takes the
sampler and the reward model as plain callables.
DPO: Rafailov et al. 2023, arXiv 2305.18290; online/iterative use on the live model's own answers: Guo et al. 2024,
arXiv 2402.04792. KTO: Ethayarajh et al. 2024, arXiv 2402.01306. Reward-ranked best-vs-worst pairs of N samples,
iterated: Xiong et al. 2024, arXiv 2312.11456; Dong et al. 2024 ("RLHF Workflow"), arXiv 2405.07863.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable

import torch
from transformers import PrinterCallback, TrainerCallback

from rlhf_live.config import Config
from rlhf_live.model.prompt import render, training_budget
from rlhf_live.store.rows import PairRow, ThumbRow


class DirectDivergence(RuntimeError):
    """A DPO/KTO round produced NaN/inf loss or weights; the trained copy is thrown away, serving is untouched."""


def _context(cfg: Config, messages: list[dict], tokenizer) -> list[dict]:
    """The messages serving answered from (their own system prompt), cut as the one renderer cuts them."""
    return render(tokenizer, messages, training_budget(cfg)).messages


def dpo_examples(cfg: Config, tokenizer, pairs: list[PairRow]) -> list[dict]:
    """A/B choices as TRL's conversational preference rows; ties and both-bad are not in `pairs` (nothing to learn)."""
    return [
        {
            "prompt": _context(cfg, p.prompt, tokenizer),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
            "weight": float(p.weight),
        }
        for p in pairs
        if p.chosen != p.rejected and p.weight > 0
    ]


def kto_examples(cfg: Config, tokenizer, pairs: list[PairRow], pointwise: list[ThumbRow]) -> list[dict]:
    """Thumbs (both-bad = two downs) and A/B choices (winner desirable, loser not) as TRL's unpaired rows."""
    rows = [(p.prompt, p.completion, bool(p.label), p.weight) for p in pointwise]
    for p in pairs:
        rows += [(p.prompt, p.chosen, True, p.weight), (p.prompt, p.rejected, False, p.weight)]
    return [
        {
            "prompt": _context(cfg, prompt, tokenizer),
            "completion": [{"role": "assistant", "content": text}],
            "label": label,
            "weight": float(weight),
        }
        for prompt, text, label, weight in rows
        if weight > 0
    ]


def _weighted(trainer_cls: type, seed: int) -> type:
    """`trainer_cls` drawing its batches in proportion to each row's `weight` (with replacement), as the loss would."""
    # TRL's DPO/KTO losses take no per-row weight; sampling rows by weight gives each the same expected share of the
    # gradient as a weighted loss (importance sampling), so a source over its cap moves the policy no more than it may.
    import torch

    class Weighted(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            weights = torch.tensor(self.train_dataset["weight"], dtype=torch.double)  # (N,) after TRL's filtering
            generator = torch.Generator().manual_seed(seed)
            return torch.utils.data.WeightedRandomSampler(weights, len(weights), replacement=True, generator=generator)

    return Weighted


def reward_ranked_pairs(
    prompts: list[list[dict]],
    sample: Callable[[list[list[dict]]], list[str]],
    score: Callable[[list[list[dict]], list[str]], torch.Tensor],
    n: int,
    min_confidence: float,
    prob_better: Callable[[list[list[dict]], list[str], list[str]], torch.Tensor] | None = None,
) -> tuple[list[PairRow], dict]:
    """Best vs worst of `n` sampled answers per prompt, by the reward model; (DPO pairs, metrics)."""
    # A pair is kept only when the reward model gives the best answer at least `min_confidence` probability of beating
    # the worst (`prob_better`, e.g. averaged over an ensemble; by default Bradley-Terry on the score gap), so a reward
    # model that has learned nothing yet adds nothing. The chosen answer is never blank (nobody prefers silence; a
    # length-loving reward model might).
    repeated = [p for p in prompts for _ in range(n)]  # (P * n,) prompt i's samples at i*n .. i*n+n-1
    answers = sample(repeated)
    scores = score(repeated, answers).float().view(len(prompts), n)  # (P, n) raw scores
    candidates = []
    for i, prompt in enumerate(prompts):
        texts = answers[i * n : (i + 1) * n]
        row = scores[i].clone()
        row[[not t.split() for t in texts]] = -math.inf  # blank answers cannot be chosen
        best, worst = int(row.argmax()), int(scores[i].argmin())
        if math.isfinite(float(row[best])) and texts[best] != texts[worst]:
            candidates.append((prompt, texts[best], texts[worst], float(scores[i, best] - scores[i, worst])))
    if prob_better is None:
        confidence = [1 / (1 + math.exp(-gap)) for *_, gap in candidates]
    elif candidates:
        prompts_, chosen, rejected, _ = (list(col) for col in zip(*candidates))
        confidence = prob_better(prompts_, chosen, rejected).tolist()
    else:
        confidence = []
    pairs = [
        PairRow(prompt, chosen, rejected, origin="rm-dpo")
        for (prompt, chosen, rejected, _), p in zip(candidates, confidence)
        if p >= min_confidence
    ]
    kept = [p for p in confidence if p >= min_confidence]
    metrics = {
        "samples": float(len(answers)),
        "pairs": float(len(pairs)),
        "pair_confidence": sum(kept) / len(kept) if kept else 0.0,
        "sample_spread": float((scores.max(1).values - scores.min(1).values).mean()),
    }
    return pairs, metrics


class _Progress(TrainerCallback):
    """Reports each optimizer step; `progress` may block, and so yields to serving between steps."""

    def __init__(self, progress: Callable[[str], None]):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        self.progress(f"step {state.global_step}/{state.max_steps}")


def train_direct(
    learner: str,
    model,
    tokenizer,
    cfg: Config,
    pairs: list[PairRow],
    pointwise: list[ThumbRow],
    *,
    seed: int = 0,
    progress: Callable[[str], None] = lambda detail: None,
) -> dict:
    """Train the PeftModel's active LoRA in place with TRL's DPOTrainer / KTOTrainer; flat metrics of the run."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub on start; this app runs offline
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # heavy import, only when a direct learner runs

    if learner in ("dpo", "rm-dpo"):
        examples, trainer_cls, config_cls = dpo_examples(cfg, tokenizer, pairs), DPOTrainer, DPOConfig
        extra = {"loss_type": ["sigmoid"]}
    elif learner == "kto":
        examples, trainer_cls, config_cls = kto_examples(cfg, tokenizer, pairs, pointwise), KTOTrainer, KTOConfig
        extra = {"loss_type": "kto"}
    else:
        raise ValueError(f"train_direct knows 'dpo', 'rm-dpo' and 'kto', not {learner!r}")
    need = 2 if learner == "kto" else 1  # KTO's KL baseline pairs each answer with another row's prompt
    if len(examples) < need:
        from rlhf_live.learning.reward.data import RewardDataError

        kind = {"dpo": "A/B choices", "kto": "thumbs or A/B choices"}.get(learner, "pairs the reward model is sure of")
        raise RewardDataError(f"{learner.upper()} needs {kind} to learn from: {len(examples)} in this round.")

    import datasets

    datasets.disable_progress_bars()  # a round reports through `progress`, not through bars on the app's stderr

    if len({e["weight"] for e in examples}) > 1:
        trainer_cls = _weighted(trainer_cls, seed)
    batch = max(2, min(cfg.direct_batch_size, len(examples)))
    steps = max(1, math.ceil(cfg.direct_epochs * len(examples) / batch))
    on_cpu = next(model.parameters()).device.type == "cpu"
    with tempfile.TemporaryDirectory(prefix=f"rlhf-live-{learner}-") as tmp:
        args = config_cls(
            output_dir=tmp,  # TRL writes nothing here with save_strategy="no"; it only wants a folder
            use_cpu=on_cpu,
            bf16=False,  # the base computes in its own dtype; the LoRA trains in float32
            beta=cfg.direct_beta,
            learning_rate=cfg.direct_lr,
            lr_scheduler_type="constant",  # a round is a few steps: no decay to zero within it
            per_device_train_batch_size=batch,
            max_steps=steps,
            max_length=cfg.ppo_max_prompt_tokens + cfg.max_new_tokens,
            activation_checkpointing=cfg.gradient_checkpointing,
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            disable_tqdm=True,
            seed=seed,
            **extra,
        )
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(examples),
            processing_class=tokenizer,
            callbacks=[_Progress(progress)],
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout (simulate's JSON goes there)
        # TRL copies the adapter into a "ref" adapter for the reference; without it, TRL's reference pass disables
        # the adapter (trl/trainer/utils.py use_adapter): the base, the same leash PPO and the KL gate use.
        if "ref" in getattr(model, "peft_config", {}):
            model.delete_adapter("ref")
        model.set_adapter("default")
        trainer.train()
    return _metrics(learner, model, examples, [r for r in trainer.state.log_history if "loss" in r])


def _metrics(learner: str, model, examples: list[dict], logs: list[dict]) -> dict:
    """The run's flat metrics from TRL's logs; DirectDivergence when a loss or a weight is not finite."""
    params = [p for p in model.parameters() if p.requires_grad]
    # transformers' Trainer drops NaN/inf losses from its logs (logging_nan_inf_filter): check the weights too.
    if not logs or not all(math.isfinite(r["loss"]) for r in logs) or not all(torch.isfinite(p).all() for p in params):
        raise DirectDivergence(f"{learner.upper()} produced a non-finite loss or weight; the round is thrown away.")
    mean = lambda key: sum(r.get(key, 0.0) for r in logs) / len(logs)  # noqa: E731
    metrics = {
        "examples": float(len(examples)),
        "steps": float(len(logs)),
        "loss_first": logs[0]["loss"],
        "loss_last": logs[-1]["loss"],
        "loss": mean("loss"),
    }
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl"):
        if any(key in r for r in logs):
            metrics[key.replace("rewards/", "reward_")] = logs[-1].get(key, float("nan"))
    return metrics
