"""Each source's influence: the share cap in every learner's weights, the contrarian test, ban and clear."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
from votes import FakePolicy, marker_pairs

from rlhf_live.config import Config
from rlhf_live.learning import crowd
from rlhf_live.learning.direct import _weighted, dpo_examples, kto_examples
from rlhf_live.learning.reward.data import collect
from rlhf_live.learning.reward.lora import RewardModel
from rlhf_live.learning.reward.probe import ProbeRewardModel
from rlhf_live.learning.round import _flag_contrarians, _Round, _weigh
from rlhf_live.serving.callers import Caller
from rlhf_live.serving.service import BANNED, Service
from rlhf_live.store import InvalidInput, Store, UnknownId
from rlhf_live.store.rows import PairRow


def _shares(sources: list[str], weights: list[float]) -> dict[str, float]:
    return {s: round(v, 6) for s, v in crowd.shares(sources, weights).items()}


def test_no_source_carries_more_than_its_share_and_its_votes_are_down_weighted_not_dropped():
    sources = ["attacker"] * 40 + [f"honest{i}" for i in range(5) for _ in range(8)]
    weights = crowd.capped_weights(sources, 0.25)
    assert _shares(sources, weights)["attacker"] == 0.25
    assert all(w > 0 for w in weights) and math.isclose(sum(weights) / len(weights), 1.0)
    # Each honest source keeps an equal part of the rest, and one attacker vote weighs less than one honest vote.
    assert _shares(sources, weights)["honest0"] == 0.15 and weights[0] < weights[-1]
    # Under the cap nothing changes; too few sources for the cap: equal shares; zeroed sources weigh 0.
    assert crowd.capped_weights(["a", "b", "c", "d", "e"], 0.25) == [1.0] * 5
    assert _shares(["a"] * 9 + ["b"], crowd.capped_weights(["a"] * 9 + ["b"], 0.25)) == {"a": 0.5, "b": 0.5}
    zeroed = crowd.capped_weights(["a", "b", "b", ""], 1.0, zeroed=frozenset({"b"}))
    assert zeroed[1:3] == [0.0, 0.0] and zeroed[0] == zeroed[3] == 1.0
    assert Config(min_round_sources=3, max_source_share=0.25).sources_per_round() == 4
    assert Config(min_round_sources=5, max_source_share=0.25).sources_per_round() == 5
    with pytest.raises(ValueError):
        crowd.capped_weights(["a"], 0.0)


def test_the_consensus_is_calibrated_on_the_others_votes_before_it_accuses_anyone():
    # Votes fall as the others' model says (80% as cast at p = 0.8): trusted as it is (beta = 1).
    calibrated = {f"s{i}": [0.8] * 8 + [0.2] * 2 for i in range(4)}
    assert crowd.calibration(calibrated) == pytest.approx(1.0, abs=1e-6)
    # The same votes with the model 99% sure: overconfident, so each of its logits counts 0.30 of itself.
    overconfident = {f"s{i}": [0.99] * 8 + [0.01] * 2 for i in range(4)}
    assert crowd.calibration(overconfident) == pytest.approx(math.log(4) / math.log(99), abs=1e-6)
    # Never surer than the model: ten votes it gets right at p = 0.6 look certain, and count as 0.6 each still.
    assert crowd.calibration({"s0": [0.6] * 6, "s1": [0.6] * 4}) == 1.0
    # A model no better than chance at predicting people accuses nobody, however sure it is of a source's votes.
    chance = {f"s{i}": [0.9, 0.1] * 5 for i in range(5)}
    assert crowd.calibration(chance) == 0 and crowd.evidence([0.01] * 20, 0.0).log_odds == 0


def test_evidence_weighs_each_vote_by_how_sure_the_calibrated_consensus_is():
    # The others agree with typical sources 80% of the time at p = 0.9: beta = log 4 / log 9. A source agreeing 20%
    # of the time: 6 net disagreements of log 4 each (at one confidence it is the count of disagreements).
    probs = {f"honest{i}": [0.9] * 8 + [0.1] * 2 for i in range(4)}
    beta = crowd.calibration(probs)
    contrarian, honest = crowd.evidence([0.9] * 2 + [0.1] * 8, beta), crowd.evidence(probs["honest0"], beta)
    assert contrarian.agree == 0.2 and contrarian.log_odds == pytest.approx(6 * math.log(4))
    assert crowd.is_contrarian(contrarian, 8, 100) and not crowd.is_contrarian(honest, 8, 100) and honest.log_odds < 0
    assert not crowd.is_contrarian(crowd.evidence([0.1] * 7, beta), 8, 100)  # too few votes to flag
    # Disagreeing where the consensus is sure says more than where it hesitates; no vote says more than log 19.
    sure, unsure = crowd.evidence([0.95] * 5 + [0.05] * 5, 1.0), crowd.evidence([0.95] * 5 + [0.45] * 5, 1.0)
    assert sure.log_odds == pytest.approx(0, abs=1e-9) and unsure.log_odds < -10
    assert crowd.evidence([1e-9], 1.0).log_odds == pytest.approx(math.log(19))
    # An honest source the model is sure it gets wrong twice is still typical.
    assert crowd.evidence([0.99] * 8 + [1e-6] * 2, beta).log_odds < 0


def test_the_trimmed_test_flags_the_contrarian_against_a_consensus_fitted_without_it():
    # The attacker sits in every honest source's leave-out model and drags it to chance; left out, the consensus is
    # sure again. held_out(without) plays the leave-out models.
    def held_out(without: frozenset[str]) -> dict[str, list[float]]:
        p = 0.9 if "attacker" in without else 0.55
        honest = {f"honest{i}": [p] * 8 + [1 - p] * 2 for i in range(4)}
        return honest if "attacker" in without else honest | {"attacker": [0.1] * 10}

    test = crowd.trimmed_test(held_out, frozenset(), 8, 100)
    assert list(test.flagged) == ["attacker"] and test.tested == 5
    assert test.flagged["attacker"].log_odds == pytest.approx(10 * math.log(4)) and test.beta > 0
    # Cleared by an admin: never tested again; with too few votes nobody is tested.
    assert crowd.trimmed_test(held_out, frozenset({"attacker"}), 8, 100).flagged == {}
    assert crowd.trimmed_test(held_out, frozenset(), 11, 100).tested == 0


def test_the_trainer_weighs_votes_only_on_public_deployments(tiny_cfg):
    rows = [PairRow([], "a", "b", voter_source="big") for _ in range(30)]
    rows += [PairRow([], "a", "b", voter_source=f"s{i}") for i in range(6)]
    (local,) = _weigh(tiny_cfg, frozenset(), rows)
    assert local is rows  # a laptop trains as before
    pairs, thumbs = _weigh(replace(tiny_cfg, public=True), frozenset({"s0"}), rows[:20], rows[20:])
    weighted = pairs + thumbs
    share = crowd.shares([r.voter_source for r in weighted], [r.weight for r in weighted])
    assert share["big"] == pytest.approx(0.25) and "s0" not in share and rows[0].weight == 1.0  # copies, weighted


def test_every_learner_honours_the_weights(tiny_cfg):
    pairs = [PairRow(p["prompt"], p["chosen"], p["rejected"], weight=w) for p, w in zip(marker_pairs(3), (0.5, 1.0))]
    pairs.append(PairRow(marker_pairs(3)[2]["prompt"], "x", "y", weight=0.0))
    # Reward model (LoRA and probe): each example's loss is scaled by its weight; weight 0 is not trained on.
    examples, counts = collect(pairs, [], [])
    assert [e.weight for e in examples] == [0.5, 1.0] and counts["n_zero_weight"] == 1
    lora = RewardModel.create(tiny_cfg)
    lora.encoder.fill(examples)
    losses, _ = lora._losses(examples)
    unweighted, _ = lora._losses([replace(e, weight=1.0) for e in examples])
    torch.testing.assert_close(losses, unweighted * torch.tensor([0.5, 1.0]))
    probe = ProbeRewardModel.create(tiny_cfg)
    per = probe._per_example(examples, [[0, 1], [2, 3]])
    r = torch.tensor([0.3, -0.2, 0.1, 0.4])
    flat = probe._per_example([replace(e, weight=1.0) for e in examples], [[0, 1], [2, 3]])
    torch.testing.assert_close(per(r), flat(r) * torch.tensor([0.5, 1.0]))
    # DPO and KTO (TRL, no per-row loss weight): rows carry the weight and batches are drawn in proportion to it.
    tok = probe.tokenizer
    assert [e["weight"] for e in dpo_examples(tiny_cfg, tok, pairs)] == [0.5, 1.0]
    assert [e["weight"] for e in kto_examples(tiny_cfg, tok, pairs, [])] == [0.5, 0.5, 1.0, 1.0]

    class Trainer:
        train_dataset = {"weight": [0.0, 1.0, 3.0] * 1000}

    drawn = [i % 3 for i in _weighted(Trainer, seed=0)()._get_train_sampler()]
    assert len(drawn) == 3000 and drawn.count(0) == 0 and 2.6 < drawn.count(2) / drawn.count(1) < 3.4


def _voted(store: Store, source: str, n: int, *, agree: bool) -> None:
    """`n` A/B votes from one source on marker pairs, agreeing with the others (chosen = 'thank you') or not."""
    for i, p in enumerate(marker_pairs(n, seed=hash(source) % 1000)):
        cid = store.new_conversation(f"v-{source}-{i}")
        q = store.add_message(cid, "user", p["prompt"][0]["content"])
        a = store.add_message(cid, "assistant", p["chosen"], parent_id=q, adapter_version="base")
        b = store.add_message(cid, "assistant", p["rejected"], parent_id=q, adapter_version="base")
        pid = store.new_comparison(cid, a, b, a_source="base", b_source="base", voter=f"v-{source}-{i}")
        store.choose(pid, f"v-{source}-{i}", "A" if agree else "B", source=source)


def test_a_contrarian_source_is_flagged_and_honest_ones_are_not(tiny_cfg):
    cfg = replace(tiny_cfg, public=True)
    store = Store(cfg.db_path)
    for s in ("honest-1", "honest-2", "honest-3"):
        _voted(store, s, 12, agree=True)
    _voted(store, "attacker", 12, agree=False)
    probe = ProbeRewardModel.create(cfg)
    weighted = _weigh(cfg, frozenset(), store.preference_pairs(), [], [])
    probe.fit(*weighted[:1], eval_fraction=0)

    r = _Round(cfg, None, random.Random(0), [], None, lambda *a: None, lambda: None)
    assert _flag_contrarians(r, store, probe, weighted, {}, store.watermark()) == {"attacker"}
    assert r.metrics["crowd/tested"] == 4 and r.metrics["crowd/flagged"] == 1 and r.metrics["crowd/calibration"] > 0
    row = store.source_rows()[0]
    assert (row["source"], row["status"], row["votes"]) == ("attacker", "flagged", 12) and row["log_odds"] > 0
    assert store.sources_between(0, store.watermark()) == 3  # a flagged source no longer counts towards a round
    # An admin clears it: it weighs again and the test never flags it again.
    assert _flag_contrarians(r, store, probe, weighted, {"attacker": "cleared"}, 0) == frozenset()


def test_admins_ban_and_clear_sources_and_a_banned_source_cannot_vote(tiny_cfg):
    store = Store(tiny_cfg.db_path)
    _voted(store, "s-aaaa-troll", 2, agree=False)
    _voted(store, "s-aaaa-kind", 1, agree=True)
    service = Service(FakePolicy(), store, tiny_cfg)
    rows = service.dashboard.sources()
    assert [(r["source"], r["votes"], r["status"]) for r in rows] == [
        ("s-aaaa-troll", 2, "counted"),
        ("s-aaaa-kind", 1, "counted"),
    ]
    assert "is banned" in service.set_source_status("s-aaaa-t", "banned")
    assert service.dashboard.status()["sources_banned"] == 1
    cid = store.new_conversation("v-new")
    q = store.add_message(cid, "user", "hi")
    answer = store.add_message(cid, "assistant", "hello", parent_id=q, adapter_version="base")
    with pytest.raises(Exception, match="no longer accept"):
        service.feedback(Caller("v-new", "s-aaaa-troll"), answer, "up")
    assert BANNED.startswith("This deployment's admins") and store.feedback_value(answer, "v-new") is None
    assert "count again" in service.set_source_status("s-aaaa-troll", "cleared")
    assert service.feedback(Caller("v-new", "s-aaaa-troll"), answer, "up")["value"] == "up"
    with pytest.raises(InvalidInput, match="More than one"):
        service.set_source_status("s-aaaa", "banned")  # the prefix of two sources: a clear error, nothing changes
    with pytest.raises(InvalidInput, match="6 characters"):
        service.set_source_status("s-", "banned")
    with pytest.raises(UnknownId):
        service.set_source_status("s-nobody", "banned")
    with pytest.raises(InvalidInput, match="status is one of"):
        service.set_source_status("s-aaaa-kind", "deleted")


def test_the_training_tab_shows_sources_per_version_and_what_was_left_out():
    from rlhf_live.ui.dashboard_figures import VERSION_COLUMNS, source_rows, version_rows
    from rlhf_live.ui.dashboard_text import status_text

    metrics = {"learner": "ppo", "crowd/reward_sources": 6, "crowd/reward_largest_share": 0.25}
    rows = version_rows(
        [{"version": "v0001", "status": "live", "metrics": metrics}, {"version": "v0000x", "status": "retired"}]
    )
    assert rows[1][-2:] == ["6", "25%"] and rows[0][-2:] == ["–", "–"] and len(rows[0]) == len(VERSION_COLUMNS)
    table = source_rows([{"source": "s" + "a" * 40, "votes": 9, "share": 0.5, "status": "flagged", "log_odds": 6.2}])
    assert table == [["saaaaaaaaaaa", 9, "50%", "flagged", "+6.2", "–", ""]]
    status = {
        "trainer": {"running": True, "state": "idle"},
        "votes_since_last_round": 0,
        "votes_per_round": 8,
        "live_version": "base",
        "sources_flagged": 1,
        "sources_banned": 0,
    }
    assert "1 source flagged for voting against everyone else (until an admin clears it), 0 banned" in status_text(
        status, 0.0
    )


def test_a_public_round_with_too_few_sources_left_after_flagging_is_refused_with_a_sentence(tiny_cfg):
    from rlhf_live.learning.reward.data import RewardDataError
    from rlhf_live.learning.round import _enough_sources

    cfg = replace(tiny_cfg, public=True)
    _enough_sources(cfg, 4, 0)
    _enough_sources(replace(cfg, public=False), 1, 0)  # a laptop trains as before
    with pytest.raises(RewardDataError, match=r"come from 3 sources \(2 flagged or banned left out\); a round needs 4"):
        _enough_sources(cfg, 3, 2)
