"""What re-ranking the first stage's top K buys on Flickr8k val, scorer by scorer, and why so little.

Every query's top 32 by the shipped model's dot product + prior is scored once by the shipped
re-ranker's cross-attention model (and by the multilingual model's text side, a second opinion
over the same image vectors); each row then ranks the top K by one combination of those scores.
Weights marked "2-fold" are chosen on one half of the val images (their captions as queries too)
and applied to the other half, so no query is ranked with a weight fitted on it. p: exact sign
test of the queries each row fixes (right answer newly at rank 1) against those it breaks.

The second table is the diagnosis: the same models on 1,000 training images. The re-ranker is
trained on the bi-encoder's states of the training images, where the bi-encoder has seen every
pair; there its first answers are far more often right than on val, and the cross model learns
to fix a first stage unlike the one it meets at query time.

    python benchmarks/rerank_ablation.py
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from report import commit, machine, table, write_section
from rerank_changes import sign_test

from lightningdot.data import Corpus, read_karpathy
from lightningdot.encode import encode_texts
from lightningdot.evaluation.metrics import directed, metrics_from_ranks
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_model, load_reranker
from lightningdot.model.reranker import (
    Reranker,
    caption_states,
    gallery_states,
    vectors_of_states,
)

ROOT = Path(__file__).resolve().parent.parent
TOP = 32  # every row re-ranks a prefix of these
GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class Lists:
    """One direction's queries: their top TOP candidates by dot + prior, in that order."""

    own: torch.Tensor  # (Q, TOP) bool: the candidate is a right answer
    dot_rank: torch.Tensor  # (Q,) 0-based rank of the first right answer by dot + prior
    scores: dict[str, torch.Tensor]  # name -> (Q, TOP) logits: "dot", "cross", "ml"
    half: torch.Tensor  # (Q,) 0 or 1: which half of the images the query belongs to


def top_lists(queries, gallery, is_own, block: int = 512):
    """(Q, TOP) candidates and dot scores, the own mask, and each query's dot rank."""
    cands, dots, owns, ranks = [], [], [], []
    for s in range(0, len(queries), block):
        q = torch.arange(s, min(s + block, len(queries)))
        scores = queries[q] @ gallery.T
        own_all = is_own(q[:, None], torch.arange(len(gallery))[None, :])
        best = scores.masked_fill(~own_all, float("-inf")).max(1, keepdim=True).values
        ranks.append(((scores >= best) & ~own_all).sum(1))
        top, cand = scores.topk(TOP, dim=1)
        cands.append(cand), dots.append(top), owns.append(is_own(q[:, None], cand))
    return torch.cat(cands), torch.cat(dots), torch.cat(owns), torch.cat(ranks)


@torch.inference_mode()
def direction_lists(rr: Reranker, ml_text, corpus: Corpus, regions, bi) -> dict[str, Lists]:
    texts, images = caption_states(rr, corpus.captions), gallery_states(rr, regions)
    text, image = vectors_of_states(bi, texts, images, regions)
    owner = torch.as_tensor(corpus.caption_image)
    (t_text, t_image), (i_text, i_image) = directed(text, image, bi.bank)
    scale = bi.logit_scale.exp()
    half_of_image = torch.arange(len(image)) % 2
    out = {}
    for name, q, g in (("t2i", t_text, t_image), ("i2t", i_image, i_text)):
        if name == "t2i":
            cand, dot, own, rank = top_lists(q, g, lambda a, b: owner[a] == b)
            caps, imgs = torch.arange(len(q))[:, None].expand_as(cand), cand
        else:
            cand, dot, own, rank = top_lists(q, g, lambda a, b: owner[b] == a)
            caps, imgs = cand, torch.arange(len(q))[:, None].expand_as(cand)
        cross = rr.cross_scores(texts, images, caps.flatten(), imgs.flatten()).view_as(dot)
        ml = (ml_text[caps] * image[imgs]).sum(-1)
        half = half_of_image[owner] if name == "t2i" else half_of_image
        out[name] = Lists(
            own, rank, {"dot": dot * scale, "cross": cross.float(), "ml": ml * scale}, half
        )
    return out


def ranks_after(lists: Lists, k: int, weights: dict[str, float]) -> torch.Tensor:
    """Each query's rank once its top k are re-scored by sum(weight x score)."""
    score = sum(w * lists.scores[n][:, :k] for n, w in weights.items() if w)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    own = lists.own[:, :k].gather(1, order)
    hit = own.any(1)
    return torch.where(hit, own.float().argmax(1), lists.dot_rank.clamp_min(k))


def cross_fitted(lists: Lists, k: int, grid: list[dict[str, float]]) -> torch.Tensor:
    """Ranks with the weights that maximise mean reciprocal rank on the other half."""
    out = torch.empty_like(lists.dot_rank)
    for h in (0, 1):
        fit, use = lists.half != h, lists.half == h
        best = max(grid, key=lambda w: (1 / (1 + ranks_after(lists, k, w)[fit].float())).mean())
        out[use] = ranks_after(lists, k, best)[use]
    return out


Row = tuple[str, int, Callable[[Lists], torch.Tensor]]


