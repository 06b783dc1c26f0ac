"""An index folder: a collection's image index, its caption index, and what made them.

    retriever.json  {"model": name or folder, "model_id", "images": the collection's folder,
                     "features"?: its feature store, where re-ranking reads regions}
    images/         `VectorIndex` of the images; items {"id", "path", "captions"}
    captions/       `VectorIndex` of their captions, when there are any; items
                    {"id": "<image id>#<n>", "image", "caption"}
    uploads/        images added through `ldot serve` (`lightningdot.index.uploads`)
    .add.lock       adds from several processes take turns on it

`build_index` writes a folder; `IndexFolder` opens one and grows it without a rebuild.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from lightningdot.config import IndexConfig
from lightningdot.data import Corpus, read_collection
from lightningdot.encode import RegionSource, encode_collection, encode_texts
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore
from lightningdot.index.vector import IndexPrior, VectorIndex, priors_of, recall_against_exact
from lightningdot.io import read_json, write_json
from lightningdot.model.checkpoint import index_identity, load_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.progress import Progress, Silent

# Caption rows to add beside image rows: (vectors (C, D), their items).
CaptionRows = tuple[np.ndarray, list[dict]]


def image_items(corpus: Corpus) -> list[dict]:
    return [{"id": im.key, "path": im.key, "captions": im.captions} for im in corpus.images]


def caption_items(corpus: Corpus) -> list[dict]:
    return [
        {"id": f"{im.key}#{j}", "image": im.key, "caption": c}
        for im in corpus.images
        for j, c in enumerate(im.captions)
    ]


@dataclass
class BuildReport:
    indexes: dict[str, VectorIndex]
    recall_at_10: float | None = None  # of an approximate image index against exact search
    recall_queries: int = 0


def build_index(
    model: BiEncoder,
    model_name: str,
    corpus: Corpus,
    image_dir: Path,
    out: Path,
    cfg: IndexConfig | None = None,
    features: FeatureStore | None = None,
    progress: Progress | None = None,
    recall_sample: int = 1000,
) -> BuildReport:
    """Encode a collection (reusing stored features when given) into `out`, atomically per index.

    With an approximate factory, also measures recall@10 of the image index against exact search
    on up to `recall_sample` queries (the captions when known, else the images themselves).
    A model with a query bank gives both indexes its priors.
    """
    cfg = cfg or IndexConfig()
    progress = progress or Silent()
    progress.start(len(corpus.images), "encoding images")
    identity = index_identity(model)
    image_prior, caption_prior = priors_of(model.bank)
    source = RegionSource(model.cfg.backbone, features, image_dir)
    vectors = encode_collection(model, source, corpus.keys(), progress).numpy()
    items = image_items(corpus)
    report = BuildReport({"images": VectorIndex.build(vectors, items, identity, cfg, image_prior)})
    queries = vectors
    if corpus.captions:
        text = encode_texts(model, corpus.captions).numpy()
        report.indexes["captions"] = VectorIndex.build(
            text, caption_items(corpus), identity, cfg, caption_prior
        )
        queries = text
    if cfg.factory != "Flat":
        exact = VectorIndex.build(vectors, items, identity, prior=image_prior)
        sample = queries[np.random.default_rng(0).permutation(len(queries))[:recall_sample]]
        report.recall_at_10 = recall_against_exact(report.indexes["images"], exact, sample, 10)
        report.recall_queries = len(sample)
    for name, index in report.indexes.items():
        index.save(out / name)
    info = {"model": model_name, "model_id": identity, "images": str(Path(image_dir).resolve())}
    if features is not None:
        info["features"] = str(Path(features.root).resolve())
    write_json(out / "retriever.json", info)
    return report


class IndexFolder:
    """An index folder opened for search and for adds (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        info: dict[str, Any],
        image_index: VectorIndex,
        caption_index: VectorIndex | None,
        caption_prior: IndexPrior | None = None,
    ) -> None:
        self.folder, self.info = folder, info
        self.image_index, self.caption_index = image_index, caption_index
        self.caption_prior = caption_prior  # of a caption index the first captioned add makes
        # Adds in this process take turns on it (re-entrant: a caller may hold it around a
        # check and an add); adds from other processes on the lock file as well.
        self.add_lock = threading.RLock()

    @staticmethod
    def read_info(folder: str | Path) -> dict[str, Any]:
        """`retriever.json`: which model made the folder, and the collection's folders."""
        missing = f"not an index folder (no retriever.json): {folder}"
        return read_json(Path(folder) / "retriever.json", "index folder record", missing)

    @classmethod
    def open(
        cls, folder: str | Path, model: BiEncoder, mmap: bool = True, info: dict | None = None
    ) -> IndexFolder:
        """Load the folder's indexes, refusing them unless `model` (or one sharing its
        indexes) made them; `info`: its `read_info`, when the caller has read it already."""
        folder = Path(folder)
        info = info if info is not None else cls.read_info(folder)
        identity = index_identity(model)
        image_index = VectorIndex.load(folder / "images", identity, mmap)
        caption_index = None
        if (folder / "captions").is_dir():
            caption_index = VectorIndex.load(folder / "captions", identity, mmap)
        return cls(folder, info, image_index, caption_index, priors_of(model.bank)[1])

    @property
    def images_root(self) -> Path | None:
        """The folder the collection's image paths are relative to."""
        return Path(self.info["images"]) if self.info.get("images") else None

    @property
    def features(self) -> FeatureStore | None:
        """The feature store the folder was built from, while it is still there."""
        path = self.info.get("features")
        return FeatureStore(path) if path and Path(path).is_dir() else None

    def append(
        self, vectors: np.ndarray, items: list[dict], captions: CaptionRows | None = None
    ) -> None:
        """Add image rows (and caption rows), saved to the folder before they go live.

        The live indexes are copied, grown, saved and then swapped in, so a search running
        meanwhile sees the old index or the new one, never a half-added state, and a failed save
        changes nothing in memory. Concurrent adds wait for each other, in other processes too
        (`ldot index --add` beside a running server): they take turns on a lock file in the
        folder, and an add starts from what is on disk, so when another process saved since,
        its rows are loaded first and kept. The copy makes an add cost O(index size): cheap at
        10K-100K images, a rebuild's worth at 1M.
        """
        with self.add_lock, FileLock(self.folder / ".add.lock"):
            self._catch_up()
            taken = [it["id"] for it in items if self.image_index.row(it["id"]) is not None]
            if taken or len({it["id"] for it in items}) != len(items):
                raise DataError(f"image id(s) already in the index or repeated: {taken[:3]}")
            grown = self.image_index.copy()
            grown.add(vectors, items)
            grown_captions = self.caption_index
            if captions is not None:
                grown_captions = self._grown_captions(*captions, grown)
                # Each folder is replaced atomically, but not the two together: saving captions
                # first means a crash in between never leaves an indexed image uncaptioned.
                grown_captions.save(self.folder / "captions")
            grown.save(self.folder / "images")
            self.image_index, self.caption_index = grown, grown_captions

    def _grown_captions(self, text: np.ndarray, items: list[dict], image_index: VectorIndex):
        """The caption index with these rows added (made, the first time, like `image_index`)."""
        if self.caption_index is None:
            made_like = image_index.model_id, image_index.cfg
            return VectorIndex.build(text, items, *made_like, self.caption_prior)
        grown = self.caption_index.copy()
        grown.add(text, items)
        return grown

    def _catch_up(self) -> None:
        """Load the folder's indexes again if another process saved them since we did."""
        folder_images, folder_captions = self.folder / "images", self.folder / "captions"
        on_disk = VectorIndex.revision_in(folder_images), VectorIndex.revision_in(folder_captions)
        ours = (
            self.image_index.revision,
            None if self.caption_index is None else self.caption_index.revision,
        )
        if on_disk == ours:
            return
        identity = self.image_index.model_id
        images = VectorIndex.load(folder_images, identity)
        captions = VectorIndex.load(folder_captions, identity) if on_disk[1] else self.caption_index
        self.image_index, self.caption_index = images, captions  # both or, if a load fails, neither


