"""Collections into vectors: captions through the text encoder, images through the backbone and
the image encoder.

An image's regions come from a feature store when the collection has one (`ldot extract`),
else from its file through the backbone; `RegionSource` is the one place that makes that
choice, for indexing, evaluation, re-ranking, query images and adds alike.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightningdot.config import RuntimeConfig
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
from lightningdot.runtime import accelerate_backbone

STORE_BATCH = 256  # images read from a feature store at once
FILE_BATCH = 32  # images decoded and run through the backbone at once
# Threads that decode and resize the next batch of files while the backbone runs on this one
# (Pillow lets go of the GIL while it decodes and resizes).
DECODERS = 2

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
        self,
        backbone: str,
        store: FeatureStore | None = None,
        root: Path | None = None,
        runtime: RuntimeConfig | None = None,
    ) -> None:
        self.backbone_name, self.store, self.root = backbone, store, root
        self.runtime = runtime  # what runs the backbone (None: eager PyTorch)
        self._backbone: Backbone | None = None
        self._lock = threading.Lock()  # image queries and adds may ask first at the same time

    @classmethod
    def of(
        cls, model: BiEncoder, store: FeatureStore | None = None, root: Path | None = None
    ) -> RegionSource:
        """The region source of `model`'s backbone, on the runtime the model runs on."""
        return cls(model.cfg.backbone, store, root, model.runtime)

    @property
    def backbone(self) -> Backbone:
        with self._lock:
            if self._backbone is None:
                backbone = create_backbone(self.backbone_name)
                if self.runtime is not None:
                    accelerate_backbone(backbone, self.runtime)
                self._backbone = backbone
        return self._backbone

    def file(self, path: str) -> Path:
        """The file of a collection image."""
        return (self.root or Path(".")) / path

    def of_images(self, images: Sequence[ImageInput]) -> RegionBatch:
        """Image files, their bytes or decoded images -> their regions, through the backbone."""
        pils = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return self.of_pixels([self.backbone.preprocess(im.convert("RGB")) for im in pils])

    def of_pixels(self, pixels: list[torch.Tensor]) -> RegionBatch:
        """Preprocessed pixels (3, H, W) each -> their regions, through the backbone."""
        return collate_regions(self.backbone(torch.stack(pixels), soft_labels=False))

    def _pixels(self, file: Path) -> torch.Tensor | DataError:
        try:
            return self.backbone.preprocess(load_image(file))
        except DataError as e:
            return e

    def decoded(self, files: Sequence[Path]) -> Iterator[list[torch.Tensor | DataError]]:
        """The pixels of `files`, FILE_BATCH at a time, decoded by a thread pool one batch
        ahead of the caller; a file that does not decode gives its error instead."""
        pool = ThreadPoolExecutor(DECODERS, thread_name_prefix="ldot-decode")
        try:
            ahead: deque[list] = deque()
            for s in range(0, len(files), FILE_BATCH):
                ahead.append([pool.submit(self._pixels, f) for f in files[s : s + FILE_BATCH]])
                if len(ahead) > 1:
                    yield [f.result() for f in ahead.popleft()]
            while ahead:
                yield [f.result() for f in ahead.popleft()]
        finally:  # a caller that stops early (an error) does not wait for the batch ahead
            pool.shutdown(cancel_futures=True)

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
        absent = [f for f in files if not f.is_file()]
        if absent:  # all at once, before any decoding: a wrong folder or a partial copy
            more = (
                f" ({len(absent)} of the {len(files)} files are missing)" if len(absent) > 1 else ""
            )
            raise DataError(f"image not found: {absent[0]}{more}")
        for pixels in self.decoded(files):
            for p in pixels:
                if isinstance(p, DataError):
                    raise p
            yield self.of_pixels(pixels)
            progress.advance(len(pixels))

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
class StateRows:
    """The image encoder's states of N images, as an index keeps them for re-ranking."""

    states: np.ndarray  # (N, L, H) float16 ([IMG] + regions, padded to L), or a memory map
    lengths: np.ndarray  # (N,) the real tokens of each: 1 + its regions

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def of(cls, states: torch.Tensor, regions: RegionBatch) -> StateRows:
        """`BiEncoder.encode_image_states`'s states of `regions`."""
        lengths = 1 + regions.mask.sum(1)
        return cls(states.to(torch.float16).numpy(), lengths.to(torch.int32).numpy())

    def select(self, keep: np.ndarray) -> StateRows:
        return StateRows(self.states[keep], self.lengths[keep])

    @classmethod
    def concat(cls, parts: list[StateRows]) -> StateRows:
        """One block of several, padded to the widest."""
        width = max(p.states.shape[1] for p in parts)
        states = [
            p.states
            if p.states.shape[1] == width
            else np.pad(p.states, ((0, 0), (0, width - p.states.shape[1]), (0, 0)))
            for p in parts
        ]
        return cls(np.concatenate(states), np.concatenate([p.lengths for p in parts]))


@dataclass
class Encoded:
    """The vectors of the images of a collection that could be read (and, when asked for,
    their states)."""

    vectors: torch.Tensor  # (N', vector_dim), in the order asked for
    kept: list[int]  # the position of each among the keys asked for
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, why) of the others
    states: StateRows | None = None


@torch.inference_mode()
def encode_readable(
    model: BiEncoder,
    source: RegionSource,
    keys: Sequence[str],
    progress: Progress | None = None,
    states: bool = False,
) -> Encoded:
    """Like `encode_collection`, but an image file that does not decode is skipped and named
    (as `ldot extract` does) instead of ending the run; with `states`, the image encoder's
    states of each image are kept too (for an index that stores them)."""
    out = Encoded(torch.empty(0), [])
    vectors, kept_states = [], []
    for regions, kept in _readable(source, keys, out.failed, progress or Silent()):
        v, s = model.encode_image_states(regions)
        vectors.append(v)
        out.kept += kept
        if states:
            kept_states.append(StateRows.of(s, regions))
    if vectors:
        out.vectors = torch.cat(vectors)
    if kept_states:
        out.states = StateRows.concat(kept_states)
    return out


def _readable(
    source: RegionSource, keys: Sequence[str], failed: list, progress: Progress
) -> Iterator[tuple[RegionBatch, list[int]]]:
    """Batches of the regions of the images `keys` that can be read, each with the positions
    of its images among the keys; (key, why) of each image that cannot goes to `failed`."""
    if source.store is not None:
        start = 0
        for regions in source.batches(keys, progress=progress):
            yield regions, list(range(start, start + len(regions)))
            start += len(regions)
        return
    start = 0
    for pixels in source.decoded([source.file(k) for k in keys]):
        good = [(n, p) for n, p in enumerate(pixels, start) if not isinstance(p, DataError)]
        failed += [
            (keys[n], str(p)) for n, p in enumerate(pixels, start) if isinstance(p, DataError)
        ]
        if good:
            yield source.of_pixels([p for _, p in good]), [n for n, _ in good]
        start += len(pixels)
        progress.advance(len(pixels))
