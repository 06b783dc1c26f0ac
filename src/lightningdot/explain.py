"""Why a result matched: a weight for each region of an image, and for each token of a caption.

A region's weight is the first-order effect of deleting it on the score the result was ranked
by: the gradient of the score with respect to a gate on the region, where a gate of 1 leaves
the region as encoded and 0 removes it from every attention and mean of the image encoder (and
of the re-ranker, when re-ranking), as `ImageEncoder.gated_states` defines. One forward and one
backward pass of the small image encoder explain a batch of results, and deletion is the test
of faithfulness: removing the regions with the largest weights lowers the score far more than
removing as many at random (`benchmarks/explain_deletion.py`).

A caption token's weight is exact: a caption's vector is a linear map of the mean of its token
states, so its dot product with an image is a sum of one term per token (plus the maps' biases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightningdot.errors import DataError
from lightningdot.features.regions import RegionBatch, grid_boxes
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.pooling import join_views
from lightningdot.model.reranker import Reranker


@dataclass
class RegionWeights:
    """The regions of one image and what each did for the score."""

    boxes: list[tuple[float, float, float, float]]  # x1, y1, x2, y2, normalised to the image
    # What each did for the score: with "deletion-gradient", the score it would take away if
    # deleted, to first order; with "state-similarity", its state's cosine with the query.
    weights: list[float]
    method: str = "deletion-gradient"


@dataclass
class TokenWeights:
    """The tokens of one caption (word pieces, as the tokenizer splits them) and their share
    of its dot product with an image."""

    tokens: list[str]
    weights: list[float]
    bias: float  # the share of the projections' biases: weights + bias = the dot product


def _scores(bi, regions, gate, queries, reranker, text):
    states = bi.image.gated_states(regions, gate)
    vectors = join_views(bi.image.views(states, regions, gate))
    dot = (vectors * queries).sum(-1)
    if reranker is None:
        return dot
    image_mask = torch.cat([gate.new_ones(len(gate), 1), gate * regions.mask], 1)
    pairs = torch.zeros(len(gate), dtype=torch.long), torch.arange(len(gate))
    cross = reranker.cross_scores(text, (states, image_mask), *pairs)
    # The fused score, with the dot product as the search ranked it (vectors x query).
    return reranker.fused_score(cross, dot)


def main_view(bi: BiEncoder, vectors: torch.Tensor) -> torch.Tensor:
    """The main vectors alone: what the encoders' weights explain (a concept view's
    coordinates, after them, come from the backbone's classifier instead)."""
    return vectors[..., : bi.cfg.vector_dim]


def region_gradients(
    bi: BiEncoder,
    regions: RegionBatch,
    queries: torch.Tensor,
    reranker: Reranker | None = None,
    text: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, R) gradient of each image's score with respect to its region gates, at 1.

    The score is the dot product of image b with `queries[b]` (B, D), or with a `reranker`,
    its re-ranked score against one caption whose states and mask are `text`. Padded regions
    get 0."""
    # Searches run in inference mode, whose tensors autograd cannot record: copies of them.
    with torch.inference_mode(False), torch.enable_grad():
        regions = RegionBatch(*(t.clone() for t in (regions.features, regions.boxes, regions.mask)))
        regions = regions.to(bi.logit_scale.device)
        text = None if text is None else tuple(t.clone() for t in text)
        gate = torch.ones(regions.mask.shape, requires_grad=True)
        queries = main_view(bi, queries).float().clone()
        score = _scores(bi, regions, gate, queries, reranker, text)
        (grad,) = torch.autograd.grad(score.sum(), gate)
    return grad * regions.mask


def region_weights(regions: RegionBatch, grads: torch.Tensor) -> list[RegionWeights]:
    """`region_gradients` of a batch -> each image's real regions with their boxes."""
    out = []
    for b in range(len(grads)):
        real = regions.mask[b].bool()
        boxes = regions.boxes[b, real, :4].float().tolist()
        out.append(RegionWeights([tuple(x) for x in boxes], grads[b, real].tolist()))
    return out


