"""Precomputed detector regions (bottom-up-top-down style) read from `.npz` files.

Each file holds one image: `features` (N, 2048) and either `norm_bb` (N, 4 or 7, already
normalised) or `boxes` (N, 4, in pixels, with `image_w` and `image_h`); `soft_labels` (N, C),
the detector's class distribution per region, is optional.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightningdot.errors import DataError
from lightningdot.features.regions import RegionFeatures, boxes_from_corners


def read_detector_npz(path: str | Path) -> RegionFeatures:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read detector features {path}: {e}") from e
    if "features" not in data:
        raise DataError(f"{path}: no 'features' array (has {sorted(data)})")
    feats = torch.from_numpy(data["features"].astype(np.float32))
    if "norm_bb" in data:
        bb = torch.from_numpy(data["norm_bb"].astype(np.float32))
    elif "boxes" in data:
        if "image_w" not in data or "image_h" not in data:
            raise DataError(f"{path}: pixel 'boxes' need 'image_w' and 'image_h' to normalise")
        scale = np.array([data["image_w"], data["image_h"]] * 2, dtype=np.float32).reshape(1, 4)
        bb = torch.from_numpy(data["boxes"].astype(np.float32) / scale)
    else:
        raise DataError(f"{path}: no box positions ('norm_bb' or 'boxes')")
    if bb.ndim != 2 or bb.shape[1] not in (4, 7):
        raise DataError(f"{path}: boxes must be (N, 4) or (N, 7), got {tuple(bb.shape)}")
    if bb.shape[1] == 4:
        bb = boxes_from_corners(bb.clamp(0.0, 1.0))
    soft = data.get("soft_labels")
    return RegionFeatures(
        feats, bb, None if soft is None else torch.from_numpy(soft.astype(np.float32))
    )
