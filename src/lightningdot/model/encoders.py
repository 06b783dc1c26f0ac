"""The two encoders of LightningDOT and the bi-encoder that scores them by a dot product.

    captions -> TextEncoder  -> [CLS] state -> projection -> text vector  ┐
                                                                          ├─ dot product
    regions  -> ImageEncoder -> [IMG] state -> projection -> image vector ┘

Neither encoder sees the other modality, so image vectors can be computed once, offline.

With `ModelConfig.pooled_dim`, each global vector is the concatenation of two unit "views",
scaled to unit length: the transformer view above, and a pooled view (a linear map of the
pooled text state; of the normalised mean region feature). Each view has its own CMR loss, and
the score is still one dot product: the mean of the two views' cosines.

A model given a concept view (`ldot concepts`, `lightningdot.model.concepts`) appends its
coordinates to every vector at inference: the main vector stays the first `cfg.vector_dim`
coordinates, and training never sees the view.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, PreTrainedTokenizerBase

from lightningdot.config import BertSize, ImageConfig, ModelConfig, RuntimeConfig, TextConfig
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features.regions import RegionBatch
from lightningdot.model.attention import gate_bias, keys_values, layer_output
from lightningdot.model.concepts import ConceptView
from lightningdot.model.pooling import join_views, mean_pool
from lightningdot.model.pretrained import (
    DEFAULT_TOKENIZER,
    bert_config,
    load_pretrained_text,
    load_tokenizer,
)
from lightningdot.model.prior import QueryBank

# Captions encoded together at inference, at most, after sorting a batch by length.
LENGTH_GROUP = 16


def by_length(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    group: int = LENGTH_GROUP,
) -> torch.Tensor:
    """`encode(ids, mask)` -> (B, D) run on groups of rows of similar length, each cut to its
    longest: a batch of short and long captions pays for padding only within each group. (On
    32 Flickr8k captions of 14 tokens median and up to 36, this cuts the p99 time of a batch
    by about 40%; the vectors are the same, since padding is masked.)"""
    if len(ids) <= 1:
        return encode(ids, mask)
    lengths = mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    parts = []
    for start in range(0, len(ids), group):
        rows = order[start : start + group]
        width = int(lengths[rows].max())
        parts.append(encode(ids[rows, :width].contiguous(), mask[rows, :width].contiguous()))
    out = torch.cat(parts)
    return out[torch.argsort(order)]


def text_vectors(
    text: TextEncoder, concepts: ConceptView | None, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(B, T) token ids -> (B, D) text item vectors: the text encoder's, then the concept
    view's coordinates when there is one (from the states where its branch leaves the text
    encoder)."""
    if concepts is None:
        return text.vectors(ids, mask)
    branches = concepts.text_layers is not None
    out = text.bert(input_ids=ids, attention_mask=mask, output_hidden_states=branches)
    main = join_views(text.views(out.last_hidden_state, mask))
    branch = out.hidden_states[concepts.branch] if branches else None
    return torch.cat([main, concepts.text_item(branch, mask)], dim=-1)


