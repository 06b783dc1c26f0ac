"""Cross-attention re-ranking of the bi-encoder's top K.

    query -> bi-encoder -> index top K -> CrossEncoder(caption tokens ; [IMG] + regions) -> top M

The cross-attention model is single-stream: one transformer attends across the caption's token
states and the image's [IMG] + region states, and an image-text matching (ITM) head on the first
token gives the score. It reads the states the bi-encoder already computes, as ALBEF and METER
put fusion layers on top of unimodal encoders, so that a CPU can train it in minutes and the
shipped copy holds only its own few layers. It is tied to the bi-encoder it was trained on, and
`load_reranker` refuses any other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertModel

from lightningdot.checkpoint import (
    FORMAT,
    load_model,
    load_state_into,
    model_identity,
    read_config_json,
)
from lightningdot.config import BertSize, RerankerConfig, from_dict, to_dict
from lightningdot.encoders import BiEncoder, bert_config
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features import RegionBatch
from lightningdot.io import write_json, write_safetensors

SHIPPED = {"default": "default-reranker"}  # re-ranker name -> folder under lightningdot/weights


class CrossEncoder(nn.Module):
    """A transformer over [caption token states ; image states] with an ITM head."""

    def __init__(self, cfg: RerankerConfig, size: BertSize) -> None:
        super().__init__()
        self.cfg = cfg
        h = size.hidden_size
        # One position for every token: the input states already carry the caption's word
        # order, and regions are a set. Segment 0 marks text, 1 the image, as in UNITER.
        layers = BertSize(h, cfg.num_layers, size.num_heads, size.intermediate_size, 1, 1)
        self.bert = BertModel(bert_config(layers, cfg.dropout), add_pooling_layer=False)
        self.bert.embeddings.word_embeddings.requires_grad_(False)  # inputs come as states
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))

    def init_from_text(self, text_bert: BertModel) -> None:
        """Start the fusion layers from the text encoder's top layers."""
        emb, src = self.bert.embeddings, text_bert.embeddings
        emb.LayerNorm.load_state_dict(src.LayerNorm.state_dict())
        emb.token_type_embeddings.weight.data.copy_(src.token_type_embeddings.weight)
        top = text_bert.encoder.layer[-len(self.bert.encoder.layer) :]
        for mine, theirs in zip(self.bert.encoder.layer, top, strict=True):
            mine.load_state_dict(theirs.state_dict())

    def forward(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        image_states: torch.Tensor,
        image_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(N, T, H), (N, T), (N, 1 + R, H), (N, 1 + R) -> (N,) matching logits of N pairs."""
        x = torch.cat([text_states, image_states], dim=1)
        mask = torch.cat([text_mask, image_mask], dim=1).long()
        segment = torch.cat([torch.zeros_like(text_mask), torch.ones_like(image_mask)], 1).long()
        out = self.bert(
            inputs_embeds=x,
            attention_mask=mask,
            token_type_ids=segment,
            position_ids=torch.zeros_like(mask),
        ).last_hidden_state
        return self.head(out[:, 0]).squeeze(-1)

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


class Reranker(nn.Module):
    """A frozen bi-encoder whose states feed a trainable CrossEncoder."""

    def __init__(self, bi: BiEncoder, cfg: RerankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bi = bi.eval().requires_grad_(False)
        self.cross = CrossEncoder(cfg, bi.cfg.text.size)

    def init_pretrained(self) -> None:
        self.cross.init_from_text(self.bi.text.bert)

    def train(self, mode: bool = True) -> Reranker:
        super().train(mode)
        self.bi.eval()  # frozen: no dropout in the states the cross-encoder learns from
        return self

    @torch.no_grad()
    def text_states(self, texts: list[str] | dict[str, torch.Tensor]):
        """Captions -> (states (N, T, H), mask (N, T)) from the bi-encoder's text encoder."""
        batch = self.bi.tokenize(texts) if isinstance(texts, list) else texts
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return self.bi.text(ids, mask), mask

    @torch.no_grad()
    def image_states(self, regions: RegionBatch):
        """Regions -> (states (N, 1 + R, H), mask (N, 1 + R)) from the bi-encoder's image encoder."""
        regions = regions.to(self.bi.logit_scale.device)
        mask = torch.cat([regions.mask.new_ones(len(regions), 1), regions.mask], dim=1)
        return self.bi.image(regions), mask

    def cross_scores(self, text, image, chunk: int = 128) -> torch.Tensor:
        """Matching logits of aligned pairs: text[i] with image[i], each a (states, mask) pair.

        Padding is cut to the longest caption of each chunk, so long batches cost no more than
        their captions need.
        """
        (ts, tm), (is_, im) = text, image
        out = []
        for s in range(0, len(ts), chunk):
            tmc = tm[s : s + chunk]
            width = int(tmc.sum(1).max())
            out.append(
                self.cross(
                    ts[s : s + chunk, :width], tmc[:, :width], is_[s : s + chunk], im[s : s + chunk]
                )
            )
        return torch.cat(out)

    def fuse(
        self, cross: torch.Tensor, dot: torch.Tensor, fusion: float | None = None
    ) -> torch.Tensor:
        """Re-ranked score: the cross logit plus `fusion` (by default the config's) x the
        bi-encoder's own logit."""
        fusion = self.cfg.fusion if fusion is None else fusion
        if fusion == 0:
            return cross
        return cross + fusion * dot * self.bi.logit_scale.exp()

    @torch.inference_mode()
    def rerank_images(self, text: str, candidates: RegionBatch, dot: torch.Tensor) -> torch.Tensor:
        """One caption and its K candidate images (with their dot scores) -> (K,) scores."""
        ts, tm = self.text_states([text])
        k = len(candidates)
        return self.fuse(
            self.cross_scores(
                (ts.expand(k, -1, -1), tm.expand(k, -1)), self.image_states(candidates)
            ),
            dot,
        )

    @torch.inference_mode()
    def rerank_captions(
        self, image: RegionBatch, captions: list[str], dot: torch.Tensor
    ) -> torch.Tensor:
        """One image and its K candidate captions (with their dot scores) -> (K,) scores."""
        is_, im = self.image_states(image)
        k = len(captions)
        return self.fuse(
            self.cross_scores(
                self.text_states(captions), (is_.expand(k, -1, -1), im.expand(k, -1))
            ),
            dot,
        )


def shipped_reranker_dir(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("lightningdot") / "weights" / SHIPPED[name]))


