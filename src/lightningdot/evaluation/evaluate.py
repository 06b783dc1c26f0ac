"""A model or a re-ranker measured on a corpus: encode it, rank both ways, score the ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

import torch

from lightningdot.config import AUTO_RUNTIME, RuntimeConfig
from lightningdot.data import Corpus, read_karpathy
from lightningdot.encode import RegionSource, encode_regions, encode_texts
from lightningdot.errors import DataError
from lightningdot.evaluation.metrics import recall_metrics, reranked_metrics
from lightningdot.features import FeatureStore, RegionBatch, concat_batches
from lightningdot.model.checkpoint import load_model, load_reranker
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.reranker import (
    Reranker,
    caption_states,
    gallery_states,
    vectors_of_states,
)
from lightningdot.progress import Progress, Silent
from lightningdot.runtime import accelerate


def evaluate_model(model: BiEncoder, corpus: Corpus, regions: Iterable[RegionBatch]) -> dict:
    """Recall@1/5/10 both ways and AR of the model on the corpus, whose images' regions come
    in corpus order; ranked with the model's query-bank prior when it has one."""
    was_training = model.training
    model.eval()
    image = encode_regions(model, regions)
    text = encode_texts(model, corpus.captions)
    model.train(was_training)
    queries = model.as_query(text, "text"), model.as_query(image, "image")
    return recall_metrics(text, image, corpus.caption_image, model.bank, queries)


@torch.inference_mode()
def evaluate_reranked(
    reranker: Reranker,
    captions: list[str],
    caption_image: list[int] | torch.Tensor,
    regions: RegionBatch,
    k: int,
    fusions: Sequence[float] | None = None,
    with_ranks: bool = False,
) -> dict:
    """Recall@1/5/10 both ways and AR after re-ranking every query's top K (`recall_metrics`
    layout; each query's rank too, `with_ranks`), with each gallery item's states computed once.

    With `fusions`, returns {weight: metrics} for each fusion weight instead, the cross-attention
    scores computed once for all of them.
    """
    was = reranker.training
    reranker.eval()
    texts = caption_states(reranker, captions)
    images = gallery_states(reranker, regions)
    text_vecs, image_vecs = vectors_of_states(reranker.bi, texts, images, regions)
    cache: dict[tuple[str, int], torch.Tensor] = {}  # (direction, first query) -> cross logits

    def rescore(direction, q, cand, dot, fusion):
        key = (direction, int(q[0]))
        if key not in cache:
            queries = q.repeat_interleave(cand.shape[1])
            pairs = (queries, cand.flatten()) if direction == "t2i" else (cand.flatten(), queries)
            cache[key] = reranker.cross_scores(texts, images, *pairs)
        return reranker.fused_score(cache[key].view_as(dot), dot, fusion)

    weights = list(fusions) if fusions is not None else [reranker.cfg.fusion]
    results = {
        w: reranked_metrics(
            text_vecs,
            image_vecs,
            caption_image,
            k,
            partial(rescore, "t2i", fusion=w),
            partial(rescore, "i2t", fusion=w),
            reranker.bi.bank,
            with_ranks,
        )
        for w in weights
    }
    reranker.train(was)
    return results if fusions is not None else results[weights[0]]


def evaluate_split(
    annotations: Path,
    image_dir: Path,
    split: str = "test",
    model: str = "default",
    features: Path | None = None,
    rerank: int = 0,
    reranker: str = "default",
    prior: bool = True,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
    runtime: RuntimeConfig = AUTO_RUNTIME,
) -> dict:
    """`ldot evaluate`: a model (and with `rerank=K`, its re-ranker over each query's top K) on
    one split of an annotation file, the regions from `features` or else from the image files.
    `prior=False` ranks by the dot product alone; the encoders run on `runtime`."""
    corpus = read_karpathy(annotations, split)
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir}")
    if rerank < 0:
        raise DataError("--rerank must be >= 0")
    net = accelerate(load_model(model), runtime)
    if not prior:
        net.bank = None
    cross = load_reranker(reranker, bi=net) if rerank else None
    store = FeatureStore(features) if features is not None else None
    progress = progress or Silent()
    progress.start(len(corpus.images), "encoding images")
    regions = RegionSource.of(net, store, image_dir).batches(corpus.keys(), progress=progress)
    if cross is None:
        return evaluate_model(net, corpus, regions)
    gallery = concat_batches(list(regions))
    log(f"re-ranking the top {rerank}")
    return evaluate_reranked(cross, corpus.captions, corpus.caption_image, gallery, rerank)
