"""Pre-training heads: they read fused states and exist only while pre-training."""

from __future__ import annotations

import torch
from torch import nn


def _transform(h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=1e-12))


class PretrainHeads(nn.Module):
    """MLM head for VMLM (decoder tied to the word embeddings), region heads for SMRM."""

    def __init__(self, hidden: int, feature_dim: int, num_classes: int, vocab_size: int) -> None:
        super().__init__()
        self.mlm = _transform(hidden)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.region_features = nn.Sequential(_transform(hidden), nn.Linear(hidden, feature_dim))
        self.region_classes = nn.Sequential(
            _transform(hidden), nn.Linear(hidden, max(num_classes, 1))
        )

    def mlm_logits(self, states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, H) fused token states -> (N, V) vocabulary scores."""
        return self.mlm(states) @ word_embeddings.T + self.mlm_bias
