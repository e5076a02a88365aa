"""DPO and KTO on the tiny model: rows from votes, the loss falls, a loadable version, failures change nothing."""

import math
import time
from dataclasses import replace

import pytest
import torch

from rlhf_live.learning.direct import DirectDivergence, dpo_examples, kto_examples, train_direct
from rlhf_live.learning.reward.data import RewardDataError
from rlhf_live.learning.round import run_round
from rlhf_live.learning.trainer import Trainer
from rlhf_live.model.lora import BASE, attach_adapter
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.service import Service
from rlhf_live.store import Store
from rlhf_live.store.rows import PairRow, ThumbRow

P = [{"role": "user", "content": "Tell me about apples."}]


@pytest.fixture
def direct_cfg(tiny_cfg):
    tiny_cfg.ppo_max_new_tokens, tiny_cfg.gate_prompts, tiny_cfg.direct_batch_size = 6, 2, 2
    tiny_cfg.train_check_s, tiny_cfg.train_min_new_votes = 0.2, 1
    return tiny_cfg


def _tiny_policy_copy(cfg):
    from rlhf_live.model.base import load_base

    base, tokenizer = load_base(cfg, cfg.model)
    return attach_adapter(base, cfg, None, trainable=True), tokenizer


def _vote(service: Service, *, pairs: bool = True, thumbs: bool = True) -> None:
    voter = service.voter("tester")
    for i in range(4):
        if pairs:
            *_, pair = service.compare(voter, f"Tell me about apples number {i}")
            service.choose(voter, pair["pair_id"], "A" if i % 2 else "B")
            *_, pair = service.compare(voter, f"A tie {i}")
            service.choose(voter, pair["pair_id"], "tie")
        if thumbs:
            *_, last = service.chat(voter, f"What is the weather like {i}?")
            service.feedback(voter, last["response_id"], "up" if i % 2 else "down")


def test_votes_become_trl_rows(direct_cfg):
    _, tokenizer = _tiny_policy_copy(direct_cfg)
    pirate = {"role": "system", "content": "You are a pirate."}  # a row keeps the system prompt it was answered under
    pairs = [PairRow([pirate, *P], "Red.", "Apples are a fruit that grows on trees.")]
    pairs.append(PairRow(P, "Same.", "Same."))  # nothing to learn: dropped
    (row,) = dpo_examples(direct_cfg, tokenizer, pairs)
    assert row == {
        "prompt": [pirate, *P],
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "Apples are a fruit that grows on trees."}],
        "weight": 1.0,
    }
    (imported,) = dpo_examples(direct_cfg, tokenizer, [replace(pairs[0], prompt=P)])
    assert imported["prompt"] == P  # stored without one (an import): none is made up
    thumbs = [ThumbRow(P, "Green.", False)]
    rows = kto_examples(direct_cfg, tokenizer, pairs[:1], thumbs)
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [
        ("Green.", False),
        ("Red.", True),
        ("Apples are a fruit that grows on trees.", False),
    ]
    # A conversation longer than the prompt budget loses its oldest turns, never the question nor the system prompt.
    long = [pirate, {"role": "user", "content": "old " * 300}, {"role": "assistant", "content": "ok"}, *P]
    (row,) = dpo_examples(direct_cfg, tokenizer, [replace(pairs[0], prompt=long)])
    assert row["prompt"] == [pirate, *P]


