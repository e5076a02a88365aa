"""Evaluation: Wilson interval, distinct-2, and an evaluation pass on the tiny model with exact outcomes."""

import pytest
import torch

from rlhf_live.eval.evaluation import Evaluator, answer_stats, distinct_n, is_answer, wilson_interval
from rlhf_live.eval.raters import load_rater
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.samplers import Answer
from rlhf_live.serving.settings import GenerationSettings

PROMPTS = [[{"role": "user", "content": f"Tell me about apples number {i}."}] for i in range(6)]


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0.5, 48)
    assert lo == pytest.approx(0.3639, abs=1e-4) and hi == pytest.approx(0.6361, abs=1e-4)
    lo, hi = wilson_interval(1.0, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    assert wilson_interval(0.3, 0) == (0.0, 1.0)


def test_distinct_2_and_answer_stats():
    assert distinct_n("a b a b") == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n("word") == 1.0
    answers = [Answer("a b a b", [1, 2, 3, 4], "eos"), Answer("one two three", [5, 6], "length")]
    answers.append(Answer(" ", [7], "eos"))
    stats = answer_stats(answers)
    assert stats == {
        "answer_words": 7 / 3,
        "answer_tokens": 7 / 3,
        "eos_rate": 2 / 3,
        "distinct2": pytest.approx((2 / 3 + 1 + 1) / 3),
        "answered_rate": 2 / 3,
    }


def test_a_blank_or_parroted_answer_is_not_an_answer():
    prompt = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is X?"}]
    assert is_answer(prompt, "X is a letter.")
    assert not is_answer(prompt, "  ") and not is_answer(prompt, "What is X") and not is_answer(prompt, "is x?")
    assert not is_answer(prompt, "You are a helpful assistant.") and is_answer(prompt, "h")  # words, not letters
    answers = [Answer("What is X?", [1], "eos"), Answer("X is a letter.", [2], "eos")]
    assert answer_stats(answers, [prompt, prompt])["answered_rate"] == 0.5


def test_base_against_itself_ties_and_has_zero_kl(tiny_cfg):
    policy = Policy.from_config(tiny_cfg)
    settings = GenerationSettings.from_config(tiny_cfg, max_new_tokens=6, seed=0)
    evaluator = Evaluator(policy, load_rater("tests.unit.test_raters:always_b"), PROMPTS, settings)
    result = Evaluator(policy, lambda p, a, b: "tie", PROMPTS, settings).evaluate()
    assert result["win_rate"] == 0.5 and result["ties"] == 6 and result["kl"] == 0.0
    # A rater that always picks B: the live answer wins exactly when it was shown second.
    result = evaluator.evaluate()
    shown_second = sum(s["outcome"] == 1.0 for s in result["samples"])
    assert result["win_rate"] == shown_second / 6 and result["ties"] == 0
    assert result["fluent"] and len(result["samples"]) == 6


def test_a_version_that_answers_nothing_is_not_fluent(tiny_cfg, monkeypatch):
    policy = Policy.from_config(tiny_cfg)
    settings = GenerationSettings.from_config(tiny_cfg, max_new_tokens=6, seed=0)
    evaluator = Evaluator(policy, load_rater("concise"), PROMPTS, settings)
    monkeypatch.setattr(policy, "generate_many", lambda prompts, *a, **k: [Answer("", [0], "eos") for _ in prompts])
    result = evaluator.evaluate()
    # Blank answers end with EOS and never repeat themselves: only the answered rate shows the collapse.
    assert result["answered_rate"] == 0.0 and result["eos_rate"] == 1.0 and result["distinct2"] == 1.0
    assert not result["fluent"]
    assert result["win_rate"] == sum(not s["base"].split() for s in result["samples"]) / 12  # blank loses, or ties


def test_kl_to_base_is_zero_for_a_fresh_lora_and_positive_once_it_moves(tiny_cfg, tmp_path):
    policy = Policy.from_config(tiny_cfg)
    settings = GenerationSettings.from_config(tiny_cfg, max_new_tokens=6, seed=0)
    policy.model.save_pretrained(tmp_path / "v0001")  # B = 0: the same distribution as the base
    policy.swap(tmp_path / "v0001", "v0001")
    answers = policy.generate_many(PROMPTS, settings)
    assert all(a.adapter_version == "v0001" for a in answers)
    assert policy.kl_to_base(PROMPTS, answers, settings) == pytest.approx([0.0] * 6, abs=1e-5)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    answers = policy.generate_many(PROMPTS, settings)
    kl = policy.kl_to_base(PROMPTS, answers, settings)
    assert sum(kl) / len(kl) > 0.01


def test_reward_accuracy_on_the_raters_labels(tiny_cfg):
    policy = Policy.from_config(tiny_cfg)
    settings = GenerationSettings.from_config(tiny_cfg, max_new_tokens=8, seed=0)

    class MoreWords:  # a stand-in reward model that likes what the verbose rater likes
        def score(self, prompts, answers):
            return torch.tensor([float(len(a.split())) for a in answers])

    for rater, expected in (("verbose", 1.0), ("concise", 0.0)):
        result = Evaluator(policy, load_rater(rater), PROMPTS, settings, seed=1).evaluate(MoreWords())
        assert result["reward_accuracy_on_rater"] == expected  # None (nothing decided) would fail too
