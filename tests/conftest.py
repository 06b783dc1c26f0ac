"""Tiny, seeded fixtures: a corpus of synthetic images, a feature store and a small model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightningdot.config import BertSize, ImageConfig, ModelConfig, TextConfig
from lightningdot.features import (
    Backbone,
    FeatureStoreWriter,
    RegionFeatures,
    StoreInfo,
    grid_boxes,
    register_backbone,
)

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
FEATURE_DIM, NUM_CLASSES, GRID = 16, 10, 2


@register_backbone("test-colour")
class ColourBackbone(Backbone):
    """A stand-in backbone: 4 regions whose features start with the mean colour of a quadrant."""

    name, feature_dim, num_classes, image_size = "test-colour", FEATURE_DIM, NUM_CLASSES, 8

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)

    def forward(self, pixels):
        q = torch.nn.functional.avg_pool2d(pixels, 4).flatten(2).transpose(1, 2)  # (B, 4, 3)
        feats = torch.cat([q, torch.zeros(*q.shape[:2], FEATURE_DIM - 3)], -1)
        soft = torch.full((4, NUM_CLASSES), 1.0 / NUM_CLASSES)
        return [RegionFeatures(feats[i], grid_boxes(2, 2), soft) for i in range(len(q))]


def tiny_model_config(**overrides) -> ModelConfig:
    size = BertSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    return ModelConfig(
        text=TextConfig(pretrained=None, size=size, trainable_layers=2, max_length=16),
        image=ImageConfig(feature_dim=FEATURE_DIM, num_classes=NUM_CLASSES, num_layers=1),
        embed_dim=16,
        backbone="test-colour",
        **overrides,
    )


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """8 train + 4 val images of plain colours, 2 captions each, in Karpathy format."""
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i, colour in enumerate(COLOURS + COLOURS[:4]):
        name = f"img{i:02d}.png"
        Image.new("RGB", (32, 24), colour).save(images / name)
        split = "train" if i < 8 else "val"
        caps = [f"a {colour} picture", f"something {colour}"]
        entries.append(
            {
                "filename": name,
                "imgid": i,
                "split": split,
                "sentids": [2 * i, 2 * i + 1],
                "sentences": [
                    {"raw": c, "tokens": c.split(), "imgid": i, "sentid": 2 * i + j}
                    for j, c in enumerate(caps)
                ],
            }
        )
    (tmp_path / "captions.json").write_text(json.dumps({"dataset": "tiny", "images": entries}))
    return tmp_path


def write_store(root: Path, keys: list[str], seed: int = 0) -> None:
    """Random regions for each key: a GRID x GRID grid of FEATURE_DIM features."""
    g = torch.Generator().manual_seed(seed)
    info = StoreInfo("test", FEATURE_DIM, NUM_CLASSES)
    with FeatureStoreWriter(root, info, shard_size=5) as w:
        for k in keys:
            n = GRID * GRID
            w.add(
                k,
                RegionFeatures(
                    torch.randn(n, FEATURE_DIM, generator=g),
                    grid_boxes(GRID, GRID),
                    torch.softmax(torch.randn(n, NUM_CLASSES, generator=g), -1),
                ),
            )


@pytest.fixture
def store_dir(corpus_dir: Path) -> Path:
    keys = sorted(p.name for p in (corpus_dir / "images").iterdir())
    write_store(corpus_dir / "features", keys)
    return corpus_dir / "features"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def index_dir(corpus_dir: Path, tmp_path: Path) -> Path:
    """An index of the 8 train images and their captions, made by a tiny model, with a
    re-ranker for that model saved beside it as `rr/`."""
    from lightningdot.checkpoint import save_model
    from lightningdot.config import RerankerConfig
    from lightningdot.data import read_karpathy
    from lightningdot.encoders import BiEncoder
    from lightningdot.rerank import Reranker, save_reranker
    from lightningdot.retrieval import build_index

    model = BiEncoder(tiny_model_config())
    model.init_pretrained()
    save_model(tmp_path / "model", model.eval())
    torch.manual_seed(5)
    save_reranker(tmp_path / "rr", Reranker(model, RerankerConfig()), str(tmp_path / "model"))
    corpus = read_karpathy(corpus_dir / "captions.json", "train")
    build_index(model, str(tmp_path / "model"), corpus, corpus_dir / "images", tmp_path / "ix")
    return tmp_path / "ix"
