"""A simulated run on the tiny model: votes land through the Service, rounds go live, the JSON and the PNG exist."""

import json

import pytest

from rlhf_live import cli
from rlhf_live.eval.simulate import simulate, split_prompts
from rlhf_live.store import Store

ENTRY_KEYS = {
    *("round", "votes", "informative_votes", "version", "status", "win_rate", "win_rate_ci", "ties", "kl"),
    *("answer_words", "answer_tokens", "eos_rate", "distinct2", "answered_rate", "fluent", "reward_accuracy_on_rater"),
    *(
        "reward_heldout_accuracy",
        "ppo_score_first",
        "ppo_score_last",
        "ppo_kl",
        "reward_spread",
        "error",
        "round_seconds",
    ),
    *("train_loss_first", "train_loss_last", "seconds", "seconds_by_stage"),
}


@pytest.fixture
def sim_cfg(tiny_cfg):
    tiny_cfg.ppo_batch_size, tiny_cfg.ppo_updates_per_round, tiny_cfg.ppo_max_new_tokens = 2, 1, 6
    tiny_cfg.ppo_epochs, tiny_cfg.ppo_minibatches = 1, 1
    return tiny_cfg


def test_a_short_run_votes_trains_goes_live_and_reports(sim_cfg, tmp_path):
    # A rater that never ties: the tiny model's answers are often the same length, so "concise" tied both votes of a
    # round in CI now and then, and a round without a preference rightly fails instead of going live.
    rater = "tests.unit.test_raters:always_b"
    result = simulate(sim_cfg, rater, 4, round_every=2, eval_prompts=3, out=tmp_path / "out", thumbs=True)
    store = Store.from_config(sim_cfg)
    stats = store.stats()
    assert sum(stats["choices"].values()) == 4 == result["votes"]
    assert sum(v for k, v in stats["votes"].items() if k in ("up", "down")) > 0  # --thumbs went through the Service
    assert result["eval_prompts"] == 3  # bench/learning.py's "base ties" column divides by it
    assert result["rounds"] == 2 and store.live_adapter()["version"] == "v0002" == result["version"]
    assert {"rater", "votes", "rounds", "win_rate", "win_rate_ci", "kl", "seconds", "history"} <= result.keys()
    assert [e["round"] for e in result["history"]] == [0, 1, 2]
    assert [e["votes"] for e in result["history"]] == [0, 2, 4]
    for entry in result["history"]:
        assert set(entry) == ENTRY_KEYS
    assert [e["status"] for e in result["history"]] == ["base", "live", "live"]
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "out" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Held-out prompts were never voted on.
    held_out, _ = split_prompts(3, sim_cfg.seed)
    asked = {m[-1]["content"] for m in store.prompts(limit=100)}
    assert asked and not asked & {p[-1]["content"] for p in held_out}


def test_cli_with_a_rater_file_prints_json_last(sim_cfg, tmp_path, capsys):
    rater = tmp_path / "rater.py"
    rater.write_text("def first(prompt, a, b):\n    return 'A'\n")
    args = ["simulate", "--model", sim_cfg.model, "--no-load-in-4bit", "--compute-dtype", "float32"]
    args += ["--data-dir", str(tmp_path / "data"), "--ppo-batch-size", "2", "--ppo-max-new-tokens", "6"]
    args += ["--ppo-updates-per-round", "1", "--ppo-epochs", "1", "--lora-r", "4", "--lora-alpha", "8"]
    args += ["--max-context-tokens", "256", "--rater", f"{rater}:first", "--votes", "2", "--round-every", "2"]
    assert cli.main([*args, "--eval-prompts", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["rater"] == f"{rater}:first" and result["choices"] == {"A": 2, "B": 0, "tie": 0}


def test_a_bad_rater_is_a_clear_error(sim_cfg, tmp_path, capsys):
    rater = tmp_path / "rater.py"
    rater.write_text("def odd(prompt, a, b):\n    return 'left'\n")
    args = ["simulate", "--model", sim_cfg.model, "--no-load-in-4bit", "--compute-dtype", "float32"]
    args += ["--data-dir", str(tmp_path / "data"), "--ppo-max-new-tokens", "4", "--max-context-tokens", "256"]
    assert cli.main([*args, "--rater", f"{rater}:odd", "--votes", "1", "--eval-prompts", "2"]) == 2
    assert "returned 'left'; a rater must return 'A', 'B' or 'tie'" in capsys.readouterr().err
    assert cli.main([*args, "--rater", "no-such-rater", "--votes", "1"]) == 2