@torch.inference_mode()
def token_weights(bi: BiEncoder, captions: list[str], images: torch.Tensor) -> list[TokenWeights]:
    """Each caption's tokens and their terms of its dot product with `images[i]` (C, D).

    With mean pooling, view j of a caption is W_j mean_t(h_t) + b_j, scaled to unit length by
    n_j, so its dot product with the image's view v_j is sum_t (W_j h_t) . v_j / (T n_j) plus
    b_j . v_j / n_j. (With [CLS] pooling, the first token carries the whole score.)"""
    batch = bi.tokenize(captions)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = main_view(bi, images)
    states = bi.text(ids, mask)
    pooled = bi.text.pool(states, mask)
    heads = [bi.text.proj] if bi.text.pooled_proj is None else [bi.text.proj, bi.text.pooled_proj]
    # Joined vectors are scaled by 1 / sqrt(views) on both sides (`join_views`).
    views = (images.float() * math.sqrt(len(heads))).split([h.out_features for h in heads], -1)
    per_token, bias = torch.zeros(mask.shape), torch.zeros(len(captions))
    for head, view in zip(heads, views, strict=True):
        scaled = view / head(pooled).norm(dim=-1, keepdim=True) / len(heads)
        per_token += torch.einsum("cth,dh,cd->ct", states, head.weight, scaled)
        bias += (head.bias * scaled).sum(-1)
    if bi.text.cfg.pooling == "mean":
        per_token = per_token * mask / mask.sum(1, keepdim=True)
    else:
        per_token[:, 1:] = 0
    out = []
    for c in range(len(captions)):
        n = int(mask[c].sum())
        tokens = bi.tokenizer.convert_ids_to_tokens(ids[c, :n].tolist())
        out.append(TokenWeights(tokens, per_token[c, :n].tolist(), float(bias[c])))
    return out


def state_similarity(bi: BiEncoder, states: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(B, 1 + R, H) image states (as an index keeps them) and (B, D) query vectors -> (B, R):
    the cosine of each region's state, through the transformer view's projection, with the
    query's transformer view. What kept states allow without the region features (no
    gradient through the image encoder): less faithful than `region_gradients`, and far more
    than chance (`benchmarks/explain_deletion.py`)."""
    regions = torch.nn.functional.normalize(bi.image.proj(states[:, 1:].float()), dim=-1)
    view = torch.nn.functional.normalize(queries[:, : bi.image.proj.out_features].float(), dim=-1)
    return (regions * view[:, None]).sum(-1)


def grid_of(n_regions: int) -> torch.Tensor:
    """The (R, 7) boxes of a square grid of R cells, as the grid backbones place regions.

    Raises:
        DataError: R is not a square (the regions came from a detector: their boxes are in
            the feature store, not in kept states)."""
    side = math.isqrt(n_regions)
    if side * side != n_regions:
        raise DataError(
            f"{n_regions} regions are not a grid: explaining detector regions needs the "
            "feature store that holds their boxes"
        )
    return grid_boxes(side, side)


def explain_regions(
    bi: BiEncoder,
    query: torch.Tensor,
    regions: RegionBatch | None = None,
    states: tuple[torch.Tensor, torch.Tensor] | None = None,
    reranker: Reranker | None = None,
    text: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[RegionWeights]:
    """The region weights of B images for one query vector (D,): from
    their `regions` by `region_gradients` (of the re-ranked score, given a `reranker` and the
    query's `text` states), else from their kept `states` (states, mask) by `state_similarity`
    (of the dot product)."""
    queries = query.float()[None].expand(len(regions if regions is not None else states[0]), -1)
    if regions is not None:
        grads = region_gradients(bi, regions, queries, reranker, text)
        return region_weights(regions, grads)
    kept, mask = states
    weights = state_similarity(bi, kept, queries)
    out = []
    for b in range(len(kept)):
        n = int(mask[b].sum()) - 1
        boxes = [tuple(x) for x in grid_of(n)[:, :4].tolist()]
        out.append(RegionWeights(boxes, weights[b, :n].tolist(), "state-similarity"))
    return out
