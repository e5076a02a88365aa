"""The reward model's losses, per example: Bradley-Terry for A/B choices, a tie's target of one half, thumbs as
logistic labels, and ODIN's length decorrelation. Pure tensor functions (tested against plain formulas).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood per pair, -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def tie_loss(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry with target 1/2 per tie: minimal (log 2) exactly when r_a == r_b."""
    d = r_a - r_b
    return -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))


def pointwise_loss(r: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Logistic loss per thumb: -log sigmoid(r) for a thumbs-up, -log sigmoid(-r) for a thumbs-down."""
    return -F.logsigmoid(torch.where(up, r, -r))


def _corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two (N,) vectors; 0 when either is constant."""
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-8)


def length_loss(
    r_quality: torch.Tensor,
    r_length: torch.Tensor,
    lengths: torch.Tensor,
    w_quality: torch.Tensor,
    w_length: torch.Tensor,
) -> torch.Tensor:
    """ODIN's disentangling loss (Chen et al. 2024, arXiv 2402.07319, eq. 4-5) over a batch of answers.

    |corr(r_quality, length)| - corr(r_length, length) pushes length into the length head and out of the quality
    head; |cos(w_quality, w_length)| keeps the two heads orthogonal (ODIN uses the raw inner product; the cosine
    does not reward shrinking the weights). In [-1, 3]: -1 when fully disentangled.
    """
    lengths = lengths.float()  # (N,)
    cos = F.cosine_similarity(w_quality.flatten(), w_length.flatten(), dim=0)
    return _corr(r_quality, lengths).abs() - _corr(r_length, lengths) + cos.abs()
