"""Offline extraction: a collection's images -> a feature store, resumable and failure-tolerant."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightningdot.config import AUTO_RUNTIME, RuntimeConfig
from lightningdot.data import read_collection
from lightningdot.errors import DataError
from lightningdot.features.backbones import Backbone, create_backbone, load_image
from lightningdot.features.detector import read_detector_npz
from lightningdot.features.store import FeatureStoreWriter, StoreInfo
from lightningdot.progress import Progress, Silent
from lightningdot.runtime import accelerate_backbone


@dataclass
class ExtractSummary:
    total: int = 0
    skipped: int = 0  # already in the store from an earlier run
    extracted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


def _decode(backbone: Backbone, items: Sequence[tuple[str, Path]]):
    ok, failed = [], []
    for key, path in items:
        try:
            ok.append((key, backbone.preprocess(load_image(path))))
        except DataError as e:
            failed.append((key, str(e)))
    return ok, failed


def _batches(items: Sequence[tuple[str, Path]], size: int) -> Iterator[Sequence[tuple[str, Path]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def extract_images(
    items: Sequence[tuple[str, Path]],
    out: str | Path,
    backbone: Backbone,
    batch_size: int = 32,
    shard_size: int = 256,
    on_progress: Callable[[int], None] | None = None,
) -> ExtractSummary:
    """Extract the regions of every (key, image path) not yet in the store at `out`.

    Images that do not decode are skipped and named in the summary; the others are written.
    Decoding of the next batch overlaps with the backbone's forward pass of this one.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, not {batch_size}")
    info = StoreInfo(backbone.name, backbone.feature_dim, backbone.num_classes)
    summary = ExtractSummary(total=len(items))
    start = time.perf_counter()
    with FeatureStoreWriter(out, info, shard_size) as writer:
        todo = [(k, p) for k, p in items if k not in writer.done]
        summary.skipped = len(items) - len(todo)
        if on_progress and summary.skipped:
            on_progress(summary.skipped)
        with ThreadPoolExecutor(max_workers=1) as pool:
            decoded = pool.map(lambda b: _decode(backbone, b), _batches(todo, batch_size))
            for ok, failed in decoded:
                summary.failed.extend(failed)
                if ok:
                    pixels = torch.stack([x for _, x in ok])
                    for (key, _), regions in zip(ok, backbone(pixels), strict=True):
                        writer.add(key, regions)
                    summary.extracted += len(ok)
                if on_progress:
                    on_progress(len(ok) + len(failed))
    summary.seconds = time.perf_counter() - start
    return summary


def import_detector_features(
    items: Sequence[tuple[str, Path]],
    out: str | Path,
    shard_size: int = 256,
    on_progress: Callable[[int], None] | None = None,
) -> ExtractSummary:
    """Copy precomputed detector regions (one `.npz` per image) into a feature store."""
    summary = ExtractSummary(total=len(items))
    start = time.perf_counter()
    writer: FeatureStoreWriter | None = None
    try:
        for key, path in items:
            try:
                regions = read_detector_npz(path)
            except DataError as e:
                summary.failed.append((key, str(e)))
                continue
            finally:
                if on_progress:
                    on_progress(1)
            if writer is None:
                soft = regions.soft_labels
                info = StoreInfo(
                    "detector", regions.features.shape[1], 0 if soft is None else soft.shape[1]
                )
                writer = FeatureStoreWriter(out, info, shard_size)
            if key in writer.done:
                summary.skipped += 1
                continue
            writer.add(key, regions)
            summary.extracted += 1
    finally:
        if writer is not None:
            writer.flush()
    summary.seconds = time.perf_counter() - start
    return summary


def extract_collection(
    image_dir: Path,
    out: Path,
    annotations: Path | None = None,
    split: str | None = None,
    backbone: str = "efficientnet-lite2",
    detector: bool = False,
    batch_size: int = 32,
    shard_size: int = 256,
    progress: Progress | None = None,
    runtime: RuntimeConfig = AUTO_RUNTIME,
) -> ExtractSummary:
    """`ldot extract`: the images an annotation file names (or all under `image_dir`) through
    the backbone (on `runtime`), or with `detector` every `.npz` of precomputed regions under
    `image_dir`."""
    progress = progress or Silent()
    if detector:
        files = sorted(image_dir.rglob("*.npz")) if image_dir.is_dir() else []
        if not files:
            raise DataError(f"no .npz detector files under {image_dir}")
        items = [(p.relative_to(image_dir).with_suffix("").as_posix(), p) for p in files]
        progress.start(len(items), "importing")
        return import_detector_features(items, out, shard_size, progress.advance)
    corpus = read_collection(image_dir, annotations, split)
    items = [(k, image_dir / k) for k in corpus.keys()]
    net = accelerate_backbone(create_backbone(backbone), runtime)
    progress.start(len(items), "extracting")
    return extract_images(items, out, net, batch_size, shard_size, progress.advance)
