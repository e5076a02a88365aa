"""How one answer is sampled (GenerationSettings, stored beside every answer) and the refusal serving raises.

Knows sampling parameters and their defaults from Config; knows nothing of models or engines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rlhf_live.config import Config
from rlhf_live.model.sampling import generate_kwargs


class InvalidRequest(ValueError):
    """A request the policy refuses, with a sentence a person understands."""


class TooManyRequests(InvalidRequest):
    """A request past a per-minute limit (HTTP clients get 429)."""


@dataclass
class GenerationSettings:
    """How one answer is sampled; stored beside every answer."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    system_prompt: str = ""
    seed: int | None = None
    repetition_penalty: float = 1.0
    repetition_last_n: int = 64
    stop_loops: bool = False

    @classmethod
    def from_config(cls, cfg: Config, **overrides) -> GenerationSettings:
        """Defaults from Config, then per-request overrides (None means keep)."""
        base = cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.system_prompt)
        base.repetition_penalty, base.repetition_last_n = cfg.repetition_penalty, cfg.repetition_last_n
        base.stop_loops = cfg.stop_loops
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base

    def as_dict(self) -> dict:
        """Plain dict for storage."""
        return asdict(self)


def sampling_kwargs(settings: GenerationSettings, start: list[int] | None = None) -> dict:
    """generate() arguments for these settings (`start`: each row's left padding)."""
    s = settings
    return generate_kwargs(s.temperature, s.top_p, s.repetition_penalty, s.repetition_last_n, start)
