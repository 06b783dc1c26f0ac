"""Tiny, seeded fixtures: a corpus of synthetic images, a feature store and a small model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import COLOURS, tiny_model_config, write_store

# Tests run the encoders on eager PyTorch, the reference, unless told otherwise: the faster
# runtimes are tested against it in tests/test_runtime.py. Subprocesses inherit this.
os.environ.setdefault("LDOT_RUNTIME", "eager")


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
def model_dir(tmp_path: Path) -> Path:
    """A tiny seeded model saved as a model folder."""
    from lightningdot.model.checkpoint import save_model
    from lightningdot.model.encoders import BiEncoder

    m = BiEncoder(tiny_model_config())
    m.init_pretrained()
    save_model(tmp_path / "model", m.eval())
    return tmp_path / "model"


@pytest.fixture
def index_dir(corpus_dir: Path, tmp_path: Path) -> Path:
    """An index of the 8 train images and their captions, made by a tiny model, with a
    re-ranker for that model saved beside it as `rr/`."""
    from lightningdot.config import RerankerConfig
    from lightningdot.data import read_karpathy
    from lightningdot.index.build import build_index
    from lightningdot.model.checkpoint import save_model, save_reranker
    from lightningdot.model.encoders import BiEncoder
    from lightningdot.model.reranker import Reranker

    model = BiEncoder(tiny_model_config())
    model.init_pretrained()
    save_model(tmp_path / "model", model.eval())
    torch.manual_seed(5)
    save_reranker(tmp_path / "rr", Reranker(model, RerankerConfig()), str(tmp_path / "model"))
    corpus = read_karpathy(corpus_dir / "captions.json", "train")
    build_index(model, str(tmp_path / "model"), corpus, corpus_dir / "images", tmp_path / "ix")
    return tmp_path / "ix"
