"""PPO: maths against plain loops, the reference/KL wiring, clipping, the NaN guard, learning on the real model."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from rlhf_live.config import Config
from rlhf_live.flags import field_docs
from rlhf_live.learning import ppo
from rlhf_live.learning.rollout import load_seed_prompts
from rlhf_live.model import base as models
from rlhf_live.model.lora import attach_adapter


# --- maths -----------------------------------------------------------------------------------------------------
def _right_padded_mask(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    return torch.arange(T)[None, :] < lengths[:, None]


def _gae_reference(rewards, values, mask, gamma, lam):
    """Textbook GAE with python loops over each answer's real tokens only."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        L = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(L)):
            next_v = float(values[b, t + 1]) if t + 1 < L else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + float(values[b, t])
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_reference_loop(gamma, lam):
    gen = torch.Generator().manual_seed(1)
    B, T = 5, 9
    mask = _right_padded_mask(B, T, gen)
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    rewards[~mask] = 123.0  # garbage in the padding must not matter
    values[~mask] = -77.0
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-6, rtol=0)
    assert torch.allclose(ret, ref_ret, atol=1e-6, rtol=0)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_masked_mean_and_whiten_ignore_padding():
    gen = torch.Generator().manual_seed(2)
    mask = _right_padded_mask(4, 7, gen)
    x = torch.randn(4, 7, generator=gen)
    y = x.clone()
    y[~mask] = torch.tensor([float("nan"), float("inf"), 1e9, -3.0]).repeat(20)[: int((~mask).sum())]
    assert torch.equal(ppo.masked_mean(x, mask), ppo.masked_mean(y, mask))
    assert torch.equal(ppo.masked_mean(x, mask, dim=1), ppo.masked_mean(y, mask, dim=1))
    assert torch.isclose(ppo.masked_mean(x, mask), x[mask].mean())
    w = ppo.masked_whiten(x, mask)
    assert torch.equal(w, ppo.masked_whiten(y, mask))
    assert abs(float(w[mask].mean())) < 1e-6 and abs(float(w[mask].std()) - 1) < 1e-5
    assert (w[~mask] == 0).all()


def _loss_at_ratio(r: float, advantage: float, eps: float = 0.2):
    logprobs = torch.tensor([[math.log(r), 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([[advantage, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False]])  # the second token is padding: must not count
    loss, clipfrac, approx_kl = ppo.policy_loss(logprobs, old, adv, mask, eps)
    loss.backward()
    return loss, clipfrac, approx_kl, logprobs.grad[0, 0]


def test_policy_clipping_engages_exactly_past_one_plus_minus_eps():
    eps, d = 0.2, 1e-4
    # inside the trust region: not clipped, gradient flows
    for r in (1 + eps - d, 1 - eps + d):
        for a in (1.0, -1.0):
            _, clipfrac, _, grad = _loss_at_ratio(r, a)
            assert clipfrac == 0 and grad != 0
    # past 1+eps with a positive advantage (or past 1-eps with a negative one): clipped, no gradient
    for r, a in ((1 + eps + d, 1.0), (1 - eps - d, -1.0)):
        loss, clipfrac, _, grad = _loss_at_ratio(r, a)
        assert clipfrac == 1 and grad == 0
        assert torch.isclose(loss, torch.tensor(-a * (1 + eps if a > 0 else 1 - eps), dtype=torch.float64))
    # past 1+eps with a negative advantage: the pessimistic (unclipped) term wins
    _, clipfrac, _, grad = _loss_at_ratio(1 + eps + d, -1.0)
    assert clipfrac == 0 and grad != 0
    # approx_kl (k3) is 0 at ratio 1 and positive elsewhere
    assert _loss_at_ratio(1.0, 1.0)[2] == 0 and _loss_at_ratio(1.3, 1.0)[2] > 0


def test_value_loss_clips_around_old_values():
    old = torch.zeros(1, 3)
    returns = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False]])
    values = torch.tensor([[0.1, 0.5, 9.0]], requires_grad=True)  # 0.5 is past the 0.2 clip, 9.0 is padding
    loss, vf_clipfrac = ppo.value_loss(values, old, returns, mask, 0.2)
    # token 0: max((0.1-1)^2, (0.1-1)^2); token 1: max((0.5-1)^2, (0.2-1)^2) = 0.64 (clipped term wins)
    assert torch.isclose(loss, torch.tensor(0.5 * (0.81 + 0.64) / 2))
    assert vf_clipfrac == 0.5
    loss.backward()
    assert values.grad[0, 1] == 0 and values.grad[0, 2] == 0 and values.grad[0, 0] != 0


