"""The paper's headline, measured: dot-product retrieval against cross-attention over everything.

For each text query, on one gallery and in one process:

    dot         encode the query, search the index (LightningDOT)
    dot_rerank  the same, then the cross-attention model re-scores the top K
    cross_full  the cross-attention model scores every image of the gallery (the baseline)

The gallery's image vectors are indexed once beforehand (offline, not timed). Re-ranking and
the baseline start from the candidates' region features, as a feature store holds them, and run
the same code, so their ratio is the price of scoring K images against scoring all of them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightningdot.data import Corpus, read_karpathy
from lightningdot.encode import RegionSource, encode_regions, encode_texts
from lightningdot.errors import DataError
from lightningdot.evaluation.evaluate import evaluate_reranked
from lightningdot.evaluation.metrics import recall_metrics
from lightningdot.features import FeatureStore, RegionBatch, concat_batches
from lightningdot.index.vector import VectorIndex, priors_of
from lightningdot.model.checkpoint import load_model, load_reranker
from lightningdot.model.reranker import Reranker


@dataclass
class BenchReport:
    gallery: int
    queries: dict[str, int]  # how many queries each median is over
    ms_per_query: dict[str, float]  # medians
    speedup: dict[str, float]  # cross_full / each
    rerank_k: int
    recall: dict[str, dict] = field(default_factory=dict)  # metrics of dot and dot_rerank
    threads: int = field(default_factory=torch.get_num_threads)

    def to_json(self) -> dict:
        return asdict(self)


def _median_ms(fn, queries: list[str]) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.inference_mode()
def run_bench(
    reranker: Reranker,
    corpus: Corpus,
    regions: RegionBatch,
    rerank_k: int = 16,
    n_queries: int = 50,
    n_full_queries: int = 3,
    with_recall: bool = True,
) -> BenchReport:
    """Time the three ways of answering a text query over the corpus's images (see module doc)."""
    bi = reranker.eval().bi
    vectors = encode_regions(bi, regions.chunks(256)).numpy()
    items = [{"id": k} for k in corpus.keys()]
    index = VectorIndex.build(vectors, items, "bench", prior=priors_of(bi.bank)[0])
    k = min(rerank_k, index.count)
    rng = np.random.default_rng(0)
    pool = corpus.captions
    queries = [pool[i] for i in rng.permutation(len(pool))[: max(n_queries, n_full_queries)]]

    def dot(q: str):
        return index.search(bi.encode_text([q]).numpy(), 10)

    def dot_rerank(q: str):
        scores, ids = index.search(bi.encode_text([q]).numpy(), k)
        cand = torch.from_numpy(ids[0])
        fused = reranker.rerank_images(q, regions.select(cand), torch.from_numpy(scores[0]))
        return cand[torch.argsort(fused, descending=True)[:10]]

    every = torch.arange(len(regions))

    def cross_full(q: str):
        # The baseline has no index: the cross-attention model scores every image.
        cross = reranker.cross_scores(
            reranker.text_states([q]),
            reranker.image_states(regions),
            torch.zeros_like(every),
            every,
        )
        return every[torch.argsort(cross, descending=True)[:10]]

    dot(queries[0])  # first calls pay one-off costs (tokenizer, allocations)
    dot_rerank(queries[0])
    ms = {
        "dot": _median_ms(dot, queries[:n_queries]),
        "dot_rerank": _median_ms(dot_rerank, queries[:n_queries]),
        "cross_full": _median_ms(cross_full, queries[:n_full_queries]),
    }
    report = BenchReport(
        gallery=index.count,
        queries={"dot": n_queries, "dot_rerank": n_queries, "cross_full": n_full_queries},
        ms_per_query={name: round(v, 3) for name, v in ms.items()},
        speedup={
            "dot": round(ms["cross_full"] / ms["dot"], 1),
            "dot_rerank": round(ms["cross_full"] / ms["dot_rerank"], 1),
        },
        rerank_k=k,
    )
    if with_recall:
        text = encode_texts(bi, corpus.captions)
        report.recall["dot"] = recall_metrics(
            text, torch.from_numpy(vectors), corpus.caption_image, bi.bank
        )
        report.recall["dot_rerank"] = evaluate_reranked(
            reranker, corpus.captions, corpus.caption_image, regions, k
        )
    return report


def bench_split(
    annotations: Path,
    image_dir: Path,
    split: str = "test",
    model: str = "default",
    reranker: str = "default",
    features: Path | None = None,
    rerank_k: int = 16,
    n_queries: int = 50,
    n_full_queries: int = 3,
    with_recall: bool = True,
) -> BenchReport:
    """`ldot bench`: `run_bench` on one split's images, from `features` or else their files."""
    if min(rerank_k, n_queries, n_full_queries) < 1:
        raise DataError("--rerank, --queries and --full-queries must be >= 1")
    corpus = read_karpathy(annotations, split)
    net = load_model(model)
    cross = load_reranker(reranker, bi=net)
    store = FeatureStore(features) if features is not None else None
    source = RegionSource.of(net, store, image_dir)
    regions = concat_batches(list(source.batches(corpus.keys())))
    return run_bench(cross, corpus, regions, rerank_k, n_queries, n_full_queries, with_recall)