class TextEncoder(nn.Module):
    """A BERT-family encoder; its [CLS] output, projected, is the global text vector."""

    def __init__(
        self, cfg: TextConfig, embed_dim: int, dropout: float = 0.1, pooled_dim: int = 0
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(bert_config(cfg.size, dropout), add_pooling_layer=False)
        self.proj = nn.Linear(cfg.size.hidden_size, embed_dim)
        self.pooled_proj = nn.Linear(cfg.size.hidden_size, pooled_dim) if pooled_dim else None

    def load_pretrained(self) -> PreTrainedTokenizerBase | None:
        """Copy in the packaged weights named by the config (checked by hash); return their
        tokenizer."""
        if self.cfg.pretrained is None:
            return None
        ref, tokenizer = load_pretrained_text(self.cfg.pretrained)
        got = ref.config
        want = self.cfg.size
        if (got.hidden_size, got.num_hidden_layers, got.vocab_size) != (
            want.hidden_size,
            want.num_layers,
            want.vocab_size,
        ):
            raise ConfigMismatchError(
                f"pretrained {self.cfg.pretrained!r} is {got.num_hidden_layers} layers x "
                f"{got.hidden_size} (vocab {got.vocab_size}); the config asks for "
                f"{want.num_layers} x {want.hidden_size} (vocab {want.vocab_size})"
            )
        self.bert.load_state_dict(ref.state_dict())
        return tokenizer

    def freeze_lower(self) -> None:
        """Freeze the embeddings and every layer below the top `trainable_layers`."""
        n_frozen = self.cfg.size.num_layers - self.cfg.trainable_layers
        self.bert.embeddings.requires_grad_(False)
        for layer in self.bert.encoder.layer[:n_frozen]:
            layer.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H) token states."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) states -> (B, H) global state ([CLS], or the mean over real tokens)."""
        if self.cfg.pooling == "cls":
            return states[:, 0]
        return mean_pool(states, attention_mask)

    def views(self, states: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """(B, T, H) states -> a (B, ·) unit vector per view: transformer, then pooled if any."""
        pooled = self.pool(states, attention_mask)
        heads = [self.proj] if self.pooled_proj is None else [self.proj, self.pooled_proj]
        return [F.normalize(head(pooled), dim=-1) for head in heads]

    def vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, vector_dim) unit text vectors (the views joined)."""
        return join_views(self.views(self(input_ids, attention_mask), attention_mask))


class ImageEncoder(nn.Module):
    """A transformer over [IMG] + region tokens; the [IMG] output, projected, is the image vector.

    A region token is LayerNorm(W_f f) + LayerNorm(W_b b) for feature f and box b, as in UNITER;
    the regions are a set, so all tokens share one position embedding.
    """

    def __init__(
        self,
        cfg: ImageConfig,
        size: BertSize,
        embed_dim: int,
        dropout: float = 0.1,
        pooled_dim: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        h = size.hidden_size
        self.feature_embed = nn.Sequential(
            nn.Linear(cfg.feature_dim, h), nn.LayerNorm(h, eps=1e-12)
        )
        self.box_embed = nn.Sequential(nn.Linear(7, h), nn.LayerNorm(h, eps=1e-12))
        self.img_token = nn.Parameter(torch.randn(h) * 0.02)
        layers = BertSize(h, cfg.num_layers, size.num_heads, size.intermediate_size, 1, 2)
        self.bert = BertModel(bert_config(layers, dropout), add_pooling_layer=False)
        self.proj = nn.Linear(h, embed_dim)
        # LayerNorm rather than fixed feature statistics: nothing to estimate from a data set.
        self.pooled = (
            nn.Sequential(nn.LayerNorm(cfg.feature_dim), nn.Linear(cfg.feature_dim, pooled_dim))
            if pooled_dim
            else None
        )

    def init_from_text(self, text_bert: BertModel) -> None:
        """Start from the text encoder's embeddings LayerNorm and its bottom layers."""
        emb, src = self.bert.embeddings, text_bert.embeddings
        emb.LayerNorm.load_state_dict(src.LayerNorm.state_dict())
        emb.position_embeddings.weight.data.copy_(src.position_embeddings.weight[:2])
        emb.token_type_embeddings.weight.data.copy_(src.token_type_embeddings.weight)
        for layer, source in zip(self.bert.encoder.layer, text_bert.encoder.layer, strict=False):
            layer.load_state_dict(source.state_dict())

    def embed(self, regions: RegionBatch, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Region tokens (B, R, H); regions where `masked` is True get a zero feature (SMRM)."""
        feats = regions.features
        if masked is not None:
            feats = feats.masked_fill(masked.unsqueeze(-1), 0.0)
        return self.feature_embed(feats) + self.box_embed(regions.boxes)

    def forward(self, regions: RegionBatch, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Regions -> (B, 1 + R, H) states; position 0 is [IMG]."""
        tokens = self.embed(regions, masked)
        b = tokens.shape[0]
        img = self.img_token.expand(b, -1).to(tokens.dtype)
        if self.cfg.img_token_adds_mean:
            img = img + mean_pool(tokens, regions.mask)
        tokens = torch.cat([img.unsqueeze(1), tokens], dim=1)
        mask = torch.cat([regions.mask.new_ones(b, 1), regions.mask], dim=1).long()
        zeros = torch.zeros_like(mask)
        out = self.bert(
            inputs_embeds=tokens,
            attention_mask=mask,
            position_ids=zeros,
            token_type_ids=torch.ones_like(mask),  # segment 1: the image side, as in UNITER
        )
        return out.last_hidden_state

    def views(
        self, states: torch.Tensor, regions: RegionBatch, gate: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """(B, 1 + R, H) states of `regions` -> a (B, ·) unit vector per view (the pooled view's
        mean weighted by `gate`, as in `gated_states`)."""
        views = [self.proj(states[:, 0])]
        if self.pooled is not None:
            weights = regions.mask if gate is None else gate * regions.mask
            views.append(self.pooled(mean_pool(regions.features, weights)))
        return [F.normalize(v, dim=-1) for v in views]

    def gated_states(self, regions: RegionBatch, gate: torch.Tensor) -> torch.Tensor:
        """`forward` with region r of image b weighted by gate[b, r] in [0, 1] wherever it is
        read: every attention (a bias of log gate on its logits) and the mean [IMG] starts from.
        A gate of 1 leaves a region as it is and 0 deletes it, as a False in `regions.mask`
        would, so the gradient of a score with respect to the gates is the first-order effect
        of deleting each region (what `lightningdot.explain` reports)."""
        tokens = self.embed(regions)
        weights = gate * regions.mask
        img = self.img_token.expand(len(tokens), -1).to(tokens.dtype)
        if self.cfg.img_token_adds_mean:
            img = img + mean_pool(tokens, weights)
        x = torch.cat([img.unsqueeze(1), tokens], dim=1)
        ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        x = self.bert.embeddings(inputs_embeds=x, position_ids=ids, token_type_ids=ids + 1)
        bias = gate_bias(torch.cat([weights.new_ones(len(x), 1), weights], 1))
        for layer in self.bert.encoder.layer:
            x = layer_output(layer, x, *keys_values(layer, x), bias)
        return x


class BiEncoder(nn.Module):
    """LightningDOT's dual encoder: `encode_text`, `encode_image`, `score`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(cfg.text, cfg.embed_dim, cfg.dropout, cfg.pooled_dim)
        self.image = ImageEncoder(
            cfg.image, cfg.text.size, cfg.embed_dim, cfg.dropout, cfg.pooled_dim
        )
        # exp(logit_scale) = 1 / temperature of CMR's softmax, one per view
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        self.pooled_logit_scale = nn.Parameter(torch.tensor(0.0)) if cfg.pooled_dim else None
        self._tokenizer = None
        self._warned_truncation = False
        # Typical queries of each kind, for indexes' query-bank priors (`ldot bank`); not weights.
        self.bank: QueryBank | None = None
        # `encode_text` from token tensors on a faster runtime (`lightningdot.runtime`), used
        # at inference only; training drops it, since it holds a copy of the weights.
        self.fast_text: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # The runtime `fast_text` and the backbone of every `RegionSource.of(model)` run on
        # (None: eager PyTorch).
        self.runtime: RuntimeConfig | None = None
        # The backbone's classes as a view appended to every vector at inference (`ldot
        # concepts`); like the bank, not trained weights.
        self.concepts: ConceptView | None = None

    @property
    def vector_dim(self) -> int:
        """Size of the vectors the model encodes: the index dimension."""
        return self.cfg.vector_dim + (self.concepts.dim if self.concepts is not None else 0)

    def as_query(self, vectors: torch.Tensor, modality: str) -> torch.Tensor:
        """(Q, vector_dim) vectors of texts or images ("text", "image") as `encode_text` and
        `encode_image` give them, for an index -> the same as queries: the concept view's
        coordinates weighted as a query weighs them (without one, the vectors themselves)."""
        if self.concepts is None:
            return vectors
        main = self.cfg.vector_dim
        concept = self.concepts.as_query(vectors[:, main:].float(), modality)
        return torch.cat([vectors[:, :main], concept.to(vectors.dtype)], dim=1)

    def drop_concepts(self) -> None:
        """Answer with the main vectors alone, as the model did before its concept view: for an
        index built without one (`lightningdot.index.engines.open_index`)."""
        if self.concepts is None:
            return
        self.concepts, self.fast_text, self.runtime = None, None, None

    def train(self, mode: bool = True) -> BiEncoder:
        if mode:
            self.fast_text, self.runtime = None, None
        return super().train(mode)

    def init_pretrained(self, temperature: float = 0.05) -> None:
        """Load packaged text weights, derive the image transformer from them, freeze as configured."""
        self._tokenizer = self.text.load_pretrained()
        if self.cfg.image.init_from_text:
            self.image.init_from_text(self.text.bert)
        self.text.freeze_lower()
        for scale in self.logit_scales:
            scale.data.fill_(math.log(1.0 / temperature))

    @property
    def logit_scales(self) -> list[nn.Parameter]:
        """CMR's log inverse temperature of each view, in the order of `views`."""
        if self.pooled_logit_scale is None:
            return [self.logit_scale]
        return [self.logit_scale, self.pooled_logit_scale]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.text.pretrained or DEFAULT_TOKENIZER)
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> padded `input_ids` and `attention_mask`, truncated to `max_length`.

        Raises:
            DataError: a caption is empty or only white space.
        """
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise DataError("a text query or caption is empty")
        if self.cfg.text.prefix:
            texts = [self.cfg.text.prefix + t for t in texts]
        max_len = self.cfg.text.max_length
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
            return_overflowing_tokens=False,
            return_length=False,
        )
        if not self._warned_truncation and enc["input_ids"].shape[1] == max_len:
            full = self.tokenizer(texts, truncation=False)["input_ids"]
            if any(len(ids) > max_len for ids in full):
                warnings.warn(
                    f"captions longer than {max_len} tokens are truncated to the model's maximum",
                    stacklevel=2,
                )
                self._warned_truncation = True
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_text(self, texts: list[str] | dict[str, torch.Tensor]) -> torch.Tensor:
        """Captions (strings or `tokenize` output) -> (B, vector_dim) text vectors, as items of
        an index (`as_query` makes queries of them): the unit main vector, then the concept
        view's coordinates if the model has one."""
        batch = self.tokenize(texts) if isinstance(texts, list) else texts
        device = self.logit_scale.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if torch.is_grad_enabled():  # training: no concept view, no exported graph
            return by_length(self.text.vectors, ids, mask)
        eager = functools.partial(text_vectors, self.text, self.concepts)
        return by_length(self.fast_text or eager, ids, mask)

    def encode_image(self, regions: RegionBatch) -> torch.Tensor:
        """Regions of B images -> (B, vector_dim) image vectors, as items of an index (see
        `encode_text`)."""
        return self.encode_image_states(regions)[0]

    def encode_image_states(self, regions: RegionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Regions of B images -> their (B, vector_dim) unit vectors and the (B, 1 + R, H)
        states the vectors come from (what a re-ranker reads)."""
        regions = regions.to(self.logit_scale.device)
        states = self.image(regions)
        vectors = join_views(self.image.views(states, regions))
        if self.concepts is not None and not torch.is_grad_enabled():
            vectors = torch.cat([vectors, self.concepts.image_item(regions)], dim=1)
        return vectors, states

    @staticmethod
    def score(text_vectors: torch.Tensor, image_vectors: torch.Tensor) -> torch.Tensor:
        """(Q, E) x (G, E) -> (Q, G) dot products."""
        return text_vectors @ image_vectors.T

    def adopt_image_side(self, other: BiEncoder) -> None:
        """Take `other`'s image encoder, CMR temperatures and query bank, frozen: this model
        then searches the indexes `other` builds, with their priors."""
        self.image.load_state_dict(other.image.state_dict())
        self.image.requires_grad_(False)
        for scale, source in zip(self.logit_scales, other.logit_scales, strict=True):
            scale.data.copy_(source.data)
            scale.requires_grad_(False)
        self.bank = other.bank
        if other.concepts is not None:  # its image side; this text encoder has no branch
            self.concepts = other.concepts.image_side()

    def stored_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: the parameters the config trains (every text parameter
        when no packaged weights can rebuild them), whatever is frozen at the moment; with
        `image_from`, the text side alone."""
        n_frozen = self.cfg.text.size.num_layers - self.cfg.text.trainable_layers
        packaged = self.cfg.text.pretrained is not None
        frozen = ("text.bert.embeddings.",) + tuple(
            f"text.bert.encoder.layer.{i}." for i in range(n_frozen)
        )
        if self.cfg.image_from:
            return {
                n: p
                for n, p in self.text.named_parameters(prefix="text")
                if not (packaged and n.startswith(frozen))
            }
        return {
            n: p
            for n, p in self.named_parameters()
            if not (packaged and n.startswith(frozen)) and not n.startswith("concepts.")
        }
