"""The paper's headline on Flickr8k val: LightningDOT against cross-attention over the gallery.

Runs `ldot bench`'s measurement (lightningdot.evaluation.bench.run_bench) with the shipped model and
re-ranker: per text query, (a) encode + index search, (b) (a) + cross-attention re-rank of the
top K, (c) the cross-attention model scoring all 1,000 val images; medians per query, the
speed-ups (c)/(a) and (c)/(b), and the recalls of (a) and (b) over all val queries.

    python benchmarks/speedup.py [--rerank 16] [--queries 50] [--full-queries 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import commit, machine, table, write_section

from lightningdot.data import Corpus, read_karpathy
from lightningdot.evaluation.bench import run_bench
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_reranker

ROOT = Path(__file__).resolve().parent.parent


def fmt(m: dict) -> list[str]:
    return [f"{m[d][k]:.1f}" for d in ("t2i", "i2t") for k in ("r1", "r5", "r10")] + [
        f"{m['ar']:.1f}"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--rerank", type=int, default=16)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--full-queries", type=int, default=5)
    ap.add_argument("--galleries", type=int, nargs="+", default=[125, 250, 500])
    args = ap.parse_args()
    corpus = read_karpathy(args.data / "dataset_flickr8k.json", "val")
    regions = FeatureStore(args.features).batch(corpus.keys())
    reranker = load_reranker("default")
    rep = run_bench(reranker, corpus, regions, args.rerank, args.queries, args.full_queries)
    # The same measurement on the first N val images: how the ratio grows with the gallery.
    growth = []
    for n in [g for g in args.galleries if g < rep.gallery]:
        sub = run_bench(
            reranker,
            Corpus(corpus.images[:n]),
            regions.select(slice(0, n)),
            args.rerank,
            args.queries,
            args.full_queries,
            with_recall=False,
        )
        growth.append(sub)
        print(sub.to_json(), flush=True)
    growth.append(rep)
    print(json.dumps(rep.to_json(), indent=1))
    ms, sp = rep.ms_per_query, rep.speedup
    body = "\n".join(
        [
            f"## Speed-up over cross-attention ranking (Flickr8k val, {rep.gallery:,} images)",
            "",
            f"Machine: {machine()}; commit {commit()}. Medians per text query "
            f"({rep.queries['dot']} queries; {rep.queries['cross_full']} for the full "
            "cross-attention ranking). Reproduce: `python benchmarks/speedup.py` "
            "(the same measurement as `ldot bench`).",
            "",
            table(
                ["method", "ms / query", "speed-up vs (c)"],
                [
                    [
                        "(a) LightningDOT: encode + index search",
                        f"{ms['dot']:.2f}",
                        f"{sp['dot']:,.0f}x",
                    ],
                    [
                        f"(b) (a) + cross-attention re-rank of the top {rep.rerank_k}",
                        f"{ms['dot_rerank']:.1f}",
                        f"{sp['dot_rerank']:,.0f}x",
                    ],
                    ["(c) cross-attention model over every image", f"{ms['cross_full']:.0f}", "1x"],
                ],
            ),
            "",
            "As the gallery grows (the first N val images; same queries, same code):",
            "",
            table(
                ["gallery", "(a) ms", "(c) ms", "speed-up (c)/(a)", "(b) ms", "speed-up (c)/(b)"],
                [
                    [
                        f"{r.gallery:,}",
                        f"{r.ms_per_query['dot']:.2f}",
                        f"{r.ms_per_query['cross_full']:.0f}",
                        f"{r.speedup['dot']:,.0f}x",
                        f"{r.ms_per_query['dot_rerank']:.1f}",
                        f"{r.speedup['dot_rerank']:,.0f}x",
                    ]
                    for r in growth
                ],
            ),
            "",
            "Recall on all 5,000 val captions and 1,000 images:",
            "",
            table(
                ["method", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10", "AR"],
                [
                    ["(a) dot product", *fmt(rep.recall["dot"])],
                    [f"(b) + re-rank top {rep.rerank_k}", *fmt(rep.recall["dot_rerank"])],
                ],
            ),
        ]
    )
    write_section("speedup", body)
    print(body)


if __name__ == "__main__":
    main()
