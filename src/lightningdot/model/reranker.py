"""Cross-attention re-ranking of the bi-encoder's top K.

    query -> bi-encoder -> index top K -> CrossEncoder(caption tokens ; [IMG] + regions) -> top M

The cross-attention model is single-stream: one transformer attends across the caption's token
states and the image's [IMG] + region states, and an image-text matching (ITM) head on the first
token gives the score. It reads the states the bi-encoder already computes, as ALBEF and METER
put fusion layers on top of unimodal encoders, so that a CPU can train it in minutes and the
shipped copy holds only its own few layers. It is tied to the bi-encoder it was trained on, and
`lightningdot.model.checkpoint.load_reranker` refuses any other.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel

from lightningdot.config import BertSize, RerankerConfig
from lightningdot.features.regions import RegionBatch
from lightningdot.model.attention import gate_bias, keys_values, layer_output
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.pooling import join_views
from lightningdot.model.pretrained import bert_config


class CrossEncoder(nn.Module):
    """A transformer over [caption token states ; image states] with an ITM head.

    Caption tokens attend to the caption and the image, layer after layer; the image states
    are read (as keys and values) but not updated, as in the text-side fusion of ALBEF. So the
    cost of a pair grows with its caption's length, not with its 1 + R image tokens, and each
    layer's image keys and values are computed once per image.
    """

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
        for layer, source in zip(self.bert.encoder.layer, top, strict=True):
            layer.load_state_dict(source.state_dict())

    def embed(self, states: torch.Tensor, segment: int) -> torch.Tensor:
        """(N, L, H) states of one modality -> the fusion layers' input embeddings."""
        ids = torch.full(states.shape[:2], segment, dtype=torch.long, device=states.device)
        return self.bert.embeddings(
            inputs_embeds=states, token_type_ids=ids, position_ids=torch.zeros_like(ids)
        )

    def forward(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        image_states: torch.Tensor,
        image_mask: torch.Tensor,
        text_index: torch.Tensor,
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        """Matching logits of P pairs (text_index[p], image_index[p]) of N captions
        (N, T, H), (N, T) and M images (M, 1 + R, H), (M, 1 + R).

        The head reads only the first token, so the last layer computes attention for that one
        query. Before the first layer, a caption's states do not depend on the image it is
        paired with, so their keys and values too are computed once per caption.
        """
        t_ids, t_of = text_index.unique(return_inverse=True)
        i_ids, i_of = image_index.unique(return_inverse=True)
        t_mask = text_mask[t_ids]
        width = int(t_mask.sum(1).max())  # padding beyond the longest caption is never read
        text = self.embed(text_states[t_ids, :width], 0)
        image = self.embed(image_states[i_ids], 1)
        mask = torch.cat([t_mask[t_of, :width], image_mask[i_ids][i_of]], 1)
        # A float image mask holds region gates (`ImageEncoder.gated_states`): a log bias.
        mask = gate_bias(mask) if image_mask.is_floating_point() else mask.bool()[:, None, None, :]
        *lower, last = self.bert.encoder.layer
        for layer in lower:
            keys, values = self._pair_keys_values(layer, text, t_of, image, i_of)
            text = layer_output(layer, text[t_of], keys, values, mask)
            t_of = torch.arange(len(text), device=text.device)  # one caption state per pair now
        keys, values = self._pair_keys_values(last, text, t_of, image, i_of)
        out = layer_output(last, text[t_of, :1], keys, values, mask)
        return self.head(out[:, 0]).squeeze(-1)

    @staticmethod
    def _pair_keys_values(layer, text, text_of, image, image_of):
        """A layer's keys and values (P, heads, T + 1 + R, ·) of each pair's caption and image,
        each computed once per distinct caption or image state."""
        (tk, tv), (ik, iv) = keys_values(layer, text), keys_values(layer, image)
        return torch.cat([tk[text_of], ik[image_of]], 2), torch.cat([tv[text_of], iv[image_of]], 2)

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

    def cross_scores(
        self,
        text,
        image,
        text_index: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        chunk: int = 512,
    ) -> torch.Tensor:
        """Matching logits of pairs (text_index[p], image_index[p]) of captions `text` and images
        `image`, each a (states, mask) pair; by default text[i] goes with image[i]."""
        (ts, tm), (is_, im) = text, image
        if text_index is None or image_index is None:
            text_index = image_index = torch.arange(len(ts))
        return torch.cat(
            [
                self.cross(ts, tm, is_, im, text_index[s : s + chunk], image_index[s : s + chunk])
                for s in range(0, len(text_index), chunk)
            ]
        )

    def fused_score(
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
        return self.rerank_states(text, self.image_states(candidates), dot)

    @torch.inference_mode()
    def rerank_states(self, text: str, image, dot: torch.Tensor) -> torch.Tensor:
        """`rerank_images` from the candidates' states and mask (as `image_states` gives them,
        or as an index keeps them)."""
        k = len(image[0])
        cross = self.cross_scores(
            self.text_states([text]), image, torch.zeros(k, dtype=torch.long), torch.arange(k)
        )
        return self.fused_score(cross, dot)

    @torch.inference_mode()
    def rerank_captions(
        self, image: RegionBatch, captions: list[str], dot: torch.Tensor
    ) -> torch.Tensor:
        """One image and its K candidate captions (with their dot scores) -> (K,) scores."""
        k = len(captions)
        cross = self.cross_scores(
            self.text_states(captions),
            self.image_states(image),
            torch.arange(k),
            torch.zeros(k, dtype=torch.long),
        )
        return self.fused_score(cross, dot)


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
def vectors_of_states(bi: BiEncoder, captions, images, regions: RegionBatch, batch: int = 256):
    """The bi-encoder's caption and image vectors from the states `caption_states` and
    `gallery_states` computed, so that its encoders run once for both uses."""
    (ts, tm), (is_, _) = captions, images
    # Stores keep features in float16; the pooled view reads them a chunk at a time, in float32.
    chunks = zip(range(0, len(is_), batch), regions.chunks(batch), strict=True)
    image = [
        join_views(bi.image.views(is_[s : s + batch], chunk.to(bi.logit_scale.device)))
        for s, chunk in chunks
    ]
    return join_views(bi.text.views(ts, tm)), torch.cat(image)