def test_dpo_loss_falls_on_separable_pairs(direct_cfg):
    direct_cfg.direct_epochs, direct_cfg.direct_lr, direct_cfg.direct_batch_size = 8, 3e-3, 4
    model, tokenizer = _tiny_policy_copy(direct_cfg)
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(8)]
    pairs = [PairRow(p, "Thank you very much.", "It is sunny and warm.") for p in prompts]
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    metrics = train_direct("dpo", model, tokenizer, direct_cfg, pairs, [], seed=0)
    assert metrics["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # ln 2: the policy starts as the reference
    assert metrics["loss_last"] < 0.8 * metrics["loss_first"]  # measured: 0.693 -> 0.490
    assert metrics["reward_accuracies"] == 1.0 and metrics["steps"] == 16
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the PeftModel passed in was trained
    assert set(model.peft_config) == {"default"}  # TRL's reference copy is gone: the reference is the base


def test_dpo_follows_the_weighted_votes_when_two_sources_contradict(direct_cfg):
    direct_cfg.direct_epochs, direct_cfg.direct_lr, direct_cfg.direct_batch_size = 8, 3e-3, 4
    model, tokenizer = _tiny_policy_copy(direct_cfg)
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(8)]
    honest = [PairRow(p, "Thank you very much.", "It is sunny and warm.") for p in prompts]
    # The same pairs the other way round from a source over its cap: weighted 1/50, so rarely drawn. Unweighted,
    # the two halves cancel and the loss cannot leave ln 2.
    contrary = [replace(p, chosen=p.rejected, rejected=p.chosen, weight=0.02) for p in honest]
    metrics = train_direct("dpo", model, tokenizer, direct_cfg, honest + contrary, [], seed=0)
    assert metrics["examples"] == 16.0 and metrics["loss_last"] < 0.8 * math.log(2)


def test_kto_learns_from_thumbs_alone(direct_cfg):
    store = Store.from_config(direct_cfg)
    _vote(Service(Policy.from_config(direct_cfg), store, direct_cfg), pairs=False)
    direct_cfg.learner = "kto"
    assert store.preference_pairs() == []
    metrics = run_round(direct_cfg, store)
    assert metrics["learner"] == "kto" and metrics["kto/examples"] == 4.0
    with pytest.raises(RewardDataError, match="DPO needs A/B choices"):
        run_round(replace(direct_cfg, learner="dpo"), store)


@pytest.mark.parametrize("learner", ["dpo", "kto"])
def test_a_round_publishes_a_version_serving_loads(direct_cfg, learner):
    store = Store.from_config(direct_cfg)
    policy = Policy.from_config(direct_cfg)
    _vote(Service(policy, store, direct_cfg))
    cfg = replace(direct_cfg, learner=learner)
    metrics = run_round(cfg, store)
    assert metrics["learner"] == learner and metrics[f"{learner}/examples"] == (4.0 if learner == "dpo" else 12.0)
    for key in ("sample/kl", "sample/answer_tokens", "sample/eos_rate", f"{learner}/loss_first", "seconds/train"):
        assert key in metrics, key
    row = store.live_adapter()
    assert row["version"] == "v0001" and row["metrics"]["learner"] == learner
    policy.swap(row["path"], row["version"])
    assert policy.version == "v0001"
    # The next round continues from the live version, on the votes that came after it (each vote used once).
    with pytest.raises(RewardDataError, match="to learn from: 0 in this round"):
        run_round(cfg, store)
    _vote(Service(policy, store, direct_cfg))
    assert run_round(cfg, store)["parent"] == "v0001"


def test_a_learner_that_yields_nan_leaves_serving_untouched(direct_cfg):
    store = Store.from_config(direct_cfg)
    policy = Policy.from_config(direct_cfg)
    service = Service(policy, store, direct_cfg)
    _vote(service)
    cfg = replace(direct_cfg, learner="dpo", direct_beta=float("nan"))  # NaN loss, NaN gradients
    with pytest.raises(DirectDivergence, match="non-finite"):
        run_round(cfg, store)
    assert store.runs(1)[0]["status"] == "failed" and store.live_adapter() is None
    trainer = Trainer(cfg, store, policy)
    trainer.start()
    try:
        trainer.request_round()
        deadline = time.time() + 120
        while not trainer.status()["last_error"] and time.time() < deadline:
            time.sleep(0.2)
    finally:
        trainer.stop()
    assert "DirectDivergence" in trainer.status()["last_error"] and policy.version == BASE
    *_, last = service.chat(service.voter("after"), "Hello?")
    assert last["response_id"]


def test_an_unknown_learner_is_a_clear_error(direct_cfg):
    store = Store.from_config(direct_cfg)
    with pytest.raises(ValueError, match="learner must be one of ppo, dpo, kto, rm-dpo, not 'sft'"):
        run_round(replace(direct_cfg, learner="sft"), store)


