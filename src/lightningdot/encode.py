"""Collections into vectors: captions through the text encoder, images through the backbone and
the image encoder.

An image's regions come from a feature store when the collection has one (`ldot extract`),
else from its file through the backbone; `RegionSource` is the one place that makes that
choice, for indexing, evaluation, re-ranking, query images and adds alike.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from lightningdot.errors import DataError
from lightningdot.features import (
    Backbone,
    FeatureStore,
    RegionBatch,
    collate_regions,
    concat_batches,
    create_backbone,
    load_image,
)
from lightningdot.model.encoders import BiEncoder
from lightningdot.progress import Progress, Silent

STORE_BATCH = 256  # images read from a feature store at once
FILE_BATCH = 32  # images decoded and run through the backbone at once

ImageInput = str | os.PathLike[str] | bytes | Image.Image


@torch.inference_mode()
def encode_texts(model: BiEncoder, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N,) captions -> (N, vector_dim) unit vectors, a batch at a time."""
    return torch.cat(
        [model.encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    )


@torch.inference_mode()
def encode_regions(model: BiEncoder, batches: Iterable[RegionBatch]) -> torch.Tensor:
    """Region batches of N images -> (N, vector_dim) unit vectors."""
    return torch.cat([model.encode_image(b) for b in batches])


class RegionSource:
    """Where the regions of a collection's images come from.

    Args:
        backbone: registered backbone that makes regions from pixels; created on first use.
        store: the collection's feature store, if it has one.
        root: the folder the collection's image paths are relative to (absolute paths, as
            uploads have, stay as they are).
    """

    def __init__(
        self, backbone: str, store: FeatureStore | None = None, root: Path | None = None
    ) -> None:
        self.backbone_name, self.store, self.root = backbone, store, root
        self._backbone: Backbone | None = None
        self._lock = threading.Lock()  # image queries and adds may ask first at the same time

    @property
    def backbone(self) -> Backbone:
        with self._lock:
            if self._backbone is None:
                self._backbone = create_backbone(self.backbone_name)
        return self._backbone

    def file(self, path: str) -> Path:
        """The file of a collection image."""
        return (self.root or Path(".")) / path

    def of_images(self, images: Sequence[ImageInput]) -> RegionBatch:
        """Image files, their bytes or decoded images -> their regions, through the backbone."""
        pils = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        pixels = torch.stack([self.backbone.preprocess(im.convert("RGB")) for im in pils])
        return collate_regions(self.backbone(pixels))

    def batches(
        self,
        keys: Sequence[str],
        paths: Sequence[str] | None = None,
        progress: Progress | None = None,
        fallback: bool = False,
    ) -> Iterator[RegionBatch]:
        """The regions of the images `keys` (their files at `paths`, by default the keys), in
        order, a batch at a time: from the store, or from the files when there is no store (or,
        with `fallback`, when the store lacks any of the keys).

        Raises:
            DataError: without `fallback`, the store lacks some of the keys.
        """
        progress = progress or Silent()
        if self.store is not None and not (fallback and any(k not in self.store for k in keys)):
            missing = [k for k in keys if k not in self.store]
            if missing:
                raise DataError(
                    f"{len(missing)} image(s) missing from {self.store.root}, e.g. {missing[0]}"
                )
            for s in range(0, len(keys), STORE_BATCH):
                yield self.store.batch(list(keys[s : s + STORE_BATCH]), soft_labels=False)
                progress.advance(len(keys[s : s + STORE_BATCH]))
            return
        files = [self.file(p) for p in (paths if paths is not None else keys)]
        for s in range(0, len(files), FILE_BATCH):
            yield self.of_images(files[s : s + FILE_BATCH])
            progress.advance(len(files[s : s + FILE_BATCH]))

    def regions(self, keys: Sequence[str], paths: Sequence[str] | None = None) -> RegionBatch:
        """All at once: the candidates of a re-rank, from the store when it has them all."""
        return concat_batches(list(self.batches(keys, paths, fallback=True)))


def encode_collection(
    model: BiEncoder,
    source: RegionSource,
    keys: Sequence[str],
    progress: Progress | None = None,
) -> torch.Tensor:
    """(N, vector_dim) unit vectors of the images `keys`."""
    return encode_regions(model, source.batches(keys, progress=progress))


@dataclass
class Encoded:
    """The vectors of the images of a collection that could be read."""

    vectors: torch.Tensor  # (N', vector_dim), in the order asked for
    kept: list[int]  # the position of each among the keys asked for
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, why) of the others


@torch.inference_mode()
def encode_readable(
    model: BiEncoder, source: RegionSource, keys: Sequence[str], progress: Progress | None = None
) -> Encoded:
    """Like `encode_collection`, but an image file that does not decode is skipped and named
    (as `ldot extract` does) instead of ending the run."""
    if source.store is not None:
        return Encoded(encode_collection(model, source, keys, progress), list(range(len(keys))))
    progress = progress or Silent()
    out = Encoded(torch.empty(0), [])
    vectors = []
    for start in range(0, len(keys), FILE_BATCH):
        images = []
        for n, key in enumerate(keys[start : start + FILE_BATCH], start):
            try:
                images.append(load_image(source.file(key)))
                out.kept.append(n)
            except DataError as e:
                out.failed.append((key, str(e)))
        if images:
            vectors.append(model.encode_image(source.of_images(images)))
        progress.advance(len(keys[start : start + FILE_BATCH]))
    if vectors:
        out.vectors = torch.cat(vectors)
    return out
