"""Simulated raters vote through the same Service as people; their votes land in the store exactly."""

import pytest

from rlhf_live.simulate import concise, load_rater, polite, simulate
from rlhf_live.store import Store


def test_built_in_rules():
    assert concise([], "short", "a much longer answer") == "A"
    assert concise([], "one two", "three four") == "tie"
    assert polite([], "Sure, happy to help. Thank you!", "No.") == "A"
    assert load_rater("tests.test_simulate:always_b")([], "x", "y") == "B"
    with pytest.raises(ValueError, match="Unknown rater"):
        load_rater("nobody")


def always_b(prompt, a, b):
    return "B"


def test_simulated_votes_are_recorded_and_a_round_runs(tiny_cfg):
    tiny_cfg.ppo_batch_size, tiny_cfg.ppo_updates_per_round, tiny_cfg.ppo_max_new_tokens = 2, 1, 6
    tiny_cfg.ppo_epochs, tiny_cfg.ppo_minibatches, tiny_cfg.reward_epochs = 1, 1, 1
    result = simulate(tiny_cfg, "tests.test_simulate:always_b", 5, eval_prompts=2)
    assert result["choices"] == {"A": 0, "B": 5, "tie": 0} and result["version"] == "v0001"
    store = Store.from_config(tiny_cfg)
    assert store.stats()["choices"]["B"] == 5 and len(store.preference_pairs()) == 5
    assert store.live_adapter()["version"] == "v0001"
    assert 0.0 <= result["win_rate_new_vs_base"] <= 1.0
