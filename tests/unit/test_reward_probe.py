"""Probe reward model: learns a separable preference from few votes on the tiny model, thumbs set the sign, cache."""

from __future__ import annotations

import math
import random

import pytest
import torch
from votes import WORDS, marker_pairs, user

from rlhf_live.learning.reward import create_reward_model
from rlhf_live.learning.reward.data import RewardDataError
from rlhf_live.learning.reward.probe import ProbeRewardModel


@pytest.fixture
def probe(tiny_cfg):
    return ProbeRewardModel.create(tiny_cfg)


def test_learns_a_separable_preference_from_thirty_pairs(probe):
    pairs = marker_pairs(30)
    assert probe.accuracy(marker_pairs(20, seed=1)) == 0.5  # untrained: every score is 0, ties count half
    metrics = probe.fit(pairs, eval_fraction=0.2)
    assert metrics["kind"] == "probe" and metrics["n_train"] == 24 and metrics["n_eval_pairs"] == 6
    assert metrics["accuracy"] == 1.0 and metrics["train_loss"] < math.log(2) / 2
    assert probe.accuracy(marker_pairs(20, seed=1)) == 1.0  # unseen pairs
    z = probe.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], normalise=True)
    assert z.dtype == torch.float32 and z.shape == (30,)


def test_fit_is_deterministic_and_refits_from_zero(probe):
    pairs = marker_pairs(20)
    probe.fit(pairs)
    first = probe.head.weight.detach().clone()
    flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    probe.fit(flipped)
    probe.fit(pairs)
    torch.testing.assert_close(probe.head.weight, first)


def test_thumbs_alone_set_the_sign_and_ties_alone_are_refused(probe):
    rng = random.Random(2)
    thumbs = []
    for i in range(30):
        body = " ".join(rng.choice(WORDS) for _ in range(4))
        thumbs += [{"prompt": user(f"q{i} {body}"), "completion": body + " thank you", "label": True}]
        thumbs += [{"prompt": user(f"q{i} {body}"), "completion": body + " hello", "label": False}]
    metrics = probe.fit([], pointwise=thumbs, eval_fraction=0)
    assert metrics["n_train_thumbs"] == 60 and metrics["accuracy"] is None
    test = marker_pairs(10, seed=3)
    r = probe.score([p["prompt"] for p in test] * 2, [p["chosen"] for p in test] + [p["rejected"] for p in test])
    assert (r[:10] > 0).all() and (r[10:] < 0).all()
    with pytest.raises(RewardDataError, match="Only ties"):
        probe.fit([], ties=[{"prompt": user("q"), "a": "x", "b": "y"}])


def test_features_of_an_answer_are_computed_once(probe, monkeypatch):
    pairs = marker_pairs(6)
    calls = []
    compute = probe._compute
    monkeypatch.setattr(probe, "_compute", lambda seqs: (calls.append(len(seqs)), compute(seqs))[1])
    probe.fit(pairs, eval_fraction=0)
    assert sum(calls) == 12
    probe.fit(pairs + marker_pairs(1, seed=9), eval_fraction=0)
    assert sum(calls) == 14  # only the new pair's two answers


def test_pooling_uses_the_answer_tokens_only(probe):
    """The same answer after two different prompts: mean-pooled middle layers differ (context), shapes hold."""
    f = probe.features([user("apples"), user("the weather in paris today")], ["sunny and warm", "sunny and warm"])
    assert f.shape == (2, probe.n_features) and torch.isfinite(f).all()
    ids, cut, n_answer = probe.encode_parts(user("apples"), "sunny and warm")
    assert cut == "" and 0 < n_answer < len(ids)
    assert ids[-n_answer:] == probe.encode_parts(user("the weather in paris today"), "sunny and warm")[0][-n_answer:]


def test_reward_kind_picks_the_model(tiny_cfg):
    assert isinstance(create_reward_model(tiny_cfg), ProbeRewardModel)
    tiny_cfg.reward_kind = "lora"
    assert type(create_reward_model(tiny_cfg)).__name__ == "RewardModel"


