"""The backbone's ImageNet classes as a view in a text space (ConSE: Norouzi et al.,
"Zero-Shot Learning by Convex Combination of Semantic Embeddings", ICLR 2014).

An image's concept vector is the probability-weighted mean of the sentence embeddings of its
`top` most likely class names, renormalised over those classes; a query's is its own sentence
embedding, so their dot product asks "does the text name what the backbone sees". The class
names are the WordNet lemmas of the ILSVRC-2012 synsets, in the classifier's order
(`imagenet1k.tsv`: synset id, then its lemmas; taken from timm's
`timm/data/_info/imagenet_synsets.txt` and `imagenet_synset_to_lemma.txt`, Apache-2.0).

`ConceptView` makes this a view of a model's vectors, so that search stays one inner product:

    image item   [main, c - mu]        c: the image's concept vector, mu: its mean over the
    image query  [main, w_i (c - mu)]     model's training images
    text item    [main, s / sd(s)]     s: the caption's sentence embedding, sd(s) the spread of
    text query   [main, g(s) s / sd(s)]   s . c over those images (s' Cov(c) s, square-rooted)

so a score is the model's own plus a weight times a z-score: s . (c - mu) / sd(s) has mean 0
and spread 1 over the images for every caption, which keeps a caption that names many
concepts from outranking the rest for every image query. A text query's weight g(s) is a gate
on how well it matches its best class name: Flickr8k-style captions ("a man rides a bike down a
dirt road") rarely match a class name closely, object queries ("A tiger.") do; with slope 0 it
is a fixed weight, which the shipped default uses (`ConceptConfig` says why). The sentence
embedding is the packaged MiniLM's, whose bottom layers the text encoder shares (frozen), so
only its top layers run twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightningdot.config import ConceptConfig, ModelConfig
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features.backbones import create_backbone
from lightningdot.features.regions import RegionBatch
from lightningdot.model.attention import gate_bias, keys_values, layer_output
from lightningdot.model.pooling import mean_pool
from lightningdot.model.pretrained import load_pretrained_text

IMAGENET_CLASSES = Path(__file__).with_name("imagenet1k.tsv")


def load_class_names(num_classes: int, path: Path = IMAGENET_CLASSES) -> list[str]:
    """The class names of `path` ("synset<TAB>lemma, lemma, ..." a line, in class order), one
    per class of a classifier with `num_classes` outputs.

    Raises:
        ConfigMismatchError: the file names another number of classes than the classifier has.
        DataError: a line is not "id<TAB>names".
    """
    names = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip():
            raise DataError(f"{path}:{n}: expected 'synset<TAB>names', got {line!r}")
        names.append(parts[1].strip())
    if len(names) != num_classes:
        raise ConfigMismatchError(
            f"{path} names {len(names)} classes but the backbone's classifier has {num_classes}"
        )
    return names


def concept_vectors(logits: torch.Tensor, names: torch.Tensor, top: int = 10) -> torch.Tensor:
    """(B, C) class logits and (C, D) unit name embeddings -> (B, D) unit concept vectors."""
    probs, classes = logits.float().softmax(-1).topk(min(top, logits.shape[-1]), dim=-1)
    weights = probs / probs.sum(-1, keepdim=True)
    return F.normalize(torch.einsum("bk,bkd->bd", weights, names.float()[classes]), dim=-1)


def best_name_cosine(queries: torch.Tensor, names: torch.Tensor) -> torch.Tensor:
    """(Q, D) unit query embeddings -> (Q,) cosine of each with its closest class name."""
    return (queries.float() @ names.float().T).max(-1).values


def sigmoid_gate(x: torch.Tensor, weight: float, slope: float, shift: float) -> torch.Tensor:
    """weight * sigmoid(slope * (x - shift)): near 0 below `shift`, near `weight` above it."""
    return weight * torch.sigmoid(slope * (x - shift))


def concept_gate(
    queries: torch.Tensor, names: torch.Tensor, weight: float, slope: float, shift: float
) -> torch.Tensor:
    """(Q, D) unit query embeddings -> (Q,) weight of each query's concept score, a
    `sigmoid_gate` of its `best_name_cosine`."""
    return sigmoid_gate(best_name_cosine(queries, names), weight, slope, shift)


def names_digest(path: Path = IMAGENET_CLASSES) -> str:
    """SHA-256 of a class-name file: a concept view records the names it embedded."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ConceptView(nn.Module):
    """The concept coordinates of a model's vectors (see the module docstring).

    Args:
        cfg: the view's settings.
        classifier: the backbone's classifier, region feature -> class logits.
        names: (C, D) unit sentence embeddings of the class names, in classifier order.
        mean, cov: (D,) and (D, D): mean and covariance of the concept vectors of the images
            the model trained on.
        text_layers: the packaged sentence encoder's layers above `branch`; None for a text
            encoder that does not share the packaged one's bottom layers (its concept
            coordinates are 0: such a model ranks text queries by its own score alone).
        branch: how many of the text encoder's layers are the packaged encoder's own.
    """

    def __init__(
        self,
        cfg: ConceptConfig,
        classifier: nn.Linear,
        names: torch.Tensor,
        mean: torch.Tensor,
        cov: torch.Tensor,
        text_layers: nn.ModuleList | None = None,
        branch: int = 0,
    ) -> None:
        super().__init__()
        if classifier.out_features != len(names):
            raise ConfigMismatchError(
                f"the concept view names {len(names)} classes but the backbone's classifier "
                f"has {classifier.out_features}"
            )
        self.cfg, self.classifier, self.text_layers, self.branch = (
            cfg,
            classifier,
            text_layers,
            branch,
        )
        self.register_buffer("names", names.float())
        self.register_buffer("mean", mean.float())
        self.register_buffer("cov", cov.float())
        self.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.names.shape[1]

    def image_side(self) -> ConceptView:
        """The same view for a model whose text encoder does not branch (text coordinates 0)."""
        return ConceptView(self.cfg, self.classifier, self.names, self.mean, self.cov)

    def concept_of(self, regions: RegionBatch) -> torch.Tensor:
        """Regions of B images -> (B, D) unit concept vectors: the classifier on the mean region
        feature (as the backbone pools), softened by the temperature."""
        logits = self.classifier(mean_pool(regions.features.float(), regions.mask))
        return concept_vectors(logits / self.cfg.temperature, self.names, self.cfg.top)

    def image_item(self, regions: RegionBatch) -> torch.Tensor:
        """Regions of B images -> (B, D) concept coordinates of the images as items."""
        return self.concept_of(regions) - self.mean

    def sentence(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) text-encoder states after layer `branch` -> (B, D) unit sentence
        embeddings of the packaged encoder (its top layers run here)."""
        bias = gate_bias(mask.float())
        for layer in self.text_layers:
            states = layer_output(layer, states, *keys_values(layer, states), bias)
        return F.normalize(mean_pool(states, mask), dim=-1)

    def text_item(self, states: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """The states after layer `branch` (None: no branch) -> (B, D) concept coordinates of
        the captions as items: s / sd(s)."""
        if self.text_layers is None or states is None:
            # Zeros shaped from `mask` itself, not from len(mask): an exported graph keeps
            # the batch size a variable.
            return torch.zeros_like(mask[:, :1], dtype=torch.float).expand(-1, self.dim)
        s = self.sentence(states, mask)
        return s / ((s @ self.cov) * s).sum(-1, keepdim=True).clamp_min(1e-12).sqrt()

    def text_gate(self, items: torch.Tensor) -> torch.Tensor:
        """(Q, D) text item coordinates -> (Q,) each query's weight on its concept score."""
        c = self.cfg
        best = best_name_cosine(F.normalize(items.float(), dim=-1), self.names)
        return sigmoid_gate(best, c.text_weight, c.gate_slope, c.gate_shift)

    def as_query(self, items: torch.Tensor, modality: str) -> torch.Tensor:
        """(Q, D) concept coordinates of items -> those of the same items as queries."""
        if modality == "text":
            return self.text_gate(items)[:, None] * items
        return self.cfg.image_weight * items


def text_branch(model_cfg: ModelConfig, cfg: ConceptConfig) -> tuple[nn.ModuleList | None, int]:
    """The packaged sentence encoder's layers above those a model's text encoder shares with
    it (frozen), and how many it shares; (None, 0) when the text encoder is another."""
    text = model_cfg.text
    if text.pretrained != cfg.text_model:
        return None, 0
    encoder, _ = load_pretrained_text(cfg.text_model)
    branch = text.size.num_layers - text.trainable_layers
    return nn.ModuleList(encoder.encoder.layer[branch:]), branch


def assemble_view(
    model_cfg: ModelConfig,
    cfg: ConceptConfig,
    names: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
) -> ConceptView:
    """A model's concept view from its statistics, with the classifier of the model's backbone
    and the text branch (`text_branch`) rebuilt from their packages."""
    backbone = create_backbone(model_cfg.backbone)
    layers, branch = text_branch(model_cfg, cfg)
    return ConceptView(cfg, backbone.classifier(), names, mean, cov, layers, branch).eval()
