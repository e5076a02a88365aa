"""Config: every field documented; env overrides defaults; flags override env."""

import argparse
from dataclasses import fields

import pytest

from rlhf_live.config import Config, add_arguments, field_docs, from_args, from_env


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
