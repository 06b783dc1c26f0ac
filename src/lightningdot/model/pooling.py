"""Pooling shared by the encoders: a masked mean over tokens or regions, and the join of views."""

from __future__ import annotations

import math

import torch


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) token or region states -> (B, H) mean over the positions the mask keeps (a
    weighted mean, for a float mask of weights)."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp_min(1e-6)


def join_views(views: list[torch.Tensor]) -> torch.Tensor:
    """Unit vectors of each view -> one unit vector; a dot product of two joined vectors is the
    mean of the views' dot products."""
    if len(views) == 1:
        return views[0]
    return torch.cat(views, dim=-1) / math.sqrt(len(views))
