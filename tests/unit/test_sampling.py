"""The served sampling rules (sampling.py): llama.cpp's repetition penalty, the same in generate(), PPO, KL; loops."""

import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_live.learning.ppo import PPOTrainer
from rlhf_live.model.base import load_base
from rlhf_live.model.lora import attach_adapter
from rlhf_live.model.sampling import LoopStop, generate_kwargs, loop_cut, penalize, penalize_positions, windows
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.scoring import answer_logprobs
from rlhf_live.serving.settings import GenerationSettings


def _llamacpp_rule(logits: list[float], window: list[int], penalty: float) -> list[float]:
    """llama.cpp's llama_sampler_penalties_apply, written as plainly as there (repeat penalty only)."""
    out = list(logits)
    for token in set(window):
        out[token] = out[token] * penalty if out[token] <= 0 else out[token] / penalty
    return out


def test_penalty_is_llamacpps_rule_once_per_token_with_its_gradient():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0, 0.0]], requires_grad=True)  # (1, V)
    window = torch.tensor([[1, 4, 4, 0]])  # token 4 seen twice: penalised once
    out = penalize(logits, window, torch.ones_like(window, dtype=torch.bool), 2.0)
    assert out.tolist() == [_llamacpp_rule(logits[0].tolist(), [1, 4, 4, 0], 2.0)]
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0, 2.0, 0.0]]
    out.sum().backward()
    assert logits.grad.tolist() == [[0.5, 2.0, 1.0, 1.0, 0.5, 1.0]]
    # A slot outside the window (invalid) penalises nothing, not even token 0, where it points.
    valid = torch.tensor([[True, True, True, False]])
    assert penalize(logits, window, valid, 2.0)[0, 0].item() == 2.0
    assert penalize(logits, window, valid, 1.0) is logits  # off: untouched


def test_windows_hold_the_last_n_real_tokens_before_each_position():
    ids = torch.tensor([[9, 9, 1, 2, 3, 4, 5]])  # two left-padding tokens
    window, valid = windows(ids, torch.tensor([2]), torch.tensor([3, 6]), last_n=3)
    assert [w[v].tolist() for w, v in zip(window[0], valid[0])] == [[1], [2, 3, 4]]


def test_positions_are_penalised_by_their_own_past():
    torch.manual_seed(0)
    V, ids = 11, torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = torch.randn(1, 4, V)  # predicting ids[:, 4:8]
    out = penalize_positions(logits, ids, torch.tensor([0]), first=4, penalty=1.5, last_n=3)
    for t in range(4):
        past = ids[0, max(0, 4 + t - 3) : 4 + t].tolist()
        assert torch.allclose(out[0, t], torch.tensor(_llamacpp_rule(logits[0, t].tolist(), past, 1.5)))


def test_generate_applies_the_penalty_before_temperature_and_top_p(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    prompt = torch.tensor([tok("What is the weather like?")["input_ids"]])
    # Greedy with the penalty, written out by hand: each step's argmax of the penalised last-8-token logits.
    ids = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ids])).logits[0, -1].tolist()
            ids.append(max(range(len(logits)), key=_llamacpp_rule(logits, ids[-8:], 3.0).__getitem__))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, **generate_kwargs(0.0, 1.0, 3.0, 8))
        plain = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, **generate_kwargs(0.0, 1.0, 1.0, 8))
    assert out[0].tolist() == ids
    assert plain[0].tolist() != ids  # the penalty changed the answer: the check above is not vacuous
    chain = generate_kwargs(0.7, 0.9, 1.3, 64)["logits_processor"]
    assert [type(p).__name__ for p in chain] == ["RepetitionPenalty", "TemperatureLogitsWarper", "TopPLogitsWarper"]


def test_loop_stop_cuts_after_the_first_copy_and_leaves_other_answers_alone():
    unit = [5, 6, 7, 8, 9, 10]
    looping = [1, 2, 3] + unit * 6
    assert loop_cut(looping) == 3 + len(unit)  # 3 + 6 + 18 >= 24 tokens of copies: cut after the first copy
    assert loop_cut([1, 2, 3] + unit * 3) is None  # 18 tokens repeated: not yet a loop
    assert loop_cut(list(range(300))) is None
    assert loop_cut([7] * 23) is None and loop_cut([7] * 24) == 1
    stop = LoopStop()
    cuts = [stop.push(t) for t in looping]
    assert cuts.index(9) == 3 + 4 * len(unit) - 1  # found the moment the fourth copy is complete


def test_policy_streams_and_batches_the_same_cut_answer(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, engine="torch")
    policy = Policy.from_config(cfg)
    messages = [{"role": "user", "content": "Hello! How can I help you today?"}]
    greedy = GenerationSettings(max_new_tokens=96, temperature=0.0)
    (free,) = policy.generate(messages, greedy)
    cut = loop_cut(free.token_ids)
    assert cut is not None, "the tiny random model should loop greedily"
    on = GenerationSettings(max_new_tokens=96, temperature=0.0, stop_loops=True)
    (streamed,) = policy.generate(messages, on)
    (batched,) = policy.generate_many([messages], on)
    assert streamed.token_ids == batched.token_ids == free.token_ids[:cut]
    assert streamed.finish_reason == batched.finish_reason == "loop"


def test_kl_and_ppo_log_probs_use_the_penalised_policy(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, engine="torch", repetition_penalty=1.5, repetition_last_n=16)
    policy = Policy.from_config(cfg)
    messages = [[{"role": "user", "content": "I like apples."}], [{"role": "user", "content": "Hi"}]]
    settings = GenerationSettings.from_config(cfg, max_new_tokens=20, temperature=1.0)
    answers = policy.generate_many(messages, settings)
    prompts = [policy.build_prompt(m, settings)[0] for m in messages]
    replies = [a.token_ids + ([policy.tokenizer.eos_token_id] if a.finish_reason == "eos" else []) for a in answers]

    def by_hand(prompt, reply, penalty):
        ids = prompt + reply
        with torch.no_grad():
            logits = policy.model(torch.tensor([ids])).logits[0].float()
        total = 0.0
        for t, token in enumerate(reply):
            row = _llamacpp_rule(logits[len(prompt) - 1 + t].tolist(), ids[: len(prompt) + t][-16:], penalty)
            total += float(torch.log_softmax(torch.tensor(row), -1)[token])
        return total

    got = answer_logprobs(policy, prompts, replies, [policy.version] * 2, 1.0, settings)
    want = [by_hand(p, r, 1.5) for p, r in zip(prompts, replies)]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)
    assert not torch.allclose(torch.tensor(want), torch.tensor([by_hand(p, r, 1.0) for p, r in zip(prompts, replies)]))

    # PPO recomputes the same penalised log-probs for its own (left-padded) rollouts; a fresh LoRA is the base.
    ppo_cfg = dataclasses.replace(cfg, ppo_temperature=1.0, ppo_max_new_tokens=20)
    base, tok = load_base(ppo_cfg)
    ppo = PPOTrainer(attach_adapter(base, ppo_cfg, trainable=True), tok, ppo_cfg, None)
    batch = ppo.rollout(messages)
    logprobs, _, _ = ppo.forward(batch["query"], batch["query_mask"], batch["responses"], batch["response_mask"])
    for b in range(2):
        prompt = batch["query"][b][batch["query_mask"][b].bool()].tolist()
        reply = batch["responses"][b][batch["response_mask"][b]].tolist()
        got_b = float(logprobs[b][batch["response_mask"][b]].sum().detach())
        assert abs(got_b - by_hand(prompt, reply, 1.5)) < 1e-3
