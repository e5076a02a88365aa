"""Reward models: the Scorer protocol (base.py), the LoRA reward model (lora.py) and the probe (probe.py).

`create_reward_model` is the one place that picks which (Config.reward_kind).
"""

from __future__ import annotations

from rlhf_live.config import Config
from rlhf_live.learning.reward.base import Scorer
from rlhf_live.learning.reward.lora import RewardModel
from rlhf_live.learning.reward.probe import ProbeRewardModel


def create_reward_model(cfg: Config, base=None, tokenizer=None) -> Scorer:
    """The reward model Config.reward_kind names, on `base` (loaded when not given)."""
    kind = {"probe": ProbeRewardModel, "lora": RewardModel}[cfg.reward_kind]  # Config checked the name
    return kind.create(cfg, base, tokenizer)