def test_adaptive_kl_controller_moves_towards_target():
    fixed = ppo.KLController(0.05)
    fixed.update(100.0, 8)
    assert fixed.value == 0.05
    ctl = ppo.KLController(0.05, adaptive=True, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # far above target: +20% error clipped, times 10/100
    assert math.isclose(ctl.value, 0.05 * 1.02)
    ctl.update(3.0, 10)
    assert ctl.value < 0.05 * 1.02


def test_config_documents_every_ppo_field():
    docs = field_docs()
    for name in (
        "ppo_batch_size",
        "ppo_lr",
        "kl_coef",
        "kl_adaptive",
        "cliprange",
        "gae_lambda",
        "target_kl",
        "missing_eos_penalty",
        "gradient_checkpointing",
        "ppo_temperature",
        "ppo_max_prompt_tokens",
    ):
        assert docs.get(name), name


def test_seed_prompts():
    prompts = load_seed_prompts()
    assert len(prompts) >= 50
    texts = [m[-1]["content"] for m in prompts]
    assert len(set(texts)) == len(texts)
    assert all(m[-1]["role"] == "user" and 0 < len(m[-1]["content"]) < 200 for m in prompts)


# --- the trainer on the tiny model ---------------------------------------------------------------------------
def _tiny_trainer(tiny_cfg, reward_fn=None, **overrides):
    # One answer per prompt unless a test asks for more: the mechanics below are checked answer by answer.
    cfg = dataclasses.replace(
        tiny_cfg, ppo_batch_size=4, ppo_max_new_tokens=12, **{"ppo_samples_per_prompt": 1, **overrides}
    )
    base, tok = models.load_base(cfg)
    model = attach_adapter(base, cfg, trainable=True)
    reward_fn = reward_fn or (lambda prompts, answers: torch.tensor([len(a) / 10 for a in answers]))
    return ppo.PPOTrainer(model, tok, cfg, reward_fn)


def _state(trainer):
    return [p.detach().clone() for p in trainer.params]


def test_rollout_uses_the_chat_template_and_left_padding(tiny_cfg):
    trainer = _tiny_trainer(tiny_cfg)
    # Each prompt carries the system prompt it is asked under (the stored one; the pool adds Config's to seed prompts).
    system = {"role": "system", "content": "You are a helpful assistant."}
    prompts = [
        [system, {"role": "user", "content": "Hi"}],
        [system, {"role": "user", "content": "How is the weather?"}],
    ]
    batch = trainer.rollout(prompts)
    q, qm = batch["query"], batch["query_mask"]
    assert qm[0, 0] == 0 and qm[1].all()  # the short prompt is left-padded
    text = trainer.tokenizer.decode(q[0][qm[0].bool()])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_truncates_at_first_eos_and_penalises_answers_without_eos(tiny_cfg, monkeypatch):
    seen = {}

    def reward_fn(prompts, answers):
        seen["answers"] = answers
        return torch.tensor([0.5, 0.5])

    trainer = _tiny_trainer(tiny_cfg, reward_fn, missing_eos_penalty=-3.0)
    tok = trainer.tokenizer
    eos = tok.eos_token_id
    a, b = tok("Hello", add_special_tokens=False)["input_ids"], tok("Paris", add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, attention_mask, generation_config, **sampler):
        assert sampler["top_k"] == 0 and sampler["top_p"] == 1.0  # PPO samples the full distribution
        # The served chain: the repetition penalty first (it is part of the policy), then temperature, no top-p.
        chain = ["RepetitionPenalty", "TemperatureLogitsWarper"]
        assert [type(p).__name__ for p in sampler["logits_processor"]] == chain
        rows = [a + [eos] + b + [eos] + b, (b * 12)[:12]]
        width = max(map(len, rows))
        rows = [r + [eos] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    monkeypatch.setattr(trainer.model, "generate", fake_generate)
    batch = trainer.rollout([[{"role": "user", "content": "x"}]] * 2)
    assert batch["has_eos"].tolist() == [True, False]
    assert batch["response_mask"].sum(1).tolist() == [len(a) + 1, 12]
    assert batch["answers"][0] == "Hello"
    metrics = trainer.step([[{"role": "user", "content": "x"}]] * 2)
    assert seen["answers"][0] == "Hello"
    assert metrics["score_raw"] == pytest.approx(0.5)
    assert metrics["score"] == pytest.approx((0.5 + 0.5 - 3.0) / 2)  # the answer with no EOS: 0.5 - 3
    assert metrics["eos_rate"] == 0.5


def test_fresh_adapter_has_zero_kl_and_first_ratio_one(tiny_cfg, monkeypatch):
    trainer = _tiny_trainer(tiny_cfg)
    ratios = []
    real_policy_loss = ppo.policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, cliprange):
        ratios.append(torch.exp(logprobs - old_logprobs)[mask.bool()].detach())
        return real_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange)

    monkeypatch.setattr(ppo, "policy_loss", spy)
    prompts = load_seed_prompts()[:4]
    metrics = trainer.step(prompts)
    assert metrics["kl"] == 0.0 and metrics["kl_per_token"] == 0.0  # B=0: adapter on == adapter off, bit for bit
    assert torch.allclose(ratios[0], torch.ones_like(ratios[0]), atol=1e-5)  # before the first optimizer step
    assert metrics["optimizer_steps"] == 8 and metrics["epochs"] == 4
    metrics2 = trainer.step(prompts)
    assert metrics2["kl"] != 0.0  # the adapter moved
    for key in (
        "score",
        "kl",
        "approx_kl",
        "clipfrac",
        "policy_loss",
        "value_loss",
        "entropy",
        "eos_rate",
        "answer_tokens",
        "seconds_rollout",
        "seconds_scoring",
        "seconds_optimisation",
    ):
        assert isinstance(metrics2[key], float) and math.isfinite(metrics2[key]), key


