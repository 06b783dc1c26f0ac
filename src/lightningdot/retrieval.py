"""`Retriever`: the one object the CLI and the server call to answer queries.

    text query  -> TextEncoder  -> image index -> top-K images
    image query -> backbone + ImageEncoder -> caption index -> top-K captions
                                           -> image index   -> top-K similar images

An index folder written by `build_index` holds `images/` (and `captions/` when the collection
has captions), each a `VectorIndex`, plus `retriever.json` naming the model that made them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from lightningdot.checkpoint import index_identity, load_model
from lightningdot.data import Corpus
from lightningdot.encoders import BiEncoder
from lightningdot.errors import DataError
from lightningdot.evaluate import encode_texts, file_batches, store_batches
from lightningdot.features import (
    FeatureStore,
    RegionBatch,
    collate_regions,
    create_backbone,
    load_image,
)
from lightningdot.index import IndexConfig, VectorIndex, priors_of, recall_against_exact
from lightningdot.io import atomic_path, write_json
from lightningdot.rerank import Reranker, load_reranker


@dataclass
class Result:
    id: str
    score: float
    path: str | None = None
    caption: str | None = None  # the caption itself (image->text), or the image's first caption


@dataclass
class Answer:
    results: list[Result]
    timing_ms: dict[str, float] = field(default_factory=dict)


def _encode_collection(
    model: BiEncoder,
    corpus: Corpus,
    images: Path,
    features: FeatureStore | None,
    on_progress: Callable[[int], None] | None,
) -> torch.Tensor:
    keys = corpus.keys()
    with torch.inference_mode():
        if features is not None:
            missing = [k for k in keys if k not in features]
            if missing:
                raise DataError(
                    f"{len(missing)} image(s) missing from {features.root}, e.g. {missing[0]}"
                )
            out = []
            for b in store_batches(features, keys):
                out.append(model.encode_image(b))
                if on_progress:
                    on_progress(len(b))
            return torch.cat(out)
        backbone = create_backbone(model.cfg.backbone)
        paths = [images / k for k in keys]
        return torch.cat(
            [model.encode_image(b) for b in file_batches(backbone, paths, on_progress=on_progress)]
        )


def _items(corpus: Corpus) -> list[dict]:
    return [{"id": im.key, "path": im.key, "captions": im.captions} for im in corpus.images]


def _caption_items(corpus: Corpus) -> list[dict]:
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
    images: Path,
    out: Path,
    cfg: IndexConfig | None = None,
    features: FeatureStore | None = None,
    on_progress: Callable[[int], None] | None = None,
    recall_sample: int = 1000,
) -> BuildReport:
    """Encode a collection (reusing stored features when given) into `out`, atomically per index.

    With an approximate factory, also measures recall@10 of the image index against exact search
    on up to `recall_sample` queries (the captions when known, else the images themselves).
    A model with a query bank gives both indexes its priors.
    """
    cfg = cfg or IndexConfig()
    identity = index_identity(model)
    image_prior, caption_prior = priors_of(model.bank)
    vectors = _encode_collection(model, corpus, images, features, on_progress).numpy()
    report = BuildReport(
        {"images": VectorIndex.build(vectors, _items(corpus), identity, cfg, image_prior)}
    )
    queries = vectors
    if corpus.captions:
        text = encode_texts(model, corpus.captions).numpy()
        report.indexes["captions"] = VectorIndex.build(
            text, _caption_items(corpus), identity, cfg, caption_prior
        )
        queries = text
    if cfg.factory != "Flat":
        exact = VectorIndex.build(vectors, _items(corpus), identity, prior=image_prior)
        sample = queries[np.random.default_rng(0).permutation(len(queries))[:recall_sample]]
        report.recall_at_10 = recall_against_exact(report.indexes["images"], exact, sample, 10)
        report.recall_queries = len(sample)
    for name, index in report.indexes.items():
        index.save(out / name)
    meta = {"model": model_name, "model_id": identity, "images": str(Path(images).resolve())}
    if features is not None:
        meta["features"] = str(Path(features.root).resolve())  # re-ranking reads regions here
    write_json(out / "retriever.json", meta)
    return report


def add_to_index(
    retriever: Retriever,
    corpus: Corpus,
    images: Path,
    features: FeatureStore | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Append new images (and their captions) to an index folder without a rebuild."""
    known = {it["id"] for it in retriever.images.items}
    fresh = Corpus([im for im in corpus.images if im.key not in known])
    if not fresh.images:
        return 0
    vectors = _encode_collection(retriever.model, fresh, images, features, on_progress).numpy()
    captions = None
    if fresh.captions:
        text = encode_texts(retriever.model, fresh.captions).numpy()
        captions = (text, _caption_items(fresh))
    retriever.append(vectors, _items(fresh), captions)
    return len(fresh.images)


