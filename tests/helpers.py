"""What the tests share: a stand-in backbone, a tiny model config, random feature stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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

    def classifier(self):
        """A seeded linear head, the same at every call (a concept view rebuilds it at load)."""
        head = torch.nn.Linear(FEATURE_DIM, NUM_CLASSES)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            head.weight.copy_(torch.randn(NUM_CLASSES, FEATURE_DIM, generator=g))
            head.bias.zero_()
        return head

    def forward(self, pixels, soft_labels=True):
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


def tiny_reranker(seed: int = 0, fusion: float = 1.0):
    """A seeded re-ranker over a seeded tiny bi-encoder, both in eval mode."""
    from lightningdot.config import RerankerConfig
    from lightningdot.model.encoders import BiEncoder
    from lightningdot.model.reranker import Reranker

    torch.manual_seed(seed)
    bi = BiEncoder(tiny_model_config())
    bi.init_pretrained()
    r = Reranker(bi.eval(), RerankerConfig(num_layers=1, fusion=fusion))
    r.init_pretrained()
    return r.eval()


def index_of_saved_model(
    model_dir: Path, corpus, corpus_dir: Path, out: Path, store_dir=None, milvus=None
):
    """An index folder of `corpus` (images under `corpus_dir/images`) by the model saved in
    `model_dir`, reading regions from the store at `store_dir` when given; with `milvus` (a
    `MilvusTarget`), its vectors in Milvus."""
    from lightningdot.features import FeatureStore
    from lightningdot.index.build import build_index
    from lightningdot.model.checkpoint import load_model

    store = FeatureStore(store_dir) if store_dir is not None else None
    images = corpus_dir / "images"
    model = load_model(model_dir)
    return build_index(model, str(model_dir), corpus, images, out, features=store, milvus=milvus)


def as_older_layout(folder: Path, out: Path, uploads: dict[str, bytes] | None = None) -> Path:
    """A copy of the index folder `folder` in the layout before versions (`images/` and
    `captions/` beside an unversioned retriever.json, items without roots, uploads recorded by
    absolute path), as earlier releases wrote it; `uploads`: files to add as such uploads."""
    import json
    import shutil

    from lightningdot.index.record import Manifest

    manifest = Manifest.read(folder)
    out.mkdir()
    for part, where in manifest.parts.items():
        if part == "states":  # kept only since the layout of versions
            continue
        shutil.copytree(folder / where, out / part)
        items = json.loads((out / part / "items.json").read_text())
        for it in items:
            it.pop("root", None)
        (out / part / "items.json").write_text(json.dumps(items))
    if uploads:
        from lightningdot.index.vector import VectorIndex

        (out / "uploads").mkdir()
        images = VectorIndex.load(out / "images")
        vectors = images.index.reconstruct_n(0, len(images))[: len(uploads)]
        items = []
        for name, data in uploads.items():
            (out / "uploads" / name).write_bytes(data)
            items.append({"id": name, "path": str((out / "uploads" / name).resolve())})
        images.add(vectors, items)
        images.save(out / "images")
    record = {"model": manifest.model, "model_id": manifest.model_id}
    record["images"] = manifest.roots[manifest.primary_root]
    (out / "retriever.json").write_text(json.dumps(record))
    return out


def more_photos(root: Path) -> tuple[Path, Path]:
    """`root/more_photos/`: another folder of three captioned images, `img00.png` among them as
    in the tiny collection; returns it and its Karpathy file."""
    import json

    from PIL import Image

    folder = root / "more_photos"
    folder.mkdir()
    entries = []
    for name, colour in [("a.png", "teal"), ("b.png", "navy"), ("img00.png", "pink")]:
        Image.new("RGB", (20, 20), colour).save(folder / name)
        sentences = [{"raw": f"a {colour} picture"}, {"raw": f"{colour} things"}]
        entries.append({"filename": name, "split": "train", "sentences": sentences})
    (root / "more.json").write_text(json.dumps({"images": entries}))
    return folder, root / "more.json"


def noise_photo(path: Path, seed: int) -> None:
    """A small image of seeded noise at `path`: every seed its own bytes and its own vector."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def concept_view(cfg=None, d: int = 8, seed: int = 0, layers=None, branch: int = 0):
    """A seeded concept view over the test backbone's classes in a `d`-dim sentence space
    (with `layers`, a text branch above the text encoder's layer `branch`)."""
    from lightningdot.config import ConceptConfig
    from lightningdot.features import create_backbone
    from lightningdot.model.concepts import ConceptView

    g = torch.Generator().manual_seed(seed)
    names = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, d, generator=g), dim=-1)
    a = torch.randn(d, d, generator=g)
    cov = a @ a.T / d + 0.1 * torch.eye(d)
    mean = 0.1 * torch.randn(d, generator=g)
    classifier = create_backbone("test-colour").classifier()
    view = ConceptView(cfg or ConceptConfig(), classifier, names, mean, cov, layers, branch)
    return view.eval()