def add_collection(
    index: IndexFolder,
    model: BiEncoder,
    corpus: Corpus,
    image_dir: Path,
    features: FeatureStore | None = None,
    progress: Progress | None = None,
) -> int:
    """Append the corpus's images not yet indexed (and their captions), without a rebuild;
    returns how many were added."""
    fresh = Corpus([im for im in corpus.images if index.image_index.row(im.key) is None])
    if not fresh.images:
        return 0
    progress = progress or Silent()
    progress.start(len(fresh.images), "encoding images")
    source = RegionSource(model.cfg.backbone, features, image_dir)
    vectors = encode_collection(model, source, fresh.keys(), progress).numpy()
    captions = None
    if fresh.captions:
        captions = (encode_texts(model, fresh.captions).numpy(), caption_items(fresh))
    items = image_items(fresh)
    if index.images_root is None or Path(image_dir).resolve() != index.images_root.resolve():
        # Paths are relative to the collection's folder; images from another one keep theirs.
        for it in items:
            it["path"] = str((Path(image_dir) / it["path"]).resolve())
    index.append(vectors, items, captions)
    return len(fresh.images)


def index_images(
    out: Path,
    image_dir: Path,
    annotations: Path | None = None,
    split: str | None = None,
    model: str | None = None,
    factory: str = "Flat",
    features: Path | None = None,
    progress: Progress | None = None,
) -> BuildReport:
    """`ldot index`: the images an annotation file names (with their captions), or every image
    under `image_dir`, into a new index folder `out`, by `model` (default: "default")."""
    corpus = read_collection(image_dir, annotations, split)
    net = load_model(model or "default")
    store = FeatureStore(features) if features is not None else None
    cfg = IndexConfig(factory=factory)
    return build_index(net, model or "default", corpus, image_dir, out, cfg, store, progress)


def add_images(
    out: Path,
    image_dir: Path,
    annotations: Path | None = None,
    split: str | None = None,
    model: str | None = None,
    features: Path | None = None,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """`ldot index --add`: the collection's images not yet in the index folder `out` (by
    default with the model that built it); returns (images added, images now indexed)."""
    corpus = read_collection(image_dir, annotations, split)
    net = load_model(model or IndexFolder.read_info(out)["model"])
    index = IndexFolder.open(out, net, mmap=False)
    store = FeatureStore(features) if features is not None else None
    added = add_collection(index, net, corpus, image_dir, store, progress)
    return added, len(index.image_index)
