"""Reward model: exact losses, truncation, bad input, and learning a separable preference on the tiny model."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from votes import WORDS, marker_pairs, user

from rlhf_live.learning.reward.data import RewardDataError, collect, split
from rlhf_live.learning.reward.lora import RewardModel
from rlhf_live.learning.reward.losses import _corr, bt_loss, length_loss, pointwise_loss, tie_loss
from rlhf_live.model.prompt import template
from rlhf_live.store.formats import Pair


@pytest.fixture
def rcfg(tiny_cfg):
    """Tiny model settings that learn in seconds."""
    return dataclasses.replace(
        tiny_cfg, reward_lora_r=8, reward_lora_alpha=16, reward_lr=2e-3, reward_epochs=3, reward_max_tokens=64
    )


# --- losses ------------------------------------------------------------------------------------------------
def test_bt_loss_exact_values():
    r_chosen, r_rejected = torch.tensor([2.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    expected = torch.tensor([math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0)), math.log(2.0)])
    torch.testing.assert_close(bt_loss(r_chosen, r_rejected), expected)


def test_tie_loss_is_minimal_at_equal_rewards():
    assert tie_loss(torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(math.log(2.0))
    assert tie_loss(torch.tensor(3.0), torch.tensor(3.0)).item() == pytest.approx(math.log(2.0))
    d = torch.linspace(-4, 4, 81)  # includes 0 at index 40
    losses = tie_loss(d, torch.zeros_like(d))
    assert losses.argmin().item() == 40
    torch.testing.assert_close(losses, losses.flip(0))  # symmetric: no side wins a tie
    # gradient vanishes exactly at equality and pulls the rewards together elsewhere
    a = torch.tensor([0.0, 1.0], requires_grad=True)
    tie_loss(a, torch.zeros(2)).sum().backward()
    assert a.grad[0].item() == 0.0 and a.grad[1].item() > 0


def test_pointwise_loss_exact_values():
    r, up = torch.tensor([0.0, 3.0, 3.0]), torch.tensor([True, True, False])
    expected = torch.tensor([math.log(2.0), math.log1p(math.exp(-3.0)), math.log1p(math.exp(3.0))])
    torch.testing.assert_close(pointwise_loss(r, up), expected)


# --- data handling -----------------------------------------------------------------------------------------
def test_split_keeps_each_conversation_on_one_side():
    pairs = []
    for c in range(20):  # 3 pairs per conversation, different last turns
        pairs += [
            {"prompt": user(f"q{c} turn {t}"), "chosen": "a", "rejected": "b", "conversation_id": c} for t in range(3)
        ]
    examples, _ = collect(pairs, (), ())
    train, held = split(examples, 0.2, seed=0)
    assert len(held) == 12 and len(train) == 48  # 4 of 20 conversations held out, whole
    assert not {e.group for e in train} & {e.group for e in held}
    # without ids the first user message groups the turns of one chat
    no_ids = [
        Pair([*user(f"q{c}"), {"role": "assistant", "content": "x"}, *user(f"more {t}")], "a", "b")
        for c in range(10)
        for t in range(2)
    ]
    train, held = split(collect(no_ids, (), ())[0], 0.2, seed=0)
    assert len(held) == 4 and not {e.group for e in train} & {e.group for e in held}


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(RewardDataError, match="No usable feedback"):
        collect([], [], [])
    with pytest.raises(RewardDataError, match="Only ties"):
        collect([], [{"prompt": user("q"), "a": "x", "b": "y"}], [])
    with pytest.raises(RewardDataError, match="identical"):
        collect([{"prompt": user("q"), "chosen": "same", "rejected": "same"}], [], [])
    with pytest.raises(RewardDataError, match="pair #1 has no 'rejected'"):
        collect([{"prompt": "q", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "x"}], [], [])
    with pytest.raises(RewardDataError, match="label must be True"):
        collect([], [], [{"prompt": "q", "completion": "x", "label": "maybe"}])
    with pytest.raises(RewardDataError, match="prompt must be"):
        collect([{"prompt": 42, "chosen": "x", "rejected": "y"}], [], [])


def test_duplicates_are_dropped_and_counted():
    pair = {"prompt": user("q"), "chosen": "x", "rejected": "y"}
    examples, counts = collect([pair, dict(pair), Pair(user("q"), "x", "y"), Pair(user("q"), "y", "x")], [], [])
    assert len(examples) == 2 and counts["n_duplicates"] == 2  # the contradicting vote is kept


def test_fit_refuses_no_pairs_and_only_ties(rcfg):
    rm = RewardModel.create(rcfg)
    with pytest.raises(RewardDataError, match="No usable feedback"):
        rm.fit([])
    with pytest.raises(RewardDataError, match="Only ties"):
        rm.fit([], ties=[{"prompt": user("q"), "a": "x", "b": "y"}])


def test_fit_on_a_single_pair_trains_without_held_out(rcfg):
    rm = RewardModel.create(dataclasses.replace(rcfg, reward_epochs=1))
    metrics = rm.fit([Pair(user("What is the capital of France?"), "Paris.", "London.")])
    assert (metrics["n_train"], metrics["n_eval"], metrics["steps"]) == (1, 0, 1)
    assert metrics["accuracy"] is None and metrics["eval_loss"] is None
    assert "nothing could be held out" in metrics["warning"]


# --- truncation --------------------------------------------------------------------------------------------
def test_truncation_cuts_the_conversation_as_serving_does_and_keeps_the_answer(rcfg):
    rm = RewardModel.create(rcfg)  # reward_max_tokens = 64
    answer = "The capital of France is Paris."
    short_ids, cut = rm.encode(user("Hello!"), answer)
    assert cut == ""
    answer_part = short_ids[len(rm.encode(user("Hello!"), "")[0]) - 2 :]  # template tail differs only by the answer
    long_prompt = [{"role": "system", "content": "Be kind."}, *user(" ".join(["apples and bananas"] * 80) + " What?")]
    ids, cut = rm.encode(long_prompt, answer)
    assert cut == "prompt" and 56 <= len(ids) <= 64  # a message alone too long keeps its end (a few tokens spare)
    assert ids[-len(answer_part) :] == answer_part  # the answer and its end-of-turn intact
    kept = rm.tokenizer.decode(ids[: -len(answer_part)])
    assert kept.startswith("<|im_start|>system\nBe kind.") and "What?<|im_end|>" in kept  # the system prompt stays
    long_answer = " ".join(["cherries"] * 100) + " The end."
    full = template(rm.tokenizer, [*user("q"), {"role": "assistant", "content": long_answer}], False)
    ids, cut = rm.encode(user("q"), long_answer)
    assert cut == "answer" and ids == full[-64:]  # its end kept
    metrics = rm.fit([{"prompt": long_prompt, "chosen": answer, "rejected": long_answer}], eval_fraction=0)
    assert metrics["n_prompt_truncated"] == 1 and metrics["n_answer_truncated"] == 1


# --- learning ----------------------------------------------------------------------------------------------
def test_learns_a_separable_preference_and_round_trips(rcfg, tmp_path):
    pairs = marker_pairs(100)
    rm = RewardModel.create(rcfg)
    before = rm.accuracy(pairs[80:])
    metrics = rm.fit(pairs, eval_fraction=0.2)
    assert metrics["n_train"] == 80 and metrics["n_eval"] == 20 and metrics["n_eval_pairs"] == 20
    assert metrics["accuracy"] == 1.0
    assert metrics["train_loss"] < 0.5 * metrics["train_loss_first"]
    assert metrics["eval_loss"] < 0.1
    assert before < 1.0  # it was learned, not there from the start
    fresh = marker_pairs(20, seed=1)
    assert rm.accuracy(fresh) == 1.0
    # normalisation: mean 0 / std 1 on the answers it was computed on
    prompts = [p["prompt"] for p in fresh] * 2
    answers = [p["chosen"] for p in fresh] + [p["rejected"] for p in fresh]
    stats = rm.set_normalisation(prompts, answers)
    z = rm.score(prompts, answers, normalise=True)
    assert z.dtype == torch.float32 and z.shape == (40,)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-5) and z.std().item() == pytest.approx(1.0, abs=1e-5)
    raw = rm.score(prompts, answers)
    torch.testing.assert_close(raw, z * stats["std"] + stats["mean"])


def test_thumbs_alone_and_ties_shape_the_reward(rcfg):
    rng = random.Random(2)
    thumbs, ties = [], []
    for i in range(40):
        body = " ".join(rng.choice(WORDS) for _ in range(4))
        q = user(f"q{i} {body}")
        thumbs += [{"prompt": q, "completion": body + " thank you", "label": True}]
        thumbs += [{"prompt": q, "completion": body + " hello", "label": False}]
        ties += [{"prompt": q, "a": body + " thank you", "b": "thank you " + body}]
    rm = RewardModel.create(rcfg)
    metrics = rm.fit([], ties=ties, pointwise=thumbs, eval_fraction=0)
    assert metrics["n_train_thumbs"] == 80 and metrics["n_train_ties"] == 40 and metrics["n_train_pairs"] == 0
    test = marker_pairs(20, seed=3)
    r = rm.score([p["prompt"] for p in test] * 2, [p["chosen"] for p in test] + [p["rejected"] for p in test])
    assert (r[:20] > 0).all() and (r[20:] < 0).all()  # thumbs set the sign, not just the order


def test_score_validates_lengths_and_needs_statistics(rcfg):
    rm = RewardModel.create(rcfg)
    assert rm.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="one answer per prompt"):
        rm.score([user("q")], ["a", "b"])
    with pytest.raises(RuntimeError, match="set_normalisation"):
        rm.score([user("q")], ["a"], normalise=True)
    with pytest.raises(RewardDataError):
        rm.accuracy([])


@pytest.mark.slow
def test_real_model_nf4_dequantized_scores_and_trains(real_model_dir):
    """The default model: NF4 linears become bf16 with the same values, and a step of fit runs on CPU."""
    import bitsandbytes as bnb

    from rlhf_live.config import Config

    cfg = Config(model=str(real_model_dir), reward_max_tokens=96, reward_epochs=1, reward_batch_size=2)
    rm = RewardModel.create(cfg)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in rm.model.modules())
    pairs = [Pair(user("What is the capital of France?"), "Paris is the capital of France.", "I don't know.")]
    pairs.append(Pair(user("Say hello."), "Hello! How can I help you today?", "No."))
    metrics = rm.fit(pairs, eval_fraction=0)
    assert metrics["steps"] == 1 and math.isfinite(metrics["train_loss"])
    r = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs], normalise=True)
    assert r.shape == (2,) and r.dtype == torch.float32 and torch.isfinite(r).all()


# --- ODIN length head ----------------------------------------------------------------------------------------
def test_length_loss_exact_values():
    lengths = torch.tensor([10.0, 20.0, 30.0, 40.0])
    flat = torch.tensor([1.0, -1.0, -1.0, 1.0])  # uncorrelated with length
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert length_loss(flat, lengths / 10, lengths, e1, e2).item() == pytest.approx(-1.0)  # disentangled
    assert length_loss(lengths, -lengths, lengths, e1, e1).item() == pytest.approx(3.0)  # the worst case
    assert length_loss(-lengths, lengths, lengths, e1, -e2).item() == pytest.approx(0.0)  # |corr| counts both signs


def _length_pairs(n: int, seed: int) -> list[dict]:
    """Pairs where the longer answer always wins and nothing else differs: length is the only signal."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        short = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        long = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10)))
        out.append({"prompt": user(f"q{i} {rng.choice(WORDS)}"), "chosen": long, "rejected": short})
    return out