def save_reranker(
    folder: str | os.PathLike[str],
    reranker: Reranker,
    bi_name: str,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the re-ranker's config, the identity of its bi-encoder and its own parameters."""
    folder = Path(folder)
    state = {k: v.to(dtype) for k, v in reranker.cross.stored_state().items()}
    write_safetensors(folder / "model.safetensors", state, metadata={"format": str(FORMAT)})
    meta = {
        "format": FORMAT,
        "reranker": to_dict(reranker.cfg),
        "bi_encoder": bi_name,
        "bi_encoder_id": model_identity(reranker.bi),
        **(extra or {}),
    }
    write_json(folder / "config.json", meta)


def read_reranker_meta(folder: Path) -> dict[str, Any]:
    return read_config_json(folder, "reranker", "re-ranker")


def load_reranker(
    name_or_path: str | os.PathLike[str] = "default", bi: BiEncoder | None = None
) -> Reranker:
    """A shipped re-ranker name or folder -> Reranker over `bi` (default: its own bi-encoder).

    Raises:
        ConfigMismatchError: `bi` is not the bi-encoder the re-ranker was trained on.
    """
    if str(name_or_path) in SHIPPED:
        folder = shipped_reranker_dir(str(name_or_path))
    else:
        folder = Path(name_or_path)
        if not folder.exists():
            raise DataError(
                f"no re-ranker {str(name_or_path)!r}: neither a shipped name "
                f"{tuple(SHIPPED)} nor a folder"
            )
    meta = read_reranker_meta(folder)
    cfg = from_dict(RerankerConfig, meta["reranker"])
    bi = bi if bi is not None else load_model(meta["bi_encoder"])
    if model_identity(bi) != meta["bi_encoder_id"]:
        raise ConfigMismatchError(
            f"re-ranker {folder} was trained on bi-encoder {meta['bi_encoder_id'][:12]}, "
            f"not on the loaded model {model_identity(bi)[:12]}; train one for this model with "
            "`ldot train-reranker`"
        )
    reranker = Reranker(bi, cfg)
    load_state_into(reranker.cross, folder / "model.safetensors")
    return reranker.eval()


@torch.inference_mode()
def gallery_states(reranker: Reranker, regions: RegionBatch, batch: int = 256):
    """States of every image of a gallery, computed once: (G, 1 + R, H), (G, 1 + R)."""
    parts = [reranker.image_states(chunk) for chunk in regions.chunks(batch)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.inference_mode()
def caption_states(reranker: Reranker, captions: list[str], batch: int = 256):
    """States of captions, padded to one width: (N, T, H), (N, T)."""
    parts = [reranker.text_states(captions[s : s + batch]) for s in range(0, len(captions), batch)]
    width = max(p[1].shape[1] for p in parts)
    states = torch.cat([nn.functional.pad(s, (0, 0, 0, width - s.shape[1])) for s, _ in parts])
    masks = torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for _, m in parts])
    return states, masks


