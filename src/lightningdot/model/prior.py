"""Query-bank prior: a per-item correction for hubs, folded into the dot product.

In an embedding space some gallery items ("hubs") sit close to many queries and crowd the top of
rankings they do not belong in. The inverted softmax over a bank of typical queries (Smith et al.,
ICLR 2017; Bogolin et al., "Cross Modal Retrieval with Querybank Normalisation", CVPR 2022)
discounts each item by how strongly the whole bank is drawn to it:

    score(q, g) = q·g + prior(g),   prior(g) = -(1/β) log mean_b exp(β b·g)

The prior depends on the item alone, so it is computed once, offline, and stored as one more
coordinate of the item's vector (a query has a 1 there): search stays one inner product, in FAISS
as anywhere, and an added item gets its prior when it is added. The bank is the model's own
vectors of its training captions (the prior of images) and of its training images (the prior of
captions); `ldot bank` makes it (`lightningdot.training.bank`) and stores it beside the model's
weights.

The bank lives in the model's main space: with a concept view (`lightningdot.model.concepts`),
whose coordinates follow the main ones, the prior reads an item's main coordinates alone. The
concept score is a z-score, standardised over the images for every query already, and a
prior without it is the same for every text encoder that shares the image side (`--model
multilingual`, whose queries have no concept coordinates, searches indexes `default` built).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class QueryBank:
    text: torch.Tensor  # (N, D) unit vectors of typical text queries: they set images' priors
    image: torch.Tensor  # (M, D) unit vectors of typical image queries: they set captions' priors
    beta: float  # inverse temperature of the inverted softmax
    source: dict[str, Any] = field(default_factory=dict)  # what the bank was made from

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError("beta must be positive")
        if self.text.ndim != 2 or self.image.ndim != 2 or self.text.shape[1] != self.image.shape[1]:
            raise ValueError(
                f"bank vectors must be (N, D) and (M, D), got {tuple(self.text.shape)} and "
                f"{tuple(self.image.shape)}"
            )


def hub_prior(
    gallery: torch.Tensor, bank: torch.Tensor, beta: float, block: int = 4096
) -> torch.Tensor:
    """(G, D + C) gallery vectors and (N, D) bank vectors -> (G,) additive priors, from the
    gallery's first D coordinates (the main view; C: a concept view's, see the module)."""
    gallery, bank = gallery[:, : bank.shape[1]].float(), bank.float()
    parts = [
        -(torch.logsumexp(beta * (bank @ gallery[s : s + block].T), dim=0) - math.log(len(bank)))
        / beta
        for s in range(0, len(gallery), block)
    ]
    return torch.cat(parts) if parts else gallery.new_zeros(0)


def gallery_side(vectors: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """(G, D) vectors -> (G, D + 1): each item's prior as a last coordinate."""
    return torch.cat([vectors.float(), prior.float()[:, None]], dim=1)


def query_side(vectors: torch.Tensor) -> torch.Tensor:
    """(Q, D) vectors -> (Q, D + 1) with a 1 last, so that q'·g' = q·g + prior(g)."""
    return torch.cat([vectors.float(), vectors.new_ones(len(vectors), 1, dtype=torch.float)], dim=1)