def test_simulate_with_a_direct_learner(direct_cfg, tmp_path):
    from rlhf_live.eval.simulate import simulate

    cfg = replace(direct_cfg, learner="dpo")
    # A rule that never ties: the tiny model's random answers often have equal word counts (concise tied both of a
    # round's votes in CI, and DPO rightly refused a round with no A/B choice to learn from).
    result = simulate(cfg, "tests.unit.test_raters:always_b", 4, round_every=2, eval_prompts=2, out=tmp_path / "out")
    assert result["learner"] == "dpo"
    assert [e["status"] for e in result["history"]] == ["base", "live", "live"]
    assert result["history"][1]["train_loss_first"] == pytest.approx(0.6931, abs=1e-3)
    assert Store.from_config(cfg).live_adapter()["metrics"]["learner"] == "dpo"


def test_reward_ranked_pairs_are_best_vs_worst_when_the_reward_model_is_sure():
    from rlhf_live.learning.direct import reward_ranked_pairs

    prompts = [[{"role": "user", "content": q}] for q in ("One?", "Two?", "Three?")]
    texts = {"One?": ["bad", "good", "ok"], "Two?": ["", "x", "y"], "Three?": ["same", "same", "same"]}
    value = {"bad": -2.0, "good": 2.0, "ok": 0.0, "": 5.0, "x": 0.0, "y": 0.3, "same": 1.0}
    calls = []

    def sample(repeated):
        calls.append(len(repeated))
        seen: dict[str, int] = {}
        out = []
        for p in repeated:
            q = p[-1]["content"]
            out.append(texts[q][seen.get(q, 0)])
            seen[q] = seen.get(q, 0) + 1
        return out

    def score(ps, answers):
        return torch.tensor([value[a] for a in answers])

    pairs, metrics = reward_ranked_pairs(prompts, sample, score, 3, min_confidence=0.6)
    assert calls == [9]
    # "Two?": the blank answer scores highest but is never chosen; y beats the blank by -4.7: not sure -> no pair.
    # "Three?": all answers equal: no pair.
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs] == [("One?", "good", "bad")]
    assert metrics["pairs"] == 1.0 and metrics["samples"] == 9.0
    assert metrics["pair_confidence"] == pytest.approx(1 / (1 + math.exp(-4.0)))
    # A reward model that is unsure (gap 0.3 < logit(0.6) = 0.405) adds nothing; a lower bar takes the pair.
    value.update({"bad": -0.1, "good": 0.1})
    assert reward_ranked_pairs(prompts[:1], sample, score, 3, min_confidence=0.6)[0] == []
    assert len(reward_ranked_pairs(prompts[:1], sample, score, 3, min_confidence=0.5)[0]) == 1
    # An ensemble's probability decides when given: here it is unsure of every pair.
    unsure = lambda ps, a, b: torch.full((len(a),), 0.55)  # noqa: E731
    assert reward_ranked_pairs(prompts, sample, score, 3, min_confidence=0.6, prob_better=unsure)[0] == []


def test_an_rm_dpo_round_trains_on_votes_and_ranked_samples(direct_cfg):
    store = Store.from_config(direct_cfg)
    policy = Policy.from_config(direct_cfg)
    _vote(Service(policy, store, direct_cfg), thumbs=False)
    cfg = replace(direct_cfg, learner="rm-dpo", rm_dpo_prompts=3, rm_dpo_samples=2, rm_dpo_min_confidence=0.5)
    metrics = run_round(cfg, store)
    assert metrics["learner"] == "rm-dpo" and metrics["rm-dpo/samples"] == 6.0
    assert metrics["rm-dpo/examples"] == 4.0 + metrics["rm-dpo/pairs"]  # the 4 A/B votes + the ranked pairs
    assert "reward/accuracy" in metrics and "seconds/sample_pairs" in metrics
    row = store.live_adapter()
    assert row["version"] == "v0001" and row["metrics"]["learner"] == "rm-dpo"
    policy.swap(row["path"], row["version"])
    # The next round has no new votes: it learns from ranked samples alone (or says it has nothing to learn from).
    try:
        second = run_round(cfg, store)
    except RewardDataError as exc:
        assert "pairs the reward model is sure of" in str(exc)
    else:
        assert second["rm-dpo/examples"] == second["rm-dpo/pairs"] > 0 and second["parent"] == "v0001"