@torch.inference_mode()
def evaluate_reranked(
    reranker: Reranker,
    captions: list[str],
    caption_image: list[int] | torch.Tensor,
    regions: RegionBatch,
    k: int,
    fusions: Sequence[float] | None = None,
) -> dict:
    """Recall@1/5/10 both ways and AR after re-ranking every query's top K (`recall_metrics`
    layout), with each gallery item's states computed once.

    With `fusions`, returns {weight: metrics} for each fusion weight instead, the cross-attention
    scores computed once for all of them.
    """
    from lightningdot.evaluate import encode_region_batches, encode_texts, reranked_metrics

    was = reranker.training
    reranker.eval()
    bi = reranker.bi
    image_vecs = encode_region_batches(bi, regions.chunks(256))
    text_vecs = encode_texts(bi, captions)
    ts, tm = caption_states(reranker, captions)
    is_, im = gallery_states(reranker, regions)
    cache: dict[tuple[str, int], torch.Tensor] = {}  # (direction, first query) -> cross logits

    def t2i(q: torch.Tensor, cand: torch.Tensor, dot: torch.Tensor, fusion: float) -> torch.Tensor:
        key = ("t2i", int(q[0]))
        if key not in cache:
            kk = cand.shape[1]
            text = (ts[q].repeat_interleave(kk, 0), tm[q].repeat_interleave(kk, 0))
            image = (is_[cand.flatten()], im[cand.flatten()])
            cache[key] = reranker.cross_scores(text, image).view_as(dot)
        return reranker.fuse(cache[key], dot, fusion)

    def i2t(q: torch.Tensor, cand: torch.Tensor, dot: torch.Tensor, fusion: float) -> torch.Tensor:
        key = ("i2t", int(q[0]))
        if key not in cache:
            kk = cand.shape[1]
            text = (ts[cand.flatten()], tm[cand.flatten()])
            image = (is_[q].repeat_interleave(kk, 0), im[q].repeat_interleave(kk, 0))
            cache[key] = reranker.cross_scores(text, image).view_as(dot)
        return reranker.fuse(cache[key], dot, fusion)

    weights = list(fusions) if fusions is not None else [reranker.cfg.fusion]
    results = {
        w: reranked_metrics(
            text_vecs,
            image_vecs,
            caption_image,
            k,
            partial(t2i, fusion=w),
            partial(i2t, fusion=w),
            bi.bank,
        )
        for w in weights
    }
    reranker.train(was)
    return results if fusions is not None else results[weights[0]]
