"""The backbone's ImageNet classes as a view in a text space (ConSE: Norouzi et al.,
"Zero-Shot Learning by Convex Combination of Semantic Embeddings", ICLR 2014).

An image's concept vector is the probability-weighted mean of the sentence embeddings of its
`top` most likely class names, renormalised over those classes; a query's is its own sentence
embedding, so their dot product asks "does the text name what the backbone sees". The class
names are the WordNet lemmas of the ILSVRC-2012 synsets, in the classifier's order
(`imagenet1k.tsv`: synset id, then its lemmas; taken from timm's
`timm/data/_info/imagenet_synsets.txt` and `imagenet_synset_to_lemma.txt`, Apache-2.0).

The concept score is added to the model's own score behind a gate on the query: how well the
query matches its best class name. Flickr8k-style captions ("a man rides a bike down a dirt
road") rarely match a class name closely, object queries ("A tiger.") do.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lightningdot.errors import ConfigMismatchError, DataError

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