def test_features_are_the_layers_outputs(probe):
    """output_hidden_states (thread-safe) gives exactly what forward hooks on the chosen layers capture."""
    ids, _, n_answer = probe.encode_parts(user("apples"), "sunny and warm")
    captured = []
    hooks = [
        probe._decoder.layers[i].register_forward_hook(
            lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        for i in probe._layers
    ]
    try:
        with torch.no_grad():
            final = probe._decoder(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    pooled = [h[0, -n_answer:].float().mean(0) for h in (*captured, final)]
    expected = torch.cat([*pooled, final[0, -1].float()])
    torch.testing.assert_close(probe._compute([(ids, n_answer)])[0], expected)


def test_the_ensemble_is_the_fit_plus_randomised_prior_refits(probe):
    probe.fit(marker_pairs(12), eval_fraction=0)
    members = probe.posterior.members
    assert members.shape == (probe.cfg.reward_ensemble, probe.n_features + 1)
    torch.testing.assert_close(members[0], torch.cat([probe.head.weight[0], probe.head.bias]))
    assert len({tuple(m[:4].tolist()) for m in members}) == len(members)  # every resample fits differently
    first = members.clone()
    probe.fit(marker_pairs(12), eval_fraction=0)
    torch.testing.assert_close(probe.posterior.members, first)  # seeded: the same votes give the same ensemble


def test_few_votes_make_an_unsure_posterior_and_more_votes_a_sure_one(probe):
    test = marker_pairs(20, seed=5)
    prompts, chosen, rejected = [p["prompt"] for p in test], [p["chosen"] for p in test], [p["rejected"] for p in test]
    probe.fit(marker_pairs(3), eval_fraction=0)
    few = probe.prob_better(prompts, chosen, rejected)
    point = torch.sigmoid(probe.score(prompts, chosen) - probe.score(prompts, rejected))
    assert (few - 0.5).abs().mean() < (point - 0.5).abs().mean()  # resamples without the votes pull towards 1/2
    probe.fit(marker_pairs(40), eval_fraction=0)
    many = probe.prob_better(prompts, chosen, rejected)
    assert many.mean() > few.mean() and (many > 0.5).all()


def test_pick_pair_asks_about_the_best_answer_once_the_model_is_sure(probe):
    probe.fit(marker_pairs(40), eval_fraction=0)
    (pair,) = marker_pairs(1, seed=7)
    answers = [pair["rejected"], "", pair["chosen"], pair["rejected"] + " hello", "hello"]
    rng = random.Random(0)
    picks = [probe.pick_pair(pair["prompt"], answers, rng) for _ in range(20)]
    assert all(i != j and 1 not in (i, j) for i, j in picks)  # never the blank answer, never the same twice
    assert sum(picks[k][0] == 2 for k in range(20)) >= 16  # the preferred answer nearly always comes first
    # Before any fit there is no posterior: no opinion (Compare then picks two at random).
    fresh = ProbeRewardModel(probe.model, probe.tokenizer, probe.cfg)
    assert fresh.pick_pair(user("fruit?"), answers, random.Random(1)) is None


def test_member_scores_are_the_score_first_and_spread_most_where_no_vote_judged(probe):
    pairs = marker_pairs(40)
    assert probe.member_scores([pairs[0]["prompt"]], [pairs[0]["chosen"]]) is None  # no fit, no ensemble
    probe.fit(pairs, eval_fraction=0)
    prompts, answers = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    members = probe.member_scores(prompts, answers)  # (40, K)
    assert members.shape == (40, probe.cfg.reward_ensemble)
    torch.testing.assert_close(members[:, 0], probe.score(prompts, answers, normalise=True))
    # The fit's unit: the members' mean spread on (up to reward_norm_samples of) the voted answers.
    assert probe.norm_spread == pytest.approx(float(members.std(1).mean()), rel=0.05)
    # Text no vote resembled: the random priors are not cancelled there, so the members disagree more.
    odd = ["1.1 1.1 1.2 2.1 " * 6, "!!! " * 20, "zebra quantum " * 10]
    unseen = probe.member_scores(prompts[:3], odd).std(1).mean()
    assert unseen > 2 * probe.norm_spread
