"""The trainer's own models, loaded once and kept between rounds: the policy copy it trains and the reward model.

Knows where the base comes from and how a copy is prepared for training (NF4 values as plain linears on CPU, the live
adapter attached trainable); knows nothing of SQL, rounds or serving (serving loads its own copy).
"""

from __future__ import annotations

from rlhf_live.config import Config
from rlhf_live.learning.reward import create_reward_model
from rlhf_live.learning.reward.base import Scorer
from rlhf_live.learning.reward.probe import ProbeRewardModel
from rlhf_live.model.base import load_base, prepare_cpu_4bit, resolve
from rlhf_live.model.lora import attach_adapter


class TrainingCopies:
    """The trainer's own models, loaded once and kept between rounds: loading and dequantizing cost seconds a round.

    The probe reward model is kept whole (it refits from zero each round, and its feature cache saves recomputing
    old answers); a LoRA reward model is made afresh. The PPO copy keeps its base and gets the live adapter
    attached anew each round.
    """

    def __init__(self, cfg: Config, exclude_prompts: frozenset[str] = frozenset()):
        self.cfg = cfg
        self.exclude_prompts = exclude_prompts
        """User messages PPO must never train on (a simulation's held-out prompts)."""
        self.reward_model: Scorer | None = None
        """The last round's fitted reward model (for evaluation)."""
        self._source: str | None = None
        self._policy = None

    def source(self) -> str:
        """The base model's folder or hub id, resolved once."""
        if self._source is None:
            self._source = resolve(self.cfg.model, self.cfg.cache_dir)
        return self._source

    def new_reward_model(self) -> Scorer:
        """The reward model to fit this round."""
        if isinstance(self.reward_model, ProbeRewardModel) and self.cfg.reward_kind == "probe":
            return self.reward_model
        self.reward_model = create_reward_model(self.cfg, *load_base(self.cfg, self.source()))
        return self.reward_model

    @property
    def policy_model(self):
        """The training copy as last attached (its base weights are serving's: the same NF4 values)."""
        return self._policy

    def policy_copy(self, adapter_path: str | None):
        """The PPO copy: the cached base with `adapter_path` (or a fresh LoRA) attached, trainable."""
        if self._policy is None:
            base, self.tokenizer = load_base(self.cfg, self.source())
            prepare_cpu_4bit(base, self.cfg)
        else:
            base = self._policy.unload()  # the LoRA layers out, the base's own linears back
        self._policy = attach_adapter(base, self.cfg, adapter_path, trainable=True)
        return self._policy
