"""Training rows as types: what every learner and the reward model read from the store, the same fields for all.

Knows the fields of a vote turned into a training example (the conversation as the model saw it, the answers, who
voted, the vote's watermark, its training weight); knows nothing of SQL, tokens or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PairRow:
    """An A/B choice: the conversation before the answers, the chosen and the rejected answer."""

    prompt: list[dict]
    chosen: str
    rejected: str
    conversation_id: str = ""
    comparison_id: str = ""
    seq: int = 0
    """The vote's watermark: a round trains on rows after the last round's."""
    origin: str = "live"
    chosen_source: str = ""
    """The adapter version that wrote the chosen answer."""
    rejected_source: str = ""
    voter_source: str = ""
    """Who voted (a salted source id; '' unknown): what the share cap and the contrarian test group by."""
    weight: float = 1.0
    """Its share of the training loss (crowd.capped_weights on --public; 0 for a flagged or banned source)."""


@dataclass(frozen=True)
class TieRow:
    """A tie: two answers to one conversation, equally good."""

    prompt: list[dict]
    a: str
    b: str
    conversation_id: str = ""
    comparison_id: str = ""
    seq: int = 0
    origin: str = "live"
    voter_source: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class ThumbRow:
    """A thumb on one answer (True: up); "both bad" comes as two thumbs-down."""

    prompt: list[dict]
    completion: str
    label: bool
    conversation_id: str = ""
    response_id: str = ""
    seq: int = 0
    voter_source: str = ""
    weight: float = 1.0