def test_nan_reward_stops_before_anything_moves(tiny_cfg):
    trainer = _tiny_trainer(tiny_cfg, lambda p, a: torch.tensor([0.0, float("nan"), 1.0, 0.0]))
    before = _state(trainer)
    with pytest.raises(ppo.PPODivergence, match=r"NaN/inf for answers \[1\]"):
        trainer.step(load_seed_prompts()[:4])
    assert all(torch.equal(p, q) for p, q in zip(before, _state(trainer)))
    assert trainer.updates == 0


def test_nan_loss_midway_restores_adapter_value_head_and_optimizer(tiny_cfg, monkeypatch):
    trainer = _tiny_trainer(tiny_cfg)
    prompts = load_seed_prompts()[:4]
    trainer.step(prompts)  # a real update first, so the adapter, value head and Adam state are non-trivial
    before = _state(trainer)
    opt_before = copy.deepcopy(trainer.optimizer.state_dict())
    calls = {"n": 0}
    real_value_loss = ppo.value_loss

    def poisoned(*args):
        calls["n"] += 1
        loss, clip = real_value_loss(*args)
        return (loss * float("nan"), clip) if calls["n"] == 3 else (loss, clip)  # after 2 optimizer steps

    monkeypatch.setattr(ppo, "value_loss", poisoned)
    with pytest.raises(ppo.PPODivergence, match="non-finite loss in epoch 2, minibatch 1.*restored"):
        trainer.step(prompts)
    after = _state(trainer)
    assert all(torch.equal(p, q) for p, q in zip(before, after))  # bit-identical
    opt_after = trainer.optimizer.state_dict()
    for pid, state in opt_before["state"].items():
        for k, v in state.items():
            assert torch.equal(v, opt_after["state"][pid][k])
    assert trainer.updates == 1
    monkeypatch.setattr(ppo, "value_loss", real_value_loss)
    assert math.isfinite(trainer.step(prompts)["policy_loss"])  # and training carries on


