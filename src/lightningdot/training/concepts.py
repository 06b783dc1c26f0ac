"""`ldot concepts`: give a model the concept view of its backbone's ImageNet classes
(`lightningdot.model.concepts`), its statistics estimated on a split the model trained on.

What it computes: the sentence embedding of every class name (the packaged encoder, mean
pooled), and the mean and covariance of the concept vectors of the split's images. A model's
query bank stays as it is: it lives in the main space (`lightningdot.model.prior`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from lightningdot.config import ConceptConfig, ModelConfig
from lightningdot.data import read_karpathy
from lightningdot.encode import RegionSource
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore, create_backbone
from lightningdot.model.checkpoint import attach_concepts, read_model_config
from lightningdot.model.concepts import ConceptView, load_class_names, text_branch
from lightningdot.model.pooling import mean_pool
from lightningdot.model.pretrained import load_pretrained_text


@torch.inference_mode()
def sentence_embeddings(texts: list[str], text_model: str, batch: int = 256) -> torch.Tensor:
    """(N,) texts -> (N, D) unit, mean-pooled sentence embeddings of a packaged encoder."""
    encoder, tokenizer = load_pretrained_text(text_model)
    encoder.eval()
    out = []
    for s in range(0, len(texts), batch):
        enc = tokenizer(texts[s : s + batch], padding=True, truncation=True, return_tensors="pt")
        states = encoder(**enc).last_hidden_state
        out.append(F.normalize(mean_pool(states, enc["attention_mask"]), dim=-1))
    return torch.cat(out)


@torch.inference_mode()
def make_concepts(
    model_cfg: ModelConfig, annotations: str | Path, features: str | Path, cfg: ConceptConfig
) -> ConceptView:
    """The concept view of a model of `model_cfg`, its image statistics from the split
    `cfg.split` (the view reads the backbone's classifier, not the model's weights)."""
    classifier = create_backbone(model_cfg.backbone).classifier()
    names = sentence_embeddings(load_class_names(classifier.out_features), cfg.text_model)
    d = names.shape[1]
    layers, branch = text_branch(model_cfg, cfg)
    view = ConceptView(cfg, classifier, names, torch.zeros(d), torch.eye(d), layers, branch)
    keys = read_karpathy(annotations, cfg.split).keys()
    source = RegionSource(model_cfg.backbone, FeatureStore(features))
    concepts = torch.cat([view.concept_of(b) for b in source.batches(keys)])
    view.mean, view.cov = concepts.mean(0), torch.cov(concepts.T)
    return view.eval()


def give_concepts(
    folder: str | os.PathLike[str],
    annotations: str | Path,
    features: str | Path,
    cfg: ConceptConfig,
) -> ConceptView:
    """Make the concept view of the model saved in `folder` (`make_concepts`) and store it
    there.

    Raises:
        DataError: `folder` is no model folder, or the model takes its image side from another.
    """
    folder = Path(folder)
    model_cfg, _ = read_model_config(folder)
    if model_cfg.image_from:
        raise DataError(
            f"{folder} uses the image side of {model_cfg.image_from!r}; give that model the "
            "concept view instead"
        )
    view = make_concepts(model_cfg, annotations, features, cfg)
    attach_concepts(folder, view)
    return view