@pytest.mark.parametrize("length_head", [False, True])
def test_length_head_takes_the_length_and_scores_use_the_quality_head(rcfg, tmp_path, length_head):
    """On length-only preferences a single head learns length; with ODIN's head the quality head does not."""
    cfg = dataclasses.replace(rcfg, reward_length_head=length_head)
    torch.manual_seed(0)
    rm = RewardModel.create(cfg)
    rm.fit(_length_pairs(100, 0), eval_fraction=0.2)
    test = _length_pairs(30, 1)
    prompts = [p["prompt"] for p in test] * 2
    answers = [p["chosen"] for p in test] + [p["rejected"] for p in test]
    lengths = torch.tensor([float(len(a)) for a in answers])
    with torch.no_grad():
        heads = rm._rewards([rm.encode(p, a)[0] for p, a in zip(prompts, answers)])  # (60, K)
    scores = rm.score(prompts, answers)
    torch.testing.assert_close(scores, heads[:, 0], rtol=1e-4, atol=1e-5)  # score() is the quality head alone
    # Measured (seed 0): one head corr 0.86 and accuracy 1.0; ODIN: quality 0.16, length head 0.92, accuracy 0.57.
    if not length_head:
        assert heads.shape[1] == 1
        assert _corr(scores, lengths) > 0.6 and rm.accuracy(test) > 0.9
        return
    assert heads.shape[1] == 2
    assert abs(_corr(scores, lengths)) < 0.4 and _corr(heads[:, 1], lengths) > 0.7
    assert rm.accuracy(test) < 0.75