def test_micro_batches_give_the_same_update_as_whole_minibatches(tiny_cfg):
    """Gradient accumulation over micro-batches (token-weighted) matches one forward per minibatch."""
    prompts = load_seed_prompts()[:4]
    results = []
    for micro in (0, 1):
        torch.manual_seed(0)  # the same LoRA init in both trainers
        trainer = _tiny_trainer(tiny_cfg, ppo_micro_batch_size=micro, ppo_minibatches=1, target_kl=0)
        metrics = trainer.step(prompts)
        results.append((metrics, _state(trainer)))
    (whole, whole_state), (micro, micro_state) = results
    assert whole["answer_tokens"] == micro["answer_tokens"]  # same rollouts
    for k in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "kl", "grad_norm"):
        assert micro[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-6), k
    for a, b in zip(whole_state, micro_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    untrained = _state(_tiny_trainer(tiny_cfg))
    assert any(not torch.allclose(a, b) for a, b in zip(whole_state, untrained, strict=True)), "it trained"


def test_save_adapter_loads_back(tiny_cfg, tmp_path):
    trainer = _tiny_trainer(tiny_cfg)
    trainer.step(load_seed_prompts()[:4])
    trainer.save_adapter(tmp_path / "v1")
    names = {p.name for p in (tmp_path / "v1").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= names
    other = _tiny_trainer(tiny_cfg)
    assert other.load_value_head(tmp_path / "v1")
    assert torch.equal(other.value_head.weight, trainer.value_head.weight)
    base, _ = models.load_base(trainer.cfg)
    loaded = attach_adapter(base, trainer.cfg, tmp_path / "v1")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-5)


# --- the real model ------------------------------------------------------------------------------------------
FEW_WORDS = [
    "What is the capital of France?",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish.",
    "What colour is the sky?",
    "What is the tallest mountain in the world?",
    "What is the largest ocean on Earth?",
    "What is the opposite of 'ancient'?",
    "Name a word that rhymes with 'light'.",
]


def _starts_with_the(prompts, answers):
    """+1 when the answer starts with 'The', else -1: a programmatic rater with a hidden preference."""
    return torch.tensor([1.0 if a.strip().lower().startswith("the") else -1.0 for a in answers])


# Measured (seed 0, 1 thread, default ppo_lr 1e-4, 2026-11-22, after the CPU NF4 gradient fix): P(first token 'The')
# 0.510 (reference) -> 0.729 after 4 updates, i.e. the rater's expected first-word reward 2P-1 from 0.02 to 0.46;
# KL per answer 0, 0.40, 1.09, 2.00 nats; on-policy score of 8 samples -0.25, 0.5, 0.25, 0.5. Asserted with margin:
LEARN_UPDATES, LEARN_MIN_GAIN, LEARN_MAX_KL = 4, 0.15, 3.0


def _p_first_token(trainer, prompts, token_id: int, reference: bool) -> float:
    """Mean probability (at the sampling temperature) that the answer's first token is `token_id`: no sampling noise."""
    encoded = [trainer._prompt_ids(m) for m in prompts]
    P = max(map(len, encoded))
    query = torch.tensor([[trainer.pad_id] * (P - len(e)) + e for e in encoded])
    query_mask = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in encoded])
    first = torch.full((len(prompts), 1), token_id)
    with torch.no_grad():
        if reference:
            with trainer.model.disable_adapter():
                logprobs, _, _ = trainer.forward(query, query_mask, first, torch.ones_like(first, dtype=torch.bool))
        else:
            logprobs, _, _ = trainer.forward(query, query_mask, first, torch.ones_like(first, dtype=torch.bool))
    return float(logprobs.exp().mean())


