"""`ldot bank`: a model's query bank, drawn from a split it was trained on and encoded by it
(see `lightningdot.model.prior` for what the bank is for)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightningdot.config import BankConfig
from lightningdot.data import read_karpathy
from lightningdot.encode import RegionSource, encode_collection, encode_texts
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import attach_bank, load_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.prior import QueryBank


def make_bank(
    model: BiEncoder, annotations: str | Path, features: str | Path, cfg: BankConfig | None = None
) -> QueryBank:
    """A bank of `cfg.size` captions and `cfg.size` images drawn (seeded) from a split the model
    was trained on, encoded by the model: no evaluation data goes into it."""
    cfg = cfg or BankConfig()
    corpus = read_karpathy(annotations, cfg.split)
    g = torch.Generator().manual_seed(cfg.seed)
    captions = [
        corpus.captions[i] for i in torch.randperm(len(corpus.captions), generator=g)[: cfg.size]
    ]
    keys = [corpus.keys()[i] for i in torch.randperm(len(corpus.images), generator=g)[: cfg.size]]
    was = model.training
    model.eval()
    text = encode_texts(model, captions)
    image = encode_collection(model, RegionSource.of(model, FeatureStore(features)), keys)
    model.train(was)
    source = {"annotations": Path(annotations).name, "split": cfg.split, "size": cfg.size}
    main = model.cfg.vector_dim  # the main view alone (`lightningdot.model.prior`)
    return QueryBank(text[:, :main], image[:, :main], cfg.beta, source | {"seed": cfg.seed})


def give_bank(
    folder: str | os.PathLike[str], annotations: str | Path, features: str | Path, cfg: BankConfig
) -> QueryBank:
    """Make the bank of the model saved in `folder` (`make_bank`) and store it there: indexes
    the model builds then rank by dot product plus each item's prior.

    Raises:
        DataError: `folder` is no model folder, or the model takes its image side (and bank)
            from another model.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DataError(f"not a model folder (no config.json): {folder}")
    net = load_model(folder)
    if net.cfg.image_from:
        raise DataError(
            f"{folder} uses the image side and query bank of {net.cfg.image_from!r}; "
            "give that model a bank instead"
        )
    bank = make_bank(net, annotations, features, cfg)
    attach_bank(folder, bank)
    return bank