def rows_of(shipped_fusion: float) -> list[Row]:
    """The ablation: (label, K, lists -> ranks)."""
    fused = {"cross": 1.0, "dot": shipped_fusion}
    fusion_grid = [{"cross": 1.0, "dot": w} for w in GRID]
    ml_grid = [
        {"cross": c, "dot": d, "ml": m}
        for c, d, m in itertools.product((0.0, 1.0), GRID, (0.0, 1.0, 2.0, 4.0, 8.0))
        if c or d or m
    ]
    return [
        ("first stage: dot + prior", 0, lambda ls: ls.dot_rank),
        ("cross-attention logit alone", 16, lambda ls: ranks_after(ls, 16, {"cross": 1.0})),
        (f"shipped: cross + {shipped_fusion:g} x dot", 8, lambda ls: ranks_after(ls, 8, fused)),
        (f"shipped: cross + {shipped_fusion:g} x dot", 16, lambda ls: ranks_after(ls, 16, fused)),
        (f"shipped: cross + {shipped_fusion:g} x dot", 32, lambda ls: ranks_after(ls, 32, fused)),
        ("cross + w x dot, w 2-fold", 16, lambda ls: cross_fitted(ls, 16, fusion_grid)),
        (
            "dot + multilingual dot, weight 2-fold",
            16,
            lambda ls: cross_fitted(ls, 16, [w for w in ml_grid if not w["cross"]]),
        ),
        ("cross + dot + multilingual dot, 2-fold", 16, lambda ls: cross_fitted(ls, 16, ml_grid)),
        ("cross + dot + multilingual dot, 2-fold", 32, lambda ls: cross_fitted(ls, 32, ml_grid)),
    ]


def change(before: torch.Tensor, after: torch.Tensor) -> str:
    fixed, broken = (
        int(((before > 0) & (after == 0)).sum()),
        int(((before == 0) & (after > 0)).sum()),
    )
    return f"{fixed}/{broken} ({sign_test(fixed, broken):.2g})"


def ablation_table(lists: dict[str, Lists], rows: list[Row]) -> str:
    body = []
    base = {d: ls.dot_rank for d, ls in lists.items()}
    for label, k, ranks in rows:
        r = {d: ranks(ls) for d, ls in lists.items()}
        m = metrics_from_ranks(r["t2i"], r["i2t"])
        body.append(
            [
                label,
                str(k) if k else "-",
                f"{m['t2i']['r1']:.1f}",
                f"{m['i2t']['r1']:.1f}",
                f"{m['ar']:.1f}",
                f"{m['ar'] - metrics_from_ranks(base['t2i'], base['i2t'])['ar']:+.1f}",
                change(base["t2i"], r["t2i"]),
                change(base["i2t"], r["i2t"]),
            ]
        )
    head = ["scorer", "K", "t2i R@1", "i2t R@1", "AR", "AR gain", "t2i fixed/broken (p)"]
    return table([*head, "i2t fixed/broken (p)"], body)


def split_corpus(data: Path, split: str, limit: int) -> Corpus:
    corpus = read_karpathy(data / "dataset_flickr8k.json", split)
    return Corpus(corpus.images[:limit])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--features", type=Path, default=ROOT / ".cache/features/flickr8k-lite2")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rr = load_reranker("default")
    bi, ml = rr.bi, load_model("multilingual")
    store = FeatureStore(args.features)
    found = {}
    for split in ("val", "train"):
        corpus = split_corpus(args.data, split, 1000)
        with torch.inference_mode():
            ml_text = encode_texts(ml, corpus.captions).float()
        lists = direction_lists(rr, ml_text, corpus, store.batch(corpus.keys()), bi)
        found[split] = lists
    diag = []
    for split, lists in found.items():
        r = {d: ranks_after(ls, 16, {"cross": 1.0}) for d, ls in lists.items()}
        for label, ranks in (
            ("dot + prior", {d: ls.dot_rank for d, ls in lists.items()}),
            ("cross alone, top 16", r),
        ):
            m = metrics_from_ranks(ranks["t2i"], ranks["i2t"])
            diag.append(
                [split, label, f"{m['t2i']['r1']:.1f}", f"{m['i2t']['r1']:.1f}", f"{m['ar']:.1f}"]
            )
    body = "\n".join(
        [
            "## Re-ranking ablation: what each scorer of the top K buys (Flickr8k val)",
            "",
            f"Machine: {machine()}; commit {commit()}. First stage: the shipped `default` with "
            "its prior; cross: the shipped re-ranker's logit; multilingual dot: the shipped "
            "`multilingual` text side against the same image vectors. 2-fold: weights chosen "
            "on the other half of the images (grid search, mean reciprocal rank). Fixed/broken: "
            "queries whose right answer reaches / leaves rank 1, with the sign test's p. "
            "Reproduce: `python benchmarks/rerank_ablation.py`.",
            "",
            ablation_table(found["val"], rows_of(rr.cfg.fusion)),
            "",
            "The same models on the first 1,000 training images (which the bi-encoder and the "
            "re-ranker were trained on) and on val:",
            "",
            table(["images", "ranking", "t2i R@1", "i2t R@1", "AR"], diag),
        ]
    )
    write_section("rerank-ablation", body)
    print(body)


if __name__ == "__main__":
    main()