@pytest.mark.slow
def test_learns_a_hidden_preference_on_the_real_model(real_model_dir):
    """A few PPO updates raise the rater's expected reward (measured exactly on the first token) with KL leashed."""
    # One thread: on 2 shared cores, 2 OpenMP threads spin against other processes and run ~4x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # One answer per prompt, as this test was calibrated (test_answers_per_prompt_... covers the default of 4).
        cfg = Config(model=str(real_model_dir), ppo_lr=1e-4, ppo_max_new_tokens=24, ppo_samples_per_prompt=1, seed=0)
        base, tok = models.load_base(cfg)
        models.prepare_cpu_4bit(base, cfg)  # as the live trainer's copy
        torch.manual_seed(cfg.seed)  # the LoRA's random A: the same whatever tests ran before
        model = attach_adapter(base, cfg, trainable=True)
        trainer = ppo.PPOTrainer(model, tok, cfg, _starts_with_the)
        prompts = [[{"role": "user", "content": q + " Answer in a few words."}] for q in FEW_WORDS]
        the = tok("The", add_special_tokens=False)["input_ids"][0]
        p_ref = _p_first_token(trainer, prompts, the, reference=True)
        runs = [trainer.step(prompts) for _ in range(LEARN_UPDATES)]
        p_policy = _p_first_token(trainer, prompts, the, reference=False)
    finally:
        torch.set_num_threads(threads)
    for r in runs:
        print({k: round(r[k], 3) for k in ("score", "eos_rate", "answer_tokens", "kl", "approx_kl", "clipfrac")})
    print(f"P(first token 'The'): reference {p_ref:.3f} -> policy {p_policy:.3f}")
    assert runs[0]["kl"] == 0.0  # fresh adapter: the policy is the reference
    assert p_policy >= p_ref + LEARN_MIN_GAIN, (p_ref, p_policy)
    assert all(r["kl"] < LEARN_MAX_KL for r in runs)


def test_leave_one_out_scores_each_answer_against_its_siblings():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])  # two prompts, three answers each
    torch.testing.assert_close(ppo.leave_one_out(scores, 3), torch.tensor([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0]))
    torch.testing.assert_close(
        ppo.leave_one_out(scores + torch.tensor([5.0] * 3 + [-7.0] * 3), 3), ppo.leave_one_out(scores, 3)
    )
    assert ppo.leave_one_out(scores, 1) is scores


def test_answers_per_prompt_cancel_what_the_prompt_alone_earns(tiny_cfg):
    # A reward that depends on the prompt only: one answer per prompt learns from it; two per prompt see no difference.
    def by_prompt(prompts, answers):
        seen.append(len(answers))
        return torch.tensor([float(len(p[-1]["content"])) for p in prompts])

    system = {"role": "system", "content": "You are a helpful assistant."}
    prompts = [[system, {"role": "user", "content": q}] for q in ("Hi", "How is the weather?")]
    moved = {}
    for k in (1, 2):
        seen = []
        trainer = _tiny_trainer(tiny_cfg, by_prompt, ppo_samples_per_prompt=k)
        before = _state(trainer)
        metrics = trainer.step(prompts)
        moved[k] = any(not torch.equal(a, b) for a, b in zip(before, _state(trainer)))
        assert seen == [2 * k] and metrics["prompts"] == 2 * k
    assert moved == {1: True, 2: False}