class Retriever:
    """Answers text and image queries against an index folder with the model that built it.

    With a re-ranker, `rerank=K` re-scores the top K with cross-attention; the candidates'
    regions come from the feature store the index was built from, else from their image files.
    """

    def __init__(
        self,
        model: BiEncoder,
        images: VectorIndex,
        captions: VectorIndex | None,
        folder: Path,
        reranker: Reranker | None = None,
        images_root: Path | None = None,
        features: FeatureStore | None = None,
    ) -> None:
        self.model, self.images, self.captions, self.folder = model, images, captions, folder
        self.reranker, self.images_root, self.features = reranker, images_root, features
        self._backbone = None
        self._add_lock = threading.RLock()
        self._backbone_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        model: str | BiEncoder | None = None,
        mmap: bool = True,
        reranker: str | None = None,
    ) -> Retriever:
        """Load an index folder and its model (by default the one recorded in the folder), and
        optionally a re-ranker (a shipped name or a folder) trained for that model."""
        folder = Path(folder)
        meta_path = folder / "retriever.json"
        if not meta_path.is_file():
            raise DataError(f"not an index folder (no retriever.json): {folder}")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"damaged {meta_path}: {e}") from e
        net = model if isinstance(model, BiEncoder) else load_model(model or meta["model"])
        identity = index_identity(net)
        images = VectorIndex.load(folder / "images", identity, mmap)
        captions = None
        if (folder / "captions").is_dir():
            captions = VectorIndex.load(folder / "captions", identity, mmap)
        rr = load_reranker(reranker, bi=net) if reranker else None
        store = None
        if meta.get("features") and Path(meta["features"]).is_dir():
            store = FeatureStore(meta["features"])
        root = Path(meta["images"]) if meta.get("images") else None
        return cls(net, images, captions, folder, rr, root, store)

    @property
    def backbone(self):
        with self._backbone_lock:  # image queries and adds may ask first at the same time
            if self._backbone is None:
                self._backbone = create_backbone(self.model.cfg.backbone)
        return self._backbone

    def append(
        self,
        vectors: np.ndarray,
        items: list[dict],
        captions: tuple[np.ndarray, list[dict]] | None = None,
    ) -> None:
        """Add image rows (and caption rows), saved to the index folder before they go live.

        The live indexes are copied, grown, saved and then swapped in, so a search running
        meanwhile sees the old index or the new one, never a half-added state, and a failed save
        changes nothing in memory. Concurrent adds wait for each other, in other processes too
        (`ldot index --add` beside a running server): they take turns on a lock file in the
        folder, and an add starts from what is on disk, so when another process saved since,
        its rows are loaded first and kept. The copy makes an add cost O(index size): cheap at
        10K-100K images, a rebuild's worth at 1M.
        """
        with self._add_lock, FileLock(self.folder / ".add.lock"):
            self._catch_up()
            taken = [it["id"] for it in items if self.images.row(it["id"]) is not None]
            if taken or len({it["id"] for it in items}) != len(items):
                raise DataError(f"image id(s) already in the index or repeated: {taken[:3]}")
            images = self.images.copy()
            images.add(vectors, items)
            grown_captions = self.captions
            if captions is not None:
                text, caption_items = captions
                if self.captions is None:
                    grown_captions = VectorIndex.build(
                        text,
                        caption_items,
                        images.model_id,
                        images.cfg,
                        priors_of(self.model.bank)[1],
                    )
                else:
                    grown_captions = self.captions.copy()
                    grown_captions.add(text, caption_items)
                # Each folder is replaced atomically, but not the two together: saving captions
                # first means a crash in between never leaves an indexed image uncaptioned.
                grown_captions.save(self.folder / "captions")
            images.save(self.folder / "images")
            self.images, self.captions = images, grown_captions

    def _catch_up(self) -> None:
        """Load the folder's indexes again if another process saved them since we did."""
        folder_images, folder_captions = self.folder / "images", self.folder / "captions"
        on_disk = VectorIndex.revision_in(folder_images), VectorIndex.revision_in(folder_captions)
        ours = self.images.revision, None if self.captions is None else self.captions.revision
        if on_disk == ours:
            return
        identity = self.images.model_id
        images = VectorIndex.load(folder_images, identity)
        captions = VectorIndex.load(folder_captions, identity) if on_disk[1] else self.captions
        self.images, self.captions = images, captions  # both or, if a load fails, neither

    def add_images(self, images: list[Image.Image], items: list[dict]) -> None:
        """Encode decoded images and append them with their items (`id`, `path`, ...)."""
        if len(images) != len(items):
            raise ValueError(f"{len(images)} images for {len(items)} items")
        self.append(self.encode_images(images).numpy(), items)

    def _results(self, index: VectorIndex, scores: np.ndarray, ids: np.ndarray) -> list[Result]:
        out = []
        for s, i in zip(scores.tolist(), ids.tolist(), strict=True):
            if i < 0:
                continue
            it = index.items[i]
            caption = it.get("caption") or (it.get("captions") or [None])[0]
            out.append(Result(it["id"], float(s), it.get("path") or it.get("image"), caption))
        return out

    def _need_reranker(self, rerank: int) -> Reranker | None:
        if rerank < 0:
            raise DataError("rerank must be >= 0")
        if rerank and self.reranker is None:
            raise DataError("re-ranking needs a re-ranker: open the index with one")
        return self.reranker if rerank else None

    def candidate_regions(self, results: list[Result]) -> RegionBatch:
        """Regions of indexed images, from the feature store when it has them, else from files."""
        ids = [r.id for r in results]
        if self.features is not None and all(i in self.features for i in ids):
            return self.features.batch(ids, soft_labels=False)
        return self._regions([self.image_file(r.path or r.id) for r in results])

    def image_file(self, path: str) -> Path:
        """The file of an indexed image, from its item's `path` (relative to the collection's
        folder, or absolute for uploads)."""
        return (self.images_root or Path(".")) / path

    @torch.inference_mode()
    def search_text(self, queries: list[str], k: int = 10, rerank: int = 0) -> list[Answer]:
        """Text -> image, a batch of queries at once; `rerank=K` re-scores the top K first."""
        if not queries:
            raise DataError("no query given")
        reranker = self._need_reranker(rerank)
        t0 = time.perf_counter()
        vecs = self.model.encode_text(queries).numpy()
        t1 = time.perf_counter()
        scores, ids = self.images.search(vecs, max(k, rerank))
        t2 = time.perf_counter()
        timing = {"encode": 1e3 * (t1 - t0), "search": 1e3 * (t2 - t1)}
        answers = []
        for q, s, i in zip(queries, scores, ids, strict=True):
            results = self._results(self.images, s, i)
            if reranker is not None:
                top = results[:rerank]
                regions = self.candidate_regions(top)
                dot = torch.tensor([r.score for r in top])
                results = reorder(top, reranker.rerank_images(q, regions, dot))
            answers.append(Answer(results[:k], dict(timing)))
        return _with_totals(
            answers, 1e3 * (time.perf_counter() - t2) if reranker is not None else None
        )

    def _regions(self, images: list[str | os.PathLike[str] | Image.Image]) -> RegionBatch:
        """Image files or PIL images -> their regions, through the model's backbone."""
        pils = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        pixels = torch.stack([self.backbone.preprocess(im.convert("RGB")) for im in pils])
        return collate_regions(self.backbone(pixels))

    @torch.inference_mode()
    def encode_images(self, images: list[str | os.PathLike[str] | Image.Image]) -> torch.Tensor:
        return self.model.encode_image(self._regions(images))

    @torch.inference_mode()
    def search_image(
        self,
        images: list[str | os.PathLike[str] | Image.Image],
        k: int = 10,
        target: str = "captions",
        rerank: int = 0,
    ) -> list[Answer]:
        """Image -> captions (target="captions") or image -> similar images (target="images");
        `rerank=K` re-scores the top K captions first."""
        return self.search_image_all(images, k, rerank, targets=(target,))[target]

    @torch.inference_mode()
    def search_image_all(
        self,
        images: list[str | os.PathLike[str] | Image.Image],
        k: int = 10,
        rerank: int = 0,
        targets: tuple[str, ...] = ("captions", "images"),
    ) -> dict[str, list[Answer]]:
        """Image queries against several indexes ("captions", "images"), encoding each image
        once; `rerank=K` re-scores the top K captions. Each answer's `encode` is that shared time.
        """
        indexes = {"captions": self.captions, "images": self.images}
        for t in targets:
            if t not in indexes:
                raise DataError(f"unknown search target {t!r}: use 'captions' or 'images'")
            if indexes[t] is None:
                raise DataError(f"{self.folder} has no caption index (built without captions)")
        if rerank and "captions" not in targets:
            raise DataError("re-ranking scores image-text pairs; it applies to caption results")
        reranker = self._need_reranker(rerank)
        t0 = time.perf_counter()
        regions = self._regions(images)
        vecs = self.model.encode_image(regions).numpy()
        encode_ms = 1e3 * (time.perf_counter() - t0)
        out = {}
        for t in targets:
            index, depth = indexes[t], rerank if t == "captions" else 0
            t1 = time.perf_counter()
            # An image index's prior was drawn from text queries; image->image is a plain
            # similarity.
            scores, ids = index.search(vecs, max(k, depth), with_prior=t == "captions")
            t2 = time.perf_counter()
            timing = {"encode": encode_ms, "search": 1e3 * (t2 - t1)}
            answers = []
            for n, (s, i) in enumerate(zip(scores, ids, strict=True)):
                results = self._results(index, s, i)
                if depth:
                    top = results[:depth]
                    dot = torch.tensor([r.score for r in top])
                    one = regions.select(slice(n, n + 1))
                    captions = [r.caption for r in top]
                    results = reorder(top, reranker.rerank_captions(one, captions, dot))
                answers.append(Answer(results[:k], dict(timing)))
            rerank_ms = 1e3 * (time.perf_counter() - t2) if depth else None
            out[t] = _with_totals(answers, rerank_ms)
        return out

    def add_uploads(self, uploads: list[tuple[str, bytes]]) -> list[tuple[str, bool]]:
        """Index uploaded image files, all or none: `(filename, bytes)` -> `(id, added)` each.

        Each image is stored under `<index>/uploads/`, named by a hash of its bytes plus the
        extension of the format it decodes as (never the client's, so an upload cannot become
        an .html page), which is also its id. An image already indexed is not added twice
        (`added` False). Nothing is written before every upload has decoded, and the stored
        files go again if indexing fails.

        Raises:
            DataError: an upload does not decode as an image (named in the message).
        """
        decoded, keys = [], []
        for name, data in uploads:
            try:
                decoded.append(load_image(data))
                with Image.open(io.BytesIO(data)) as im:
                    keys.append(upload_id(data, im.format))
            except (DataError, OSError) as e:
                raise DataError(f"{name}: not an image file this server can decode ({e})") from e
        folder = self.folder / "uploads"
        with self._add_lock:  # re-entered by `append`; makes the check and the add one step
            fresh = {}  # id -> position of its first upload, in upload order
            for n, key in enumerate(keys):
                if self.images.row(key) is None and key not in fresh:
                    fresh[key] = n
            written = []
            try:
                for key, n in fresh.items():
                    with atomic_path(folder / key) as tmp:
                        tmp.write_bytes(uploads[n][1])
                    written.append(folder / key)
                items = [
                    {"id": key, "path": str((folder / key).resolve()), "filename": uploads[n][0]}
                    for key, n in fresh.items()
                ]
                if items:
                    self.add_images([decoded[n] for n in fresh.values()], items)
            except BaseException:
                for f in written:
                    f.unlink(missing_ok=True)
                raise
        return [(key, key in fresh and fresh[key] == n) for n, key in enumerate(keys)]


# File extensions of the formats an upload is stored under, by Pillow's name for the format.
UPLOAD_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}


def upload_id(data: bytes, image_format: str | None) -> str:
    """The id (and stored file name) of an uploaded image: a hash of its bytes, plus the
    extension of its decoded format (".img" for a format without one here)."""
    suffix = UPLOAD_SUFFIX.get(image_format or "", ".img")
    return f"upload-{hashlib.sha256(data).hexdigest()[:20]}{suffix}"


def _with_totals(answers: list[Answer], rerank_ms: float | None) -> list[Answer]:
    """Add the re-rank stage (its time shared by the batch's queries) and each total."""
    for a in answers:
        if rerank_ms is not None:
            a.timing_ms["rerank"] = rerank_ms / len(answers)
        a.timing_ms["total"] = sum(a.timing_ms.values())
    return answers


def reorder(results: list[Result], scores: torch.Tensor) -> list[Result]:
    """Results sorted by their re-ranked scores (stable: the dot order breaks ties)."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    return [dataclasses.replace(results[j], score=float(scores[j])) for j in order]
