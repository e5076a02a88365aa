"""The learners a round can run, and what each needs: the one place that says what `Config.learner` may name.

Knows names, stages and which votes each learner reads; knows nothing of tensors, the store or how a round runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Learner:
    """One learner: its name, whether it fits the reward model first, which votes it reads, its stages."""

    name: str
    """What Config.learner and --learner say."""
    reward_model: bool
    """It fits the reward model on every vote first (PPO scores rollouts with it; rm-dpo ranks samples by it)."""
    thumbs: bool
    """It learns from thumbs as well as from A/B choices (KTO's unpaired rows)."""
    training_stages: tuple[str, ...]
    """What the round reports while this learner trains, in order (before publishing, the gate, going live)."""


LEARNERS = {
    learner.name: learner
    for learner in (
        # PPO against the reward model (ppo.py): the gate reads the rollouts PPO sampled anyway.
        Learner("ppo", True, False, ("fitting reward model", "PPO")),
        Learner("dpo", False, False, ("DPO", "evaluating")),
        Learner("kto", False, True, ("KTO", "evaluating")),
        # DPO on the votes plus the policy's own samples ranked by the reward model (direct.py).
        Learner("rm-dpo", True, False, ("fitting reward model", "RM-DPO", "evaluating")),
    )
}
"""Every learner by name (ppo, dpo, kto, rm-dpo)."""


def learner(name: str) -> Learner:
    """The learner `name`, or a ValueError naming the ones there are."""
    if name not in LEARNERS:
        raise ValueError(f"learner must be one of {', '.join(LEARNERS)}, not {name!r}")
    return LEARNERS[name]


def round_stages(name: str) -> tuple[str, ...]:
    """The states a round of learner `name` goes through, in order (what `progress` reports as its first argument)."""
    return (*learner(name).training_stages, "publishing", "gate", "going live")