# --- rlhf-live reward-eval -----------------------------------------------------------------------------------
def _write_jsonl(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_reward_eval_cli_prints_accuracy_json(tiny_lm_dir, tmp_path, capsys):
    """`rlhf-live reward-eval`: fits once, tests on the train file's tail and on a second file, prints the JSON."""
    import json

    from rlhf_live.cli import main

    train = _write_jsonl(tmp_path / "train.jsonl", marker_pairs(60))
    other = _write_jsonl(tmp_path / "other.jsonl", marker_pairs(12, seed=5))
    flags = ["--model", str(tiny_lm_dir), "--no-load-in-4bit", "--compute-dtype", "float32"]
    flags += ["--reward-max-tokens", "64", "--data-dir", str(tmp_path)]
    lora = ["--reward-kind", "lora", "--reward-lr", "2e-3", "--reward-epochs", "3"]
    args = ["reward-eval", "--train", train, "--test", train, "--test", other, "--limit-train", "50"]
    assert main(args + ["--limit-test", "10", *flags, *lora]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["n_train"], out["n_test"]) == (50, 10)  # the train file's last 10, disjoint from the first 50
    assert out["n_test_by_file"] == {train: 10, other: 10}  # --limit-test caps every test file
    assert out["accuracy"] == out["accuracy_by_file"][train] == 1.0
    assert out["accuracy_by_file"][other] == 1.0
    assert out["length_baseline_by_file"][other] == 1.0  # 'thank you' is longer than 'hello'
    assert out["seconds"] > 0 and out["fit"]["steps"] > 0
    # Without --reward-kind it evaluates the app's own reward model, the probe (no gradient steps: a closed fit).
    assert main(args + ["--limit-test", "10", *flags]) == 0
    probe = json.loads(capsys.readouterr().out)
    assert "steps" not in probe["fit"] and probe["n_test_by_file"] == {train: 10, other: 10}

    # Bad input: a clear one-line error, exit code 2.
    assert main(["reward-eval", "--train", train, "--test", train, "--limit-train", "60", *flags]) == 2
    assert "No test pairs" in capsys.readouterr().err
