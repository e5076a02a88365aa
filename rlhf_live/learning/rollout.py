"""Answers sampled from the trainer's copy of the policy, and their log-probs: what PPO, rm-dpo and the gate share.

Reads top to bottom as a rollout runs: the prompt as serving renders it -> sampling with the served chain (the
repetition penalty, then temperature; no top-p, so the ratio PPO takes is of the distribution sampled) -> answers cut
after the first EOS or the loop stop -> log-probs recomputed the same way, with the reference being the same model
under `disable_adapter()` ("The N Implementation Details of RLHF with PPO",
https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo). Knows tensors and the served sampling
chain; knows nothing of rewards, value heads, optimisers, the store or when to train.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import GenerationConfig

from rlhf_live.config import ASSETS, Config
from rlhf_live.model.base import disable_cpu_4bit_packing
from rlhf_live.model.prompt import render, training_budget
from rlhf_live.model.sampling import generate_kwargs, loop_cut, penalize_positions

SEED_PROMPTS = ASSETS / "seed_prompts.jsonl"


# --- prompts --------------------------------------------------------------------------------------------------
def load_seed_prompts(path: str | Path | None = None) -> list[list[dict]]:
    """Seed prompts (one `{"messages": [...]}` per line) as lists of chat messages, to top up the store's."""
    prompts = []
    with open(path or SEED_PROMPTS, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                prompts.append(json.loads(line)["messages"])
    return prompts


def logprobs_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the (B, T, V) log-softmax."""
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


class Rollouts:
    """Sampling and log-probs on a PeftModel copy of the policy (no optimiser: DPO/KTO's gate samples with this)."""

    def __init__(self, model: PeftModel, tokenizer, cfg: Config):
        if cfg.ppo_temperature <= 0:
            raise ValueError("ppo_temperature must be > 0: PPO needs sampled answers and their log-probs.")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = next(model.parameters()).device
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        disable_cpu_4bit_packing(model)  # packed CPU NF4 has no backward: LoRA gradients would be wrong
        _dropout_off(model)  # N details: dropout off, so log-probs are a deterministic function of the weights
        model.eval()
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        lm = model.get_base_model()
        self._decoder = lm.get_decoder()  # LoRA layers are injected in place, so this runs the policy
        self._lm_head = lm.get_output_embeddings()
        plain_head = type(self._lm_head) is nn.Linear and not self._lm_head.weight.requires_grad
        # float32 log-probs: bf16 logits (~3 significant digits) would make the PPO ratio noisy.
        self._head_w = self._lm_head.weight.detach().float() if plain_head else None
        self._head_b = None
        if plain_head and self._lm_head.bias is not None:
            self._head_b = self._lm_head.bias.detach().float()

    # 1. rollouts ------------------------------------------------------------------------------------------------
    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids serving would answer `messages` from (their own system prompt), within the training budget."""
        turns = list(messages)
        while turns and turns[-1]["role"] != "user":  # answer the last user turn
            turns = turns[:-1]
        if not any(m["role"] == "user" for m in turns):
            raise ValueError(f"A PPO prompt needs a user message: {messages!r}")
        return render(self.tokenizer, turns, training_budget(self.cfg)).ids

    @torch.no_grad()
    def rollout(self, prompts: list[list[dict]]) -> dict:
        """Sample one answer per prompt; left-padded queries, answers cut after the first EOS."""
        encoded = [self._prompt_ids(m) for m in prompts]
        P = max(len(ids) for ids in encoded)
        query = torch.full((len(encoded), P), self.pad_id, dtype=torch.long)
        query_mask = torch.zeros((len(encoded), P), dtype=torch.long)
        for i, ids in enumerate(encoded):  # left padding: every query ends at column P-1
            query[i, P - len(ids) :] = torch.tensor(ids)
            query_mask[i, P - len(ids) :] = 1
        query, query_mask = query.to(self.device), query_mask.to(self.device)
        gen = GenerationConfig(
            max_new_tokens=self.cfg.ppo_max_new_tokens, eos_token_id=self.eos_id, pad_token_id=self.pad_id
        )
        # N details: no top-k / top-p, so the sampled distribution is the one PPO's ratio uses; the serving
        # repetition penalty stays, because it is part of the policy that serves (sampling.py).
        cfg, pads = self.cfg, [P - len(ids) for ids in encoded]
        sampler = generate_kwargs(cfg.ppo_temperature, 1.0, cfg.repetition_penalty, cfg.repetition_last_n, pads)
        self.model.eval()
        out = self.model.generate(input_ids=query, attention_mask=query_mask, generation_config=gen, **sampler)
        responses = out[:, P:]  # (B, T)
        # Truncate at the first EOS: the EOS token itself is an action and stays in; everything after is padding.
        is_eos = responses == self.eos_id
        after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
        response_mask = ~after_eos  # (B, T)
        has_eos = is_eos.any(dim=1)  # (B,)
        if cfg.stop_loops:  # serving's loop stop: the answer ends after the loop's first copy, without an EOS
            for b in range(responses.shape[0]):
                cut = loop_cut(responses[b][response_mask[b] & ~is_eos[b]].tolist())
                if cut is not None:
                    response_mask[b, cut:], has_eos[b] = False, False
        responses = torch.where(response_mask, responses, torch.full_like(responses, self.pad_id))
        T = int(response_mask.sum(1).max()) if responses.shape[1] else 0
        responses, response_mask = responses[:, :T], response_mask[:, :T]
        answers = self.tokenizer.batch_decode(
            [r[m].tolist() for r, m in zip(responses, response_mask)], skip_special_tokens=True
        )
        return dict(
            query=query,
            query_mask=query_mask,
            responses=responses,
            response_mask=response_mask,
            has_eos=has_eos,
            answers=answers,
        )

    # 2. log-probs of the answers -----------------------------------------------------------------------------
    def forward(self, query, query_mask, responses, response_mask, *, values: bool = False, entropy: bool = False):
        """Per-token log-probs (B, T) of the responses, values (B, T) or None, entropy (B, T) or None."""
        P = query.shape[1]
        input_ids = torch.cat([query, responses], dim=1)  # (B, P+T)
        attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)  # (B, P+T)
        # Left padding: positions must count real tokens only (as generate() did), or log-probs shift.
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        hidden = self._decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        h = hidden[:, P - 1 : -1]  # (B, T, H): the states that predict each response token (logits_to_keep)
        if self._head_w is not None:
            logits = F.linear(h.float(), self._head_w, self._head_b)  # (B, T, V) float32
        else:
            logits = self._lm_head(h).float()
        start = (query_mask == 0).sum(1)  # (B,): each row's first real token (left padding)
        cfg = self.cfg
        logits = penalize_positions(logits, input_ids, start, P, cfg.repetition_penalty, cfg.repetition_last_n)
        logits = logits / cfg.ppo_temperature  # N details: the sampling temperature, also when recomputing
        logprobs = logprobs_of(logits, responses)  # (B, T)
        v = self._values(h) if values else None  # (B, T)
        ent = entropy_of(logits) if entropy else None
        return logprobs, v, ent

    def _values(self, h: torch.Tensor) -> torch.Tensor:
        raise ValueError("Rollouts have no value head: values come from PPOTrainer.")

    def _forward_micro(self, query, query_mask, responses, response_mask, **kwargs):
        """forward() in chunks of ppo_micro_batch_size rows (less memory); the same outputs, concatenated."""
        size = self.cfg.ppo_micro_batch_size or query.shape[0]
        chunks = zip(*(t.split(size) for t in (query, query_mask, responses, response_mask)), strict=True)
        parts = [self.forward(*chunk, **kwargs) for chunk in chunks]
        return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts, strict=True))

    @torch.no_grad()
    def drift(self, prompts: list[list[dict]]) -> dict:
        """Sample answers and measure them, no update: KL to the reference per answer, tokens, EOS rate, the answers."""
        batch = self.rollout(prompts)
        args = (batch["query"], batch["query_mask"], batch["responses"], batch["response_mask"])
        if args[2].shape[1] == 0:
            return {"kl": 0.0, "answer_tokens": 0.0, "eos_rate": float(batch["has_eos"].float().mean()), "answers": []}
        logprobs, _, _ = self._forward_micro(*args, values=False)
        with self.model.disable_adapter():
            ref_logprobs, _, _ = self._forward_micro(*args, values=False)
        mask_f = batch["response_mask"].float()
        return {
            "kl": float(((logprobs - ref_logprobs) * mask_f).sum(1).mean()),  # k1, the estimate PPO's gate reads
            "answer_tokens": float(mask_f.sum(1).mean()),
            "eos_rate": float(batch["has_eos"].float().mean()),
            "answers": batch["answers"],
        }

    # saving -------------------------------------------------------------------------------------------------
    def save_adapter(self, folder: str | Path) -> None:
        """PEFT's adapter_config.json + adapter_model.safetensors, at the top of `folder`."""
        folder = Path(folder)
        name = self.model.active_adapter
        self.model.save_pretrained(str(folder), selected_adapters=[name])
        if name != "default":  # PEFT puts non-default adapters in a subfolder; the contract wants them at the top
            for f in (folder / name).iterdir():
                shutil.move(str(f), folder / f.name)
            (folder / name).rmdir()


def trim_padding(query, query_mask, responses, response_mask):
    """Drop columns that are padding in every row of a minibatch (left of queries, right of answers)."""
    q_keep = int(query_mask.sum(1).max())
    r_keep = max(int(response_mask.sum(1).max()), 1)
    return query[:, -q_keep:], query_mask[:, -q_keep:], responses[:, :r_keep], response_mask[:, :r_keep]


def _dropout_off(model: nn.Module) -> None:
    """Set every dropout probability to 0, including attention dropout (applied by HF in train mode)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
