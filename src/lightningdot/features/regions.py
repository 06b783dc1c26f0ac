"""Regions of an image (features, boxes, class distributions) and batches of them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lightningdot.errors import DataError

BOX_DIM = 7  # x1, y1, x2, y2, w, h, w*h, all normalised to the image


@dataclass
class RegionFeatures:
    """The regions of one image.

    Attributes:
        features: (N, D) region feature vectors.
        boxes: (N, 7) normalised box positions (x1, y1, x2, y2, w, h, w*h).
        soft_labels: (N, C) class distribution of each region, or None when unknown.
    """

    features: torch.Tensor
    boxes: torch.Tensor
    soft_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.ndim != 2 or n == 0:
            raise DataError(f"region features must be (N>0, D), got {tuple(self.features.shape)}")
        if tuple(self.boxes.shape) != (n, BOX_DIM):
            raise DataError(f"boxes must be ({n}, {BOX_DIM}), got {tuple(self.boxes.shape)}")
        if self.soft_labels is not None and self.soft_labels.shape[0] != n:
            raise DataError(f"soft labels must have {n} rows, got {tuple(self.soft_labels.shape)}")


def boxes_from_corners(corners: torch.Tensor) -> torch.Tensor:
    """(N, 4) normalised x1, y1, x2, y2 -> (N, 7) with width, height and area appended."""
    x1, y1, x2, y2 = corners.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1)


def grid_boxes(rows: int, cols: int) -> torch.Tensor:
    """Boxes of the cells of a rows x cols grid over the image, in row-major order: (rows*cols, 7)."""
    ys = torch.arange(rows, dtype=torch.float32)
    xs = torch.arange(cols, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    corners = torch.stack([xx / cols, yy / rows, (xx + 1) / cols, (yy + 1) / rows], dim=-1).reshape(
        -1, 4
    )
    return boxes_from_corners(corners)


@dataclass
class RegionBatch:
    """Regions of several images, padded to the longest.

    Attributes:
        features: (B, R, D) region features, zero where padded.
        boxes: (B, R, 7) box positions, zero where padded.
        mask: (B, R) True for real regions.
        soft_labels: (B, R, C) class distributions, or None when any image lacks them.
    """

    features: torch.Tensor
    boxes: torch.Tensor
    mask: torch.Tensor
    soft_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, idx: torch.Tensor | slice) -> RegionBatch:
        """The images at `idx` (indices or a slice), in that order."""
        soft = None if self.soft_labels is None else self.soft_labels[idx]
        return RegionBatch(self.features[idx], self.boxes[idx], self.mask[idx], soft)

    def chunks(self, size: int) -> Iterator[RegionBatch]:
        for s in range(0, len(self), size):
            yield self.select(slice(s, s + size))

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> RegionBatch:
        return RegionBatch(
            self.features.to(device, dtype),
            self.boxes.to(device, dtype),
            self.mask.to(device),
            None if self.soft_labels is None else self.soft_labels.to(device, dtype),
        )


def collate_regions(items: list[RegionFeatures]) -> RegionBatch:
    """Pad a list of per-image regions into one batch."""
    if not items:
        raise ValueError("cannot collate an empty list of regions")
    r = max(it.features.shape[0] for it in items)
    d = items[0].features.shape[1]
    feats = torch.zeros(len(items), r, d, dtype=items[0].features.dtype)
    boxes = torch.zeros(len(items), r, 7, dtype=torch.float32)
    mask = torch.zeros(len(items), r, dtype=torch.bool)
    with_soft = all(it.soft_labels is not None for it in items)
    soft = (
        torch.zeros(len(items), r, items[0].soft_labels.shape[1], dtype=items[0].soft_labels.dtype)
        if with_soft
        else None
    )
    for i, it in enumerate(items):
        n = it.features.shape[0]
        if it.features.shape[1] != d:
            raise DataError(
                f"region feature sizes differ in one batch: {d} vs {it.features.shape[1]}"
            )
        feats[i, :n] = it.features
        boxes[i, :n] = it.boxes
        mask[i, :n] = True
        if soft is not None:
            soft[i, :n] = it.soft_labels
    return RegionBatch(feats, boxes, mask, soft)


def concat_batches(batches: list[RegionBatch]) -> RegionBatch:
    """One batch of the images of several, padded to the most regions of any."""
    if not batches:
        raise ValueError("cannot concatenate no batches")
    r = max(b.features.shape[1] for b in batches)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, r - x.shape[1])) if x.ndim == 3 else x

    def pad_mask(m: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(m, (0, r - m.shape[1]))

    soft = None
    if all(b.soft_labels is not None for b in batches):
        soft = torch.cat([pad(b.soft_labels) for b in batches])
    return RegionBatch(
        torch.cat([pad(b.features) for b in batches]),
        torch.cat([pad(b.boxes) for b in batches]),
        torch.cat([pad_mask(b.mask) for b in batches]),
        soft,
    )
