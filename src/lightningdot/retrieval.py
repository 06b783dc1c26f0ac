"""`Retriever`: the one object the CLI and the server call to answer queries.

    text query  -> TextEncoder -> image index -> top K images ──┐
    image query -> backbone + ImageEncoder -> caption index -> top K captions ──┤ re-rank (opt.) -> top M
                                           -> image index   -> top K similar images

It opens an index folder (`lightningdot.index.folder`) with the model that built it, and
optionally a re-ranker trained for that model, which re-scores each query's top K.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightningdot.config import AUTO_RUNTIME, RuntimeConfig
from lightningdot.data import Corpus
from lightningdot.encode import ImageInput, RegionSource, StateRows
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.explain import RegionWeights, TokenWeights, explain_regions, token_weights
from lightningdot.features import FeatureStore, RegionBatch
from lightningdot.index.backend import Hit, Items, View
from lightningdot.index.build import AddReport, add_collection
from lightningdot.index.engines import open_index
from lightningdot.index.filters import Filter, parse_filter
from lightningdot.index.folder import IndexFolder
from lightningdot.index.record import Manifest
from lightningdot.index.uploads import add_uploads
from lightningdot.model.checkpoint import load_model, load_reranker
from lightningdot.model.coverage import query_warnings
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.reranker import Reranker
from lightningdot.progress import Progress
from lightningdot.runtime import accelerate

TARGETS = ("captions", "images")  # what an image query can search


@dataclass
class Result:
    id: str
    score: float
    path: str | None = None
    caption: str | None = None  # the caption itself (image->text), or the image's first caption
    # Why it matched, when asked (`lightningdot.explain`): an image's regions, a caption's tokens
    regions: RegionWeights | None = None
    tokens: TokenWeights | None = None


@dataclass
class Answer:
    """One query's results; `timing_ms`: milliseconds per stage (`queue` when the query's
    arrival was given, `encode`, `search`, `rerank` when re-ranking) and their `total`."""

    results: list[Result]
    timing_ms: dict[str, float] = field(default_factory=dict)
    # What the user should know about how the model read the query
    # (`lightningdot.model.coverage`): results are given all the same.
    warnings: list[str] = field(default_factory=list)


@dataclass
class ImageAnswer:
    """One image query's captions and similar images (None for a target not searched)."""

    captions: list[Result] | None
    images: list[Result] | None
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Added:
    images: list[tuple[str, bool]]  # (id, False when the same image was already indexed)
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Page:
    """Which of a query's results to return: those passing `filter` (a filter's JSON text or
    object, `lightningdot.index.filters`), past the first `offset`, scoring at least
    `min_score`."""

    filter: str | dict | None = None
    offset: int = 0
    min_score: float | None = None

    def check(self, k: int, rerank: int) -> None:
        """Refuse a page a query of `k` results re-ranking its top `rerank` cannot give.

        Raises:
            DataError: a negative offset, or a page past the re-ranked results (whose scores
                do not compare with those after them).
        """
        if self.offset < 0:
            raise DataError(f"offset must be 0 or more, not {self.offset}")
        if rerank and self.offset + k > rerank:
            raise DataError(
                f"offset + k ({self.offset + k}) must be at most rerank ({rerank}): re-ranking "
                "orders only its top K"
            )

    def where(self, images: Items) -> Filter | None:
        """The filter, parsed against the fields of `images` (None: every item passes).

        Raises:
            FilterError: the filter does not parse or names what the index does not know.
        """
        return parse_filter(self.filter, images.kinds) if self.filter else None

    def cut(self, results: list[Result], k: int) -> list[Result]:
        page = results[self.offset : self.offset + k]
        if self.min_score is None:
            return page
        return [r for r in page if r.score >= self.min_score]


FIRST_PAGE = Page()

NO_RERANKER = "re-ranking needs a re-ranker: open the index with one (--reranker)"


def check_query(
    k: int, rerank: int, reranker: Reranker | None, no_reranker: str = NO_RERANKER
) -> None:
    """The one check of a query's result count and re-rank depth (`no_reranker`: what to say
    when re-ranking is asked of a retriever without a re-ranker).

    Raises:
        DataError: k < 1, rerank < 0, re-ranking without a re-ranker, or 0 < rerank < k
            (re-ranking answers from the K it re-scores; past them the scores do not compare).
    """
    if k < 1:
        raise DataError(f"k must be at least 1, not {k}")
    if rerank < 0:
        raise DataError(f"rerank must be 0 (off) or positive, not {rerank}")
    if rerank and reranker is None:
        raise DataError(no_reranker)
    if 0 < rerank < k:
        raise DataError(f"rerank ({rerank}) must be 0 or at least k ({k})")


