"""The three LightningDOT objectives and the re-ranker's, as pure functions of tensors returning
named loss terms.

The model computes the inputs (fused states through the heads); these functions only score
them, so each can be checked by hand on tiny tensors. They always compute in float32, also
inside a bfloat16 autocast region (`lightningdot.precision.in_float32`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightningdot.precision import in_float32

IGNORE = -100  # label of a token VMLM does not predict


def add_global_state(states: torch.Tensor, global_vector: torch.Tensor) -> torch.Tensor:
    """Add one modality's global vector to every token state of the other.

    VMLM adds the image's [IMG] output to every text token before the MLM head; SMRM adds the
    text's [CLS] output to every region before the region heads.

    Args:
        states: (B, T, H) token or region states.
        global_vector: (B, H) the other modality's global state.
    """
    return states + global_vector.unsqueeze(1)


@in_float32
def vmlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Visual-embedding fused masked language modelling.

    Args:
        logits: (B, T, V) vocabulary scores from the fused token states.
        labels: (B, T) original token ids at masked positions, `IGNORE` elsewhere.

    Returns:
        {"vmlm": mean cross-entropy over masked tokens} (0 when nothing is masked).
    """
    if not (labels != IGNORE).any():
        return {"vmlm": logits.sum() * 0.0}
    return {"vmlm": F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)}


@in_float32
def smrm_loss(
    predicted_features: torch.Tensor,
    target_features: torch.Tensor,
    predicted_logits: torch.Tensor,
    target_distribution: torch.Tensor | None,
    masked: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Semantic-embedding fused masked region modelling.

    Args:
        predicted_features: (B, R, D) regressed features from the fused region states.
        target_features: (B, R, D) the backbone's features of the regions.
        predicted_logits: (B, R, C) class scores from the fused region states.
        target_distribution: (B, R, C) the backbone's class distribution per region, or None.
        masked: (B, R) True where a region was masked; only those are scored.

    Returns:
        {"smrm_mrfr": mean squared error per masked region (summed over D, averaged over regions),
         "smrm_kl": KL(target || predicted) per masked region} (the second only with targets).
    """
    m = masked.bool()
    n = m.sum().clamp_min(1)
    sq = (predicted_features - target_features).pow(2).mean(-1)  # (B, R)
    out = {"smrm_mrfr": (sq * m).sum() / n}
    if target_distribution is not None:
        log_p = predicted_logits.log_softmax(-1)
        q = target_distribution
        kl = (q * (q.clamp_min(1e-12).log() - log_p)).sum(-1)  # (B, R); 0 log 0 = 0
        out["smrm_kl"] = (kl * m).sum() / n
    return out


@in_float32
def cmr_loss(
    text_vectors: torch.Tensor,
    image_vectors: torch.Tensor,
    logit_scale: torch.Tensor,
    hard_negative_images: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Cross-modal retrieval: bi-directional InfoNCE over in-batch negatives.

    Text i and image i are a pair; every other image in the batch is a negative for text i and
    every other text a negative for image i.

    Args:
        text_vectors: (B, E) text vectors.
        image_vectors: (B, E) image vectors, row i the image of text i.
        logit_scale: scalar log of the inverse temperature (scores are exp(logit_scale) * dot).
        hard_negative_images: (B, K, E) extra negative images for each text, or None.

    Returns:
        {"cmr_t2i": text->image cross-entropy, "cmr_i2t": image->text cross-entropy}.
    """
    scale = logit_scale.exp()
    logits = scale * text_vectors @ image_vectors.T  # (B, B): texts x images
    target = torch.arange(logits.shape[0], device=logits.device)
    t2i_logits = logits
    if hard_negative_images is not None:
        hard = scale * torch.einsum("be,bke->bk", text_vectors, hard_negative_images)
        t2i_logits = torch.cat([logits, hard], dim=1)
    return {
        "cmr_t2i": F.cross_entropy(t2i_logits, target),
        "cmr_i2t": F.cross_entropy(logits.T, target),
    }


@in_float32
def itm_loss(t2i_logits: torch.Tensor, i2t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The re-ranker's image-text matching loss: listwise softmax over each query's candidates.

    Args:
        t2i_logits: (Q, 1 + n) cross scores of a caption with its image (column 0) and n
            hard-negative images.
        i2t_logits: (P, 1 + n) cross scores of an image with one of its captions (column 0) and
            n hard-negative captions.
    """

    def listwise(logits: torch.Tensor) -> torch.Tensor:
        target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target)

    return {"itm_t2i": listwise(t2i_logits), "itm_i2t": listwise(i2t_logits)}
