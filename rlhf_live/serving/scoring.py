"""How far a served version is from the base: per-answer KL, from log-probs the served chain would give.

Knows the served chain's log-probs (repetition penalty, then temperature; no top-p) on the Policy's PeftModel; knows
nothing of sampling engines, SQL or training (the trainer's own gate measures the same k1 on its copy).
"""

from __future__ import annotations

import torch

from rlhf_live.model.lora import BASE
from rlhf_live.model.sampling import penalize_positions
from rlhf_live.serving.samplers import Answer
from rlhf_live.serving.settings import GenerationSettings


def kl_to_base(
    policy, conversations: list[list[dict]], answers: list[Answer], settings: GenerationSettings, batch_size: int = 8
) -> list[float]:
    """Per answer, sum over its tokens of log pi(y_t) - log pi_base(y_t) at the sampling temperature (k1)."""
    # The KL that PPO's leash and the trainer's gate measure: penalised logits / temperature, no top-p, answers
    # sampled from the version itself (k1 is unbiased then; http://joschu.net/blog/kl-approx.html).
    temperature = settings.temperature if settings.temperature > 0 else 1.0
    eos = policy.tokenizer.eos_token_id
    out: list[float] = []
    for start in range(0, len(answers), batch_size):
        chunk = range(start, min(start + batch_size, len(answers)))
        prompts = [policy.build_prompt(conversations[i], settings)[0] for i in chunk]
        replies = [answers[i].token_ids + ([eos] if answers[i].finish_reason == "eos" else []) for i in chunk]
        versions = [answers[i].adapter_version for i in chunk]
        lp = answer_logprobs(policy, prompts, replies, versions, temperature, settings)
        lp_base = answer_logprobs(policy, prompts, replies, [BASE] * len(prompts), temperature, settings)
        out += [a - b for a, b in zip(lp, lp_base)]
    return out


def answer_logprobs(policy, prompts, replies, versions, temperature: float, settings) -> list[float]:
    """Summed log-probs of each reply after its prompt under its version, one right-padded forward."""
    seqs = [p + r for p, r in zip(prompts, replies)]
    width = max(len(s) for s in seqs)
    pad = policy.tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=policy.device)  # (B, S)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=policy.device)  # (B, S)
    with policy.holding(versions) as names, torch.inference_mode():
        logits = policy.model(input_ids=ids, attention_mask=mask, adapter_names=names).logits  # (B, S, V)
    sums = []
    for i, (p, r) in enumerate(zip(prompts, replies)):
        if not r:
            sums.append(0.0)
            continue
        row = logits[i, len(p) - 1 : len(p) - 1 + len(r)].float()  # (T, V), predicting each reply token
        penalty, last_n = settings.repetition_penalty, settings.repetition_last_n
        row = penalize_positions(row[None], ids[i : i + 1], torch.zeros(1, dtype=torch.long), len(p), penalty, last_n)
        row = row[0] / temperature
        target = torch.tensor(r, device=row.device)
        sums.append(float((row.gather(-1, target[:, None])[:, 0] - torch.logsumexp(row, -1)).sum()))
    return sums
