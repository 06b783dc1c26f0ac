"""Are the region weights faithful, and what do they cost? A deletion test on Flickr8k val.

For each of N val images and its first caption, rank the image's regions by a method's weights,
delete the top m (remove them from the image encoder's input, as a False in the region mask
does), encode the image again and score it: by the dot product, and by the shipped re-ranker's
fused score. A faithful method loses far more score than deleting m regions at random. Methods:
`deletion-gradient` (`region_gradients`, from the region features), `state-similarity` (from
the states an index keeps), and random.

Cost: `Retriever.search_text(k=10)` with and without `explain`, on an index made as a user makes
one (`build_index` from the image files, keeping states: the state-similarity path) and on one
built from the feature store (the gradient path); medians over the queries, in one run.

    python benchmarks/explain_deletion.py [--n 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import commit, machine, table, write_section

from lightningdot.data import Corpus, read_karpathy
from lightningdot.explain import region_gradients, state_similarity
from lightningdot.features import FeatureStore
from lightningdot.index.build import build_index
from lightningdot.model.checkpoint import load_reranker
from lightningdot.retrieval import Retriever

ROOT = Path(__file__).resolve().parent.parent
DELETED = (4, 8, 16, 32, 48)


def scores(reranker, regions, queries, text) -> tuple[torch.Tensor, torch.Tensor]:
    """Dot products and re-ranked scores of image b with caption b."""
    bi = reranker.bi
    with torch.inference_mode():
        vectors, states = bi.encode_image_states(regions)
        dot = (vectors * queries).sum(-1)
        mask = torch.cat([regions.mask.new_ones(len(regions), 1), regions.mask], 1)
        b = torch.arange(len(regions))
        cross = reranker.cross_scores(text, (states, mask), b, b)
    return dot, reranker.fused_score(cross, dot)


def weights_of(reranker, regions, queries, text, seed: int = 0) -> dict[str, torch.Tensor]:
    bi = reranker.bi
    with torch.inference_mode():
        states = bi.image(regions)
    g = torch.Generator().manual_seed(seed)
    grads = [
        region_gradients(
            bi,
            regions.select(slice(i, i + 1)),
            queries[i : i + 1],
            reranker,
            (text[0][i : i + 1], text[1][i : i + 1]),
        )
        for i in range(len(regions))
    ]
    return {
        "deletion-gradient (dot product)": region_gradients(bi, regions, queries),
        "deletion-gradient (re-ranked score)": torch.cat(grads),
        "state-similarity": state_similarity(bi, states, queries),
        "random": torch.rand(regions.mask.shape, generator=g),
    }


def deletion_rows(reranker, regions, queries, text) -> tuple[list[list[str]], tuple]:
    full = scores(reranker, regions, queries, text)
    rows = []
    for name, w in weights_of(reranker, regions, queries, text).items():
        order = w.masked_fill(~regions.mask, float("-inf")).argsort(1, descending=True)
        cells = {"dot": [], "rerank": []}
        for m in DELETED:
            keep = regions.mask.clone()
            keep.scatter_(1, order[:, :m], False)
            dot, rr = scores(reranker, dataclasses.replace(regions, mask=keep), queries, text)
            cells["dot"].append(f"{(dot - full[0]).mean().item():+.4f}")
            cells["rerank"].append(f"{(rr - full[1]).mean().item():+.3f}")
        rows.append([name, "dot product", *cells["dot"]])
        rows.append([name, "re-ranked", *cells["rerank"]])
    return rows, full


def cost_rows(data: Path, features: Path, queries: list[str], n_index: int) -> list[list[str]]:
    corpus = Corpus(read_karpathy(data / "dataset_flickr8k.json", "val").images[:n_index])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, store in (("kept states (index --images)", None), ("feature store", features)):
            out = Path(tmp) / label.split()[0]
            reranker = load_reranker("default")
            st = FeatureStore(store) if store else None
            build_index(reranker.bi, "default", corpus, data / "images", out, features=st)
            r = Retriever.open(out, reranker="default")
            r.search_text(queries[:3], 10, explain=True)  # warm
            plain, why = [], []
            for q in queries:
                for sink, explain in ((plain, False), (why, True)):
                    t0 = time.perf_counter()
                    r.search_text([q], 10, explain=explain)
                    sink.append(1e3 * (time.perf_counter() - t0))
            method = r.search_text(queries[:1], 10, explain=True)[0].results[0].regions.method
            p, w = statistics.median(plain), statistics.median(why)
            rows.append([label, method, f"{p:.1f}", f"{w:.1f}", f"{w - p:.1f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--index-images", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus = read_karpathy(args.data / "dataset_flickr8k.json", "val")
    keys = corpus.keys()[: args.n]
    captions = [corpus.images[i].captions[0] for i in range(args.n)]
    regions = FeatureStore(args.features).batch(keys).to("cpu")
    reranker = load_reranker("default")
    with torch.inference_mode():
        queries = reranker.bi.encode_text(captions)
        text = reranker.text_states(captions)
    rows, full = deletion_rows(reranker, regions, queries, text)
    costs = cost_rows(args.data, args.features, captions[:40], args.index_images)
    n_regions = int(regions.mask.sum(1).float().mean())
    body = "\n".join(
        [
            "## Why a result matched: deletion test of the region weights (Flickr8k val)",
            "",
            f"Machine: {machine()}; commit {commit()}. {args.n} val images, each with its first "
            f"caption; {n_regions} regions per image. Each cell: the mean change of the score "
            "when the image's top-m regions by the method's weights are deleted and the image "
            f"is encoded again (mean full scores: dot product {full[0].mean().item():.3f}, "
            f"re-ranked {full[1].mean().item():.2f}). The shipped model and re-ranker. "
            "Reproduce: `python benchmarks/explain_deletion.py`.",
            "",
            table(["method", "score", *[f"m = {m}" for m in DELETED]], rows),
            "",
            f"Cost of `explain` on the top 10 of a text query (medians over {len(captions[:40])} "
            f"val captions, an index of {args.index_images} val images; ms per query):",
            "",
            table(["index", "method", "search", "search + explain", "added"], costs),
        ]
    )
    write_section("explain-deletion", body)
    print(body)


if __name__ == "__main__":
    main()