class Stopwatch:
    """Milliseconds per stage of answering a batch of queries, and each query's timing."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str, shared_by: int = 1) -> None:
        """Close `stage` (adding to it if it ran before), its time split among `shared_by`."""
        now = time.perf_counter()
        ms = 1e3 * (now - self._last) / shared_by
        self.stages[stage] = self.stages.get(stage, 0.0) + ms
        self._last = now

    def timing(self, received: float | None = None) -> dict[str, float]:
        """A query's stages; with its arrival time, also the time it waited (`queue`), and a
        `total` up to now, else the sum of the stages."""
        if received is None:
            return {**self.stages, "total": sum(self.stages.values())}
        queue = {"queue": max(0.0, 1e3 * (self.start - received))}
        return {**queue, **self.stages, "total": 1e3 * (time.perf_counter() - received)}


def reorder(results: list[Result], scores: torch.Tensor) -> list[Result]:
    """Results sorted by their re-ranked scores (stable: the dot order breaks ties)."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    return [dataclasses.replace(results[j], score=float(scores[j])) for j in order]


def slow_rerank_warning(folder: Path) -> str:
    return (
        f"{folder} keeps no region states (built before they were kept, or with --no-states) "
        "and no feature store: re-ranking decodes every candidate's image file and runs the "
        "backbone on it, seconds per query on a CPU; build the index again to keep them"
    )


def open_reranker(name: str | None, bi: BiEncoder) -> Reranker | None:
    """A re-ranker over `bi` by name or folder; "auto": the shipped one when it was trained on
    `bi`, else none; None or "none": none."""
    if name in (None, "", "none"):
        return None
    if name == "auto":
        try:
            return load_reranker("default", bi=bi)
        except ConfigMismatchError:
            return None
    return load_reranker(name, bi=bi)


