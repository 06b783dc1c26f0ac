"""`ldot bank`: a model's query bank, drawn from a split it was trained on and encoded by it
(see `lightningdot.model.prior` for what the bank is for)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightningdot.data import read_karpathy
from lightningdot.encode import RegionSource, encode_collection, encode_texts
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import attach_bank, load_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.prior import QueryBank


def make_bank(
    model: BiEncoder,
    annotations: str | Path,
    features: str | Path,
    split: str = "train",
    size: int = 2000,
    beta: float = 10.0,
    seed: int = 0,
) -> QueryBank:
    """A bank of `size` captions and `size` images drawn (seeded) from a split the model was
    trained on, encoded by the model: no evaluation data goes into it."""
    if size < 1:
        raise ValueError("the bank needs at least one query of each kind")
    corpus = read_karpathy(annotations, split)
    g = torch.Generator().manual_seed(seed)
    captions = [
        corpus.captions[i] for i in torch.randperm(len(corpus.captions), generator=g)[:size]
    ]
    keys = [corpus.keys()[i] for i in torch.randperm(len(corpus.images), generator=g)[:size]]
    was = model.training
    model.eval()
    text = encode_texts(model, captions)
    image = encode_collection(model, RegionSource(model.cfg.backbone, FeatureStore(features)), keys)
    model.train(was)
    source = {"annotations": Path(annotations).name, "split": split, "size": size, "seed": seed}
    return QueryBank(text, image, beta, source)


def give_bank(
    folder: str | os.PathLike[str],
    annotations: str | Path,
    features: str | Path,
    split: str = "train",
    size: int = 2000,
    beta: float = 10.0,
    seed: int = 0,
) -> QueryBank:
    """Make the bank of the model saved in `folder` (`make_bank`) and store it there: indexes
    the model builds then rank by dot product plus each item's prior.

    Raises:
        DataError: `folder` is no model folder, the size or beta is out of range, or the model
            takes its image side (and bank) from another model.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DataError(f"not a model folder (no config.json): {folder}")
    if size < 1 or beta <= 0:
        raise DataError("--size must be at least 1 and --beta positive")
    net = load_model(folder)
    if net.cfg.image_from:
        raise DataError(
            f"{folder} uses the image side and query bank of {net.cfg.image_from!r}; "
            "give that model a bank instead"
        )
    bank = make_bank(net, annotations, features, split, size, beta, seed)
    attach_bank(folder, bank)
    return bank
