"""Masking for the pre-training objectives: tokens for VMLM, regions for SMRM."""

from __future__ import annotations

import torch

from lightningdot.features import RegionBatch
from lightningdot.training.objectives import IGNORE


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `prob` of the real tokens (at least one per caption); of those 80%
    become [MASK], 10% a random token, 10% stay.

    Args:
        input_ids: (B, T) token ids.
        special: (B, T) True for [CLS], [SEP] and padding, which are never picked.

    Returns:
        (masked input ids, labels): labels hold the original id where picked, IGNORE elsewhere.
    """
    real = ~special
    picked = (torch.rand(input_ids.shape, generator=generator) < prob) & real
    # Captions where chance picked nothing get one token anyway, so every caption teaches.
    none = ~picked.any(1) & real.any(1)
    if none.any():
        scores = torch.rand(input_ids.shape, generator=generator).masked_fill(~real, -1.0)
        forced = torch.zeros_like(picked)
        forced[torch.arange(len(input_ids)), scores.argmax(1)] = True
        picked |= forced & none.unsqueeze(1)
    labels = input_ids.masked_fill(~picked, IGNORE)
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[picked & (roll < 0.8)] = mask_token_id
    random_pos = picked & (roll >= 0.8) & (roll < 0.9)
    masked[random_pos] = torch.randint(
        vocab_size, (int(random_pos.sum()),), generator=generator, dtype=input_ids.dtype
    )
    return masked, labels


def mask_regions(
    region_mask: torch.Tensor, prob: float = 0.15, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick `prob` of each image's real regions for SMRM, at least one per image.

    Args:
        region_mask: (B, R) True for real regions.

    Returns:
        (B, R) True where a region is masked (its feature is zeroed in the input and predicted).
    """
    picked = (torch.rand(region_mask.shape, generator=generator) < prob) & region_mask
    none = ~picked.any(1)
    if none.any():
        scores = torch.rand(region_mask.shape, generator=generator).masked_fill(~region_mask, -1.0)
        forced = torch.zeros_like(picked)
        forced[torch.arange(len(region_mask)), scores.argmax(1)] = True
        picked |= forced & none.unsqueeze(1)
    return picked


def drop_regions(
    regions: RegionBatch, keep: float, generator: torch.Generator | None = None
) -> RegionBatch:
    """Keep a random `keep` fraction of each image's regions (at least one), dropping the rest.

    The batch shrinks to the kept count, so the image encoder's cost shrinks with it; padding
    is dropped before any real region.
    """
    if keep >= 1.0:
        return regions
    n_keep = max(1, round(keep * regions.mask.shape[1]))
    scores = torch.rand(regions.mask.shape, generator=generator)
    scores = scores.masked_fill(~regions.mask.cpu(), -1.0)
    idx = (
        scores.topk(n_keep, dim=1).indices.sort(dim=1).values.to(regions.mask.device)
    )  # (B, n_keep)

    def take(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))

    soft = None if regions.soft_labels is None else take(regions.soft_labels)
    return RegionBatch(take(regions.features), take(regions.boxes), take(regions.mask), soft)