class Retriever:
    """Answers text and image queries against an index folder with the model that built it.

    With a re-ranker, `rerank=K` re-scores the top K with cross-attention; the candidates'
    regions come from the feature store the index was built from, else from their image files.
    """

    def __init__(self, model: BiEncoder, index: IndexFolder, reranker: Reranker | None = None):
        self.model, self.index, self.reranker = model, index, reranker
        # No root: the index folder gives each image's file (`IndexFolder.file_of`).
        self.regions = RegionSource.of(model, index.features)
        self._warned_files = False

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        model: str | BiEncoder | None = None,
        mmap: bool = True,
        reranker: str | None = None,
        runtime: RuntimeConfig = AUTO_RUNTIME,
    ) -> Retriever:
        """Load an index folder and its model (by default the one recorded in the folder), and
        optionally a re-ranker for that model: a shipped name, a folder, or "auto" (the
        shipped one if it fits the model). The model's encoders run on `runtime`."""
        if not isinstance(model, BiEncoder):
            model = load_model(model or Manifest.read(Path(folder)).model)
        accelerate(model, runtime)
        index = open_index(folder, model, mmap)
        return cls(model, index, open_reranker(reranker, model))

    @property
    def folder(self) -> Path:
        return self.index.folder

    @property
    def image_index(self) -> Items:
        return self.index.live.images

    @property
    def caption_index(self) -> Items | None:
        return self.index.live.captions

    def image_file(self, item: dict) -> Path:
        """The file of an indexed image, from its item."""
        return self.index.file_of(item)

    def file_of(self, image_id: str) -> Path:
        """The file of the indexed image `image_id`.

        Raises:
            DataError: the image is not in the index.
        """
        item = self.index.live.images.get(image_id)
        if item is None:
            raise DataError(f"no image {image_id!r} in the index")
        return self.image_file(item)

    @staticmethod
    def _results(hits: list[Hit]) -> list[Result]:
        out = []
        for s, it in hits:
            caption = it.get("caption") or (it.get("captions") or [None])[0]
            path = it.get("path") or it.get("image")
            if path and os.path.isabs(path):  # an older folder's: its name, not where it lives
                path = Path(path).name
            out.append(Result(it["id"], float(s), path, caption))
        return out

    def _rerank(
        self,
        results: list[Result],
        depth: int,
        rescore: Callable[[list[Result], torch.Tensor], torch.Tensor],
    ) -> list[Result]:
        """The top `depth` results, re-scored by `rescore(top, their dot scores)` and reordered."""
        top = results[:depth]
        return reorder(top, rescore(top, torch.tensor([r.score for r in top])))

    def candidate_states(
        self, results: list[Result], live: View | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the re-ranker reads of indexed images (of `live`, the view the results came
        from; by default the one live now): their states, as the folder keeps them; else from
        their regions (from the feature store when it has them, else their files)."""
        live = live or self.index.live
        states = live.states_of([r.id for r in results])
        if states is not None:
            return states
        if not self._warned_files and self.regions.store is None:
            warnings.warn(slow_rerank_warning(self.folder), RuntimeWarning, stacklevel=2)
            self._warned_files = True
        files = self._files(live, [r.id for r in results])
        return self.reranker.image_states(self.regions.regions([r.id for r in results], files))

    @torch.inference_mode()
    def search_text(
        self,
        queries: list[str],
        k: int = 10,
        rerank: int = 0,
        received: Sequence[float] | None = None,
        explain: bool = False,
        page: Page = FIRST_PAGE,
    ) -> list[Answer]:
        """Text -> image, a batch of queries at once; `rerank=K` re-scores the top K first.
        `received`: when each query arrived (`time.perf_counter()`), to time its wait;
        `explain`: each result's region weights (`explain_images`); `page`: which results
        (a filter, an offset, a lowest score)."""
        if not queries:
            raise DataError("no query given")
        check_query(k, rerank, self.reranker)
        page.check(k, rerank)
        clock = Stopwatch()
        live = self.index.live  # once: a change may put a new version live meanwhile
        vectors = self.model.as_query(self.model.encode_text(queries), "text").numpy()
        clock.lap("encode")
        depth = max(k + page.offset, rerank)
        found = [
            self._results(h) for h in live.search("images", vectors, depth, page.where(live.images))
        ]
        clock.lap("search")
        if rerank:
            found = [
                self._rerank(hits, rerank, self._image_rescorer(q, live))
                for q, hits in zip(queries, found, strict=True)
            ]
            clock.lap("rerank", shared_by=len(queries))
        found = [page.cut(hits, k) for hits in found]
        if explain:
            found = [
                self._explained(q, torch.from_numpy(v), hits, live, rerank > 0)
                for q, v, hits in zip(queries, vectors, found, strict=True)
            ]
            clock.lap("explain", shared_by=len(queries))
        arrivals = received or [None] * len(queries)
        model = self.model
        return [
            Answer(h, clock.timing(t), query_warnings(model.tokenizer, model.cfg.text, q))
            for q, h, t in zip(queries, found, arrivals, strict=True)
        ]

    def explain(self, query: str, image_id: str, rerank: bool = False) -> RegionWeights:
        """Why image `image_id` matches the text `query`: a weight per region (see
        `explain_images`); `rerank`: of the re-ranked score.

        Raises:
            DataError: the image is not in the index.
        """
        live = self.index.live
        if live.images.get(image_id) is None:
            raise DataError(f"no image {image_id!r} in the index")
        with torch.inference_mode():
            vector = self.model.as_query(self.model.encode_text([query]), "text")[0]
        hit = Result(image_id, 0.0)
        return self._explained(query, vector, [hit], live, rerank)[0].regions

    def explain_images(
        self, query: str, vector: torch.Tensor, ids: list[str], live: View, rerank: bool
    ) -> list[RegionWeights]:
        """Region weights of indexed images for a text query and its vector:
        from their region features (the feature store, else their files) by the gradient of
        the score at each region's deletion gate, or from the states the index keeps (when it
        has no store) by each region state's similarity to the query."""
        reranker = self.reranker if rerank else None
        states = live.states_of(ids) if self.regions.store is None else None
        if states is not None:
            return explain_regions(self.model, vector, states=states)
        files = self._files(live, ids)
        regions = self.regions.regions(ids, files)
        text = reranker.text_states([query]) if reranker is not None else None
        return explain_regions(self.model, vector, regions, reranker=reranker, text=text)

    def _files(self, live: View, image_ids: list[str]) -> list[str]:
        return [str(self.image_file(live.images.get(i))) for i in image_ids]

    def _explained(self, query, vector, hits, live, rerank) -> list[Result]:
        weights = self.explain_images(query, vector, [h.id for h in hits], live, rerank)
        return [dataclasses.replace(h, regions=w) for h, w in zip(hits, weights, strict=True)]

    def _image_rescorer(self, query: str, live: View):
        def rescore(top: list[Result], dot: torch.Tensor) -> torch.Tensor:
            return self.reranker.rerank_states(query, self.candidate_states(top, live), dot)

        return rescore

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return self.model.encode_image(self.regions.of_images(images))

    @torch.inference_mode()
    def _rows_of(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, StateRows | None]:
        """Images to add: their vectors and states (kept if the folder keeps states when the
        add commits: a rebuild meanwhile may have changed that)."""
        regions = self.regions.of_images(images)
        vectors, states = self.model.encode_image_states(regions)
        return vectors.numpy(), StateRows.of(states, regions)

    def search_image(
        self,
        queries: Sequence[ImageInput],
        k: int = 10,
        target: str = "captions",
        rerank: int = 0,
        explain: bool = False,
        page: Page = FIRST_PAGE,
    ) -> list[Answer]:
        """Image -> captions (target="captions") or image -> similar images (target="images");
        `rerank=K` re-scores the top K captions first; `explain`: the captions' token weights;
        `page` as for `search_text` (a filter: on the images a caption describes)."""
        answers = self.search_image_all(queries, k, rerank, (target,), explain=explain, page=page)
        return [Answer(getattr(a, target), a.timing_ms) for a in answers]

    @torch.inference_mode()
    def search_image_all(
        self,
        queries: Sequence[ImageInput],
        k: int = 10,
        rerank: int = 0,
        targets: tuple[str, ...] = TARGETS,
        received: Sequence[float] | None = None,
        explain: bool = False,
        page: Page = FIRST_PAGE,
    ) -> list[ImageAnswer]:
        """Image queries against several indexes ("captions", "images"), encoding each image
        once; `rerank=K` re-scores the top K captions; `explain`: each caption result's token
        weights (`lightningdot.explain.token_weights`); `page` as for `search_image`. `search`
        times both searches."""
        live = self._targets(targets, rerank)
        check_query(k, rerank, self.reranker)
        page.check(k, rerank)
        where = page.where(live.images)
        clock = Stopwatch()
        regions = self.regions.of_images(queries)
        vectors = self.model.as_query(self.model.encode_image(regions), "image").numpy()
        clock.lap("encode")
        found: dict[str, list[list[Result]]] = {}
        for t in targets:
            # Only captions are re-ranked. An image index's prior was drawn from text queries;
            # image->image is plain similarity.
            depth = max(k + page.offset, rerank) if t == "captions" else k + page.offset
            hits = live.search(t, vectors, depth, where, with_prior=t == "captions")
            found[t] = [self._results(h) for h in hits]
            clock.lap("search")
        if rerank:
            found["captions"] = [
                self._rerank(hits, rerank, self._caption_rescorer(regions.select(slice(n, n + 1))))
                for n, hits in enumerate(found["captions"])
            ]
            clock.lap("rerank", shared_by=len(queries))
        found = {t: [page.cut(hits, k) for hits in lists] for t, lists in found.items()}
        if explain and "captions" in found:
            found["captions"] = [
                self._with_tokens(hits, torch.from_numpy(v))
                for hits, v in zip(found["captions"], vectors, strict=True)
            ]
            clock.lap("explain", shared_by=len(queries))

        def top(target: str, n: int) -> list[Result] | None:
            return found[target][n] if target in found else None

        arrivals = received or [None] * len(queries)
        return [
            ImageAnswer(top("captions", n), top("images", n), clock.timing(arrived))
            for n, arrived in enumerate(arrivals)
        ]

    def _targets(self, targets: tuple[str, ...], rerank: int) -> View:
        """The view to search (taken once: a change may put a new one live meanwhile), once
        the targets are known to be in it."""
        live = self.index.live
        for t in targets:
            if t not in TARGETS:
                raise DataError(f"unknown search target {t!r}: use 'captions' or 'images'")
            if t == "captions" and live.captions is None:
                raise DataError(f"{self.folder} has no caption index (built without captions)")
        if rerank and "captions" not in targets:
            raise DataError("re-ranking scores image-text pairs; it applies to caption results")
        return live

    def delete(self, image_ids: list[str]) -> None:
        """Delete images and their captions, all or none (`IndexFolder.delete`).

        Raises:
            DataError: an id is not in the index.
        """
        self.index.delete(image_ids)

    def update_fields(self, image_id: str, fields: dict) -> dict:
        """Update an image's fields (`IndexFolder.update_fields`); returns them as committed."""
        return self.index.update_fields(image_id, fields)

    def _with_tokens(self, hits: list[Result], image: torch.Tensor) -> list[Result]:
        if not hits:
            return hits
        images = image.float()[None].expand(len(hits), -1)
        weights = token_weights(self.model, [h.caption for h in hits], images)
        return [dataclasses.replace(h, tokens=w) for h, w in zip(hits, weights, strict=True)]

    def _caption_rescorer(self, image: RegionBatch):
        def rescore(top: list[Result], dot: torch.Tensor) -> torch.Tensor:
            return self.reranker.rerank_captions(image, [r.caption for r in top], dot)

        return rescore

    def add_collection(
        self,
        corpus: Corpus,
        image_dir: Path,
        features: FeatureStore | None = None,
        progress: Progress | None = None,
    ) -> AddReport:
        """Append the corpus's images not yet indexed, and their captions."""
        return add_collection(self.index, self.model, corpus, image_dir, features, progress)

    def add_uploads(self, uploads: list[tuple[str, bytes]], received: float | None = None) -> Added:
        """Index uploaded image files, all or none: `(filename, bytes)` each (see
        `lightningdot.index.uploads`); `received`: when the request arrived."""
        clock = Stopwatch()
        added = add_uploads(self.index, uploads, self._rows_of)
        clock.lap("add")
        return Added(added, clock.timing(received))
