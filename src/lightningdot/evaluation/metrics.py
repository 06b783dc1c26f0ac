"""Recall@K in both directions and AR, from vectors or from each query's rank.

Text->image: every caption is a query; a hit at K when its image ranks in the top K.
Image->text: every image is a query; a hit at K when any of its captions ranks in the top K.
AR is the mean of the six recalls. Ranks are computed block by block, so the full
caption x image score matrix never needs to be held at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lightningdot.errors import DataError
from lightningdot.model.prior import QueryBank, gallery_side, hub_prior, query_side
from lightningdot.precision import in_float32

KS = (1, 5, 10)


def t2i_ranks(
    text: torch.Tensor, image: torch.Tensor, caption_image: torch.Tensor, block: int = 4096
) -> torch.Tensor:
    """0-based rank of each caption's own image among all images: (Q,).

    Ties count against the query (an image scoring equal to the right one ranks above it), so a
    degenerate model cannot look good.
    """
    out = []
    for s in range(0, len(text), block):
        scores = text[s : s + block] @ image.T  # (b, G)
        own = scores.gather(1, caption_image[s : s + block, None])
        out.append((scores >= own).sum(1) - 1)
    return torch.cat(out)


def i2t_ranks(
    text: torch.Tensor, image: torch.Tensor, caption_image: torch.Tensor, block: int = 1024
) -> torch.Tensor:
    """0-based rank of the best-ranked own caption of each image among all captions: (G,)."""
    out = []
    for s in range(0, len(image), block):
        scores = image[s : s + block] @ text.T  # (b, Q)
        ids = torch.arange(s, s + scores.shape[0])
        own = caption_image[None, :] == ids[:, None]  # (b, Q) True at the image's captions
        best_own = scores.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
        # Rank of the best own caption: the captions that are not its own and score >= it.
        out.append(((scores >= best_own) & ~own).sum(1))
    return torch.cat(out)


def directed(
    text: torch.Tensor,
    image: torch.Tensor,
    bank: QueryBank | None = None,
    queries: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The (text, image) vectors each direction scores with: (t2i pair, i2t pair).

    `queries`: the same texts and images as queries (`BiEncoder.as_query`), when a model's
    queries differ from its items. With a query bank, the gallery side of each direction
    carries its items' priors (images for t2i, captions for i2t) and the query side a 1, as an
    index built with the bank stores them.
    """
    text, image = text.float(), image.float()
    text_q, image_q = (q.float() for q in queries) if queries is not None else (text, image)
    if bank is None:
        return (text_q, image), (text, image_q)
    images = gallery_side(image, hub_prior(image, bank.text, bank.beta))
    captions = gallery_side(text, hub_prior(text, bank.image, bank.beta))
    return (query_side(text_q), images), (captions, query_side(image_q))


@in_float32
def recall_metrics(
    text: torch.Tensor,
    image: torch.Tensor,
    caption_image: Sequence[int] | torch.Tensor,
    bank: QueryBank | None = None,
    queries: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """Recall@1/5/10 (percent) both ways and AR, in the JSON layout `ldot evaluate` writes;
    with `bank`, ranked by dot product + query-bank prior; `queries` as for `directed`."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    if len(text) != len(caption_image):
        raise ValueError("one image index per caption is needed")
    if len(image) == 0 or len(text) == 0:
        raise DataError("cannot evaluate without images and captions")
    t2i, i2t = directed(text, image, bank, queries)
    return metrics_from_ranks(t2i_ranks(*t2i, caption_image), i2t_ranks(*i2t, caption_image))


def metrics_from_ranks(t2i: torch.Tensor, i2t: torch.Tensor) -> dict:
    """0-based ranks of every caption query (t2i) and image query (i2t) -> the metrics dict."""
    res = {
        "t2i": {f"r{k}": 100.0 * (t2i < k).float().mean().item() for k in KS},
        "i2t": {f"r{k}": 100.0 * (i2t < k).float().mean().item() for k in KS},
    }
    res["ar"] = sum(res[d][f"r{k}"] for d in ("t2i", "i2t") for k in KS) / (2 * len(KS))
    res["n_images"] = len(i2t)
    res["n_captions"] = len(t2i)
    return res


# (query ids (q,), candidate ids (q, K), their dot scores (q, K)) -> re-ranked scores (q, K)
Rescore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reranked_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    is_own: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dot_ranks: torch.Tensor,
    k: int,
    rescore: Rescore,
    block: int = 256,
) -> torch.Tensor:
    """0-based rank of each query's best own item after re-scoring its top K by dot product.

    `is_own(query ids (q,), candidate ids (q, K))` marks the right answers. A query whose answers
    are all outside the top K keeps its dot-product rank (at least K): re-ranking cannot reach it.
    """
    k = min(k, len(gallery))
    out = []
    for s in range(0, len(queries), block):
        qid = torch.arange(s, min(s + block, len(queries)))
        dot = queries[qid] @ gallery.T
        top, cand = dot.topk(k, dim=1)
        order = torch.sort(rescore(qid, cand, top), dim=1, descending=True, stable=True).indices
        own = is_own(qid, cand.gather(1, order))  # (q, K) in re-ranked order
        first = torch.where(own.any(1), own.float().argmax(1), k)
        out.append(torch.where(own.any(1), first, dot_ranks[qid].clamp_min(k)))
    return torch.cat(out)


@in_float32
def reranked_metrics(
    text: torch.Tensor,
    image: torch.Tensor,
    caption_image: Sequence[int] | torch.Tensor,
    k: int,
    rescore_t2i: Rescore,
    rescore_i2t: Rescore,
    bank: QueryBank | None = None,
    with_ranks: bool = False,
) -> dict:
    """`recall_metrics` after re-ranking each query's top K with the given scorers (whose dot
    scores include the priors, with `bank`); `with_ranks` adds each query's 0-based rank as
    "ranks": {"t2i": (captions,), "i2t": (images,)}."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    (t_text, t_image), (i_text, i_image) = directed(text, image, bank)
    t2i = reranked_ranks(
        t_text,
        t_image,
        lambda q, c: c == caption_image[q, None],
        t2i_ranks(t_text, t_image, caption_image),
        k,
        rescore_t2i,
    )
    i2t = reranked_ranks(
        i_image,
        i_text,
        lambda q, c: caption_image[c] == q[:, None],
        i2t_ranks(i_text, i_image, caption_image),
        k,
        rescore_i2t,
    )
    metrics = metrics_from_ranks(t2i, i2t)
    if with_ranks:
        metrics["ranks"] = {"t2i": t2i, "i2t": i2t}
    return metrics
