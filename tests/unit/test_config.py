"""Config: every field documented; env overrides defaults; flags override env."""

import argparse
from dataclasses import fields

import pytest

from rlhf_live.config import Config
from rlhf_live.flags import add_arguments, field_docs, from_args, from_env


def test_every_field_is_documented():
    docs = field_docs()
    missing = [f.name for f in fields(Config) if not docs.get(f.name)]
    assert missing == []


def test_env_overrides_default_and_flag_overrides_env():
    env = {"RLHF_LIVE_MAX_NEW_TOKENS": "99", "RLHF_LIVE_LOAD_IN_4BIT": "0", "RLHF_LIVE_TEMPERATURE": "0.3"}
    assert from_env(env).max_new_tokens == 99
    assert from_env(env).load_in_4bit is False
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-new-tokens", "7", "--load-in-4bit"])
    cfg = from_args(args, env)
    assert (cfg.max_new_tokens, cfg.load_in_4bit, cfg.temperature) == (7, True, 0.3)


def test_bad_env_value_is_a_clear_error():
    with pytest.raises(SystemExit, match="RLHF_LIVE_MAX_NEW_TOKENS"):
        from_env({"RLHF_LIVE_MAX_NEW_TOKENS": "lots"})


def test_skipped_field_is_left_to_the_command():
    parser = argparse.ArgumentParser()
    add_arguments(parser, skip=("train",))
    parser.add_argument("--train")
    cfg = from_args(parser.parse_args(["--train", "pairs.jsonl"]), {})
    assert cfg.train is True


def test_a_value_outside_a_fields_choices_is_refused_where_the_config_is_built():
    from rlhf_live.config import CHOICES
    from rlhf_live.learning.learners import LEARNERS

    with pytest.raises(ValueError, match="learner must be one of ppo, dpo, kto, rm-dpo, not 'sft'"):
        Config(learner="sft")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit, match="engine must be one of auto, torch, llamacpp, not 'vllm'"):
        from_args(parser.parse_args(["--engine", "vllm"]), {})
    with pytest.raises(SystemExit, match="reward_kind must be one of probe, lora"):
        from_env({"RLHF_LIVE_REWARD_KIND": "nope"})
    assert set(CHOICES["learner"]) == set(LEARNERS)  # every name Config accepts has a learner, and the reverse
