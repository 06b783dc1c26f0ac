"""Which first answers re-ranking changes, on Flickr8k val, and whether the change is more than
chance.

A difference of half a point of R@1 over 1,000 image queries is five queries: this counts, per
direction, the queries whose right answer re-ranking brings to rank 1 ("fixed") and those it
takes away from rank 1 ("broken"), with an exact two-sided sign test on the two counts (under
no effect, each changed query is equally likely to go either way).

    python benchmarks/rerank_changes.py [--rerank 16]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from report import commit, machine, table, write_section

from lightningdot.data import read_karpathy
from lightningdot.encode import encode_regions, encode_texts
from lightningdot.evaluation.evaluate import evaluate_reranked
from lightningdot.evaluation.metrics import directed, i2t_ranks, t2i_ranks
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_reranker

ROOT = Path(__file__).resolve().parent.parent


def sign_test(a: int, b: int) -> float:
    """Two-sided exact binomial p-value of a vs b successes at p = 1/2."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    ap.add_argument("--rerank", type=int, default=16)
    args = ap.parse_args()
    corpus = read_karpathy(args.data / "dataset_flickr8k.json", "val")
    regions = FeatureStore(args.features).batch(corpus.keys())
    reranker = load_reranker("default")
    bi = reranker.bi
    owner = torch.as_tensor(corpus.caption_image)
    with torch.inference_mode():
        text = encode_texts(bi, corpus.captions)
        image = encode_regions(bi, regions.chunks(256))
        (t_text, t_image), (i_text, i_image) = directed(text, image, bi.bank)
        before = {
            "t2i": t2i_ranks(t_text, t_image, owner),
            "i2t": i2t_ranks(i_text, i_image, owner),
        }
    after = evaluate_reranked(
        reranker, corpus.captions, owner, regions, args.rerank, with_ranks=True
    )["ranks"]
    rows = []
    for direction, label in (("t2i", "text->image"), ("i2t", "image->text")):
        b, a = before[direction], after[direction]
        fixed = int(((b > 0) & (a == 0)).sum())
        broken = int(((b == 0) & (a > 0)).sum())
        rows.append(
            [
                label,
                f"{len(b):,}",
                f"{100 * (b == 0).float().mean():.1f}",
                f"{100 * (a == 0).float().mean():.1f}",
                str(fixed),
                str(broken),
                f"{sign_test(fixed, broken):.3g}",
            ]
        )
    body = "\n".join(
        [
            f"## Re-ranking the top {args.rerank}: which first answers change (Flickr8k val)",
            "",
            f"Machine: {machine()}; commit {commit()}. The shipped model with its prior, then "
            "the shipped re-ranker. Fixed: the right answer moves to rank 1; broken: it leaves "
            "rank 1. p: exact two-sided sign test on fixed vs broken. "
            "Reproduce: `python benchmarks/rerank_changes.py`.",
            "",
            table(
                ["direction", "queries", "R@1 dot", "R@1 re-ranked", "fixed", "broken", "p"],
                rows,
            ),
        ]
    )
    write_section("rerank-changes", body)
    print(body)


if __name__ == "__main__":
    main()
