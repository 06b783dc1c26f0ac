"""`ldot align`: a new text encoder trained into an existing model's embedding space.

    teacher: image encoder ──> image vectors (computed once; frozen)  ─┐
             text encoder  ──> text vectors of its language ──────────┼─> targets
    student: new text encoder (e.g. multilingual-e5-small) ──> vectors ┘

The student keeps the teacher's image encoder, so any index the teacher built answers the
student's queries: a Chinese query is searched against the same image vectors as an English
one. Each step takes a batch of images and one caption of each in every language that covers
it (a language may cover only some of the images). The losses: CMR against the images in
every language (in-batch negatives, the teacher's temperature); in the teacher's own language,
the distance to the teacher's vector of the same caption; and, with `cross_distill`, in the
other languages the distance to the teacher's mean vector of the image's captions in its own
language.

A run may continue an earlier student (`init_from`), training only its top layers
(`train_layers`): how the shipped model learned four more languages. With `train_image` the
image encoder learns too, from every language's captions; the student then no longer shares
the teacher's indexes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lightningdot.config import AlignConfig, ModelConfig, require_same
from lightningdot.data import Corpus, read_karpathy
from lightningdot.encode import RegionSource, encode_collection, encode_texts
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.evaluation.metrics import recall_metrics
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import (
    index_identity,
    load_model,
    load_state_into,
    read_model_config,
    save_model,
)
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.shipped import is_shipped, resolve
from lightningdot.precision import in_float32
from lightningdot.training.loop import StepCallback, Task, Validation, fit
from lightningdot.training.objectives import cmr_loss
from lightningdot.training.optim import decay_groups


@dataclass
class Language:
    """One annotation file's captions of a split: the images it covers, in the split's order."""

    name: str  # the file's stem
    corpus: Corpus  # the split's images that have captions in this language
    rows: torch.Tensor  # (n,) their positions among the split's images


@dataclass
class Split:
    """One split in every language. The first language covers every image; the others may
    cover some of them (a translated set often holds fewer images)."""

    keys: list[str]
    languages: list[Language]
    images: torch.Tensor  # (N, E) the teacher's image vectors


def load_split(cfg: AlignConfig, split: str, store: FeatureStore, teacher: BiEncoder) -> Split:
    """The split's images and captions in every language of the recipe.

    Raises:
        DataError: an image some file names for the split is not in the feature store, or an
            image with captions in another language has none in the first one (the teacher's).
    """
    corpora = [_with_captions(read_karpathy(a, split)) for a in cfg.annotations]
    for path, c in zip(cfg.annotations, corpora, strict=True):
        _require_features(path, split, c, store)
    keys = corpora[0].keys()
    position = {k: i for i, k in enumerate(keys)}
    languages = []
    for path, c in zip(cfg.annotations, corpora, strict=True):
        outside = [k for k in c.keys() if k not in position]
        if outside:
            raise DataError(
                f"{path}: {len(outside)} {split} image(s) have no caption in "
                f"{cfg.annotations[0]}, the teacher's language, e.g. {outside[0]}"
            )
        rows = torch.tensor([position[k] for k in c.keys()], dtype=torch.long)
        languages.append(Language(Path(path).stem, c, rows))
    images = encode_collection(teacher, RegionSource.of(teacher, store), keys)
    return Split(keys, languages, images)


def _with_captions(corpus: Corpus) -> Corpus:
    return Corpus([im for im in corpus.images if im.captions])


def _require_features(path: str, split: str, corpus: Corpus, store: FeatureStore) -> None:
    missing = [k for k in corpus.keys() if k not in store]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of its {len(corpus.images)} {split} images are not in the "
            f"feature store {store.root}, e.g. {missing[0]}; extract them first (ldot extract)"
        )


def student_config(cfg: AlignConfig, teacher: BiEncoder) -> ModelConfig:
    student_size, teacher_size = cfg.text.size, teacher.cfg.text.size
    shape = ("hidden_size", "num_heads", "intermediate_size")
    if any(getattr(student_size, a) != getattr(teacher_size, a) for a in shape):
        # The image transformer takes its shape from the text side's (`ImageEncoder`).
        raise ConfigMismatchError(
            "the student's text size must have the teacher's "
            + ", ".join(f"{a} {getattr(teacher_size, a)}" for a in shape)
            + " to hold its image encoder; the config gives "
            + ", ".join(f"{a} {getattr(student_size, a)}" for a in shape)
        )
    return ModelConfig(
        text=cfg.text,
        # The image weights are the teacher's, copied in; nothing to derive from the text side.
        image=dataclasses.replace(teacher.cfg.image, init_from_text=False),
        embed_dim=teacher.cfg.embed_dim,
        pooled_dim=teacher.cfg.pooled_dim,
        backbone=teacher.cfg.backbone,
        dropout=teacher.cfg.dropout,
        shares_index_with="" if cfg.train_image else index_identity(teacher),
        image_from="" if cfg.train_image else _name_of(cfg.teacher),
    )


def _name_of(model: str) -> str:
    """A shipped name stays a name; a folder is made absolute, to load from anywhere."""
    return model if is_shipped("model", model) else str(resolve("model", model).resolve())


def make_student(cfg: AlignConfig, teacher: BiEncoder) -> BiEncoder:
    student = BiEncoder(student_config(cfg, teacher))
    student.init_pretrained()
    student.adopt_image_side(teacher)
    if cfg.train_image:  # the image side starts as the teacher's, then learns
        student.image.requires_grad_(True)
        student.bank, student.concepts = None, None  # made for the teacher's image vectors
    if cfg.init_from:
        continue_from(student, cfg.init_from, index_identity(teacher))
    if cfg.train_layers:
        n_frozen = cfg.text.size.num_layers - cfg.train_layers
        for layer in student.text.bert.encoder.layer[:n_frozen]:
            layer.requires_grad_(False)
    return student


def continue_from(student: BiEncoder, name_or_path: str, teacher_identity: str) -> None:
    """Load the text side of an earlier student of the same teacher and text config.

    Raises:
        ConfigMismatchError: it was made with another text config or against another teacher.
    """
    earlier_cfg, _ = read_model_config(resolve("model", name_or_path))
    require_same(student.cfg.text, earlier_cfg.text, f"init_from model {name_or_path}")
    if earlier_cfg.shares_index_with != teacher_identity:
        raise ConfigMismatchError(
            f"init_from model {name_or_path} was not aligned to this recipe's teacher"
        )
    student.text.load_state_dict(load_model(name_or_path).text.state_dict())


@in_float32
def align_losses(
    student_vectors: list[torch.Tensor],
    image_vectors: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_vectors: torch.Tensor,
    languages: list[str],
    teacher_centroids: torch.Tensor | None = None,
    rows: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Named loss terms of one step, from tensors alone.

    Args:
        student_vectors: per language, (n, E) unit vectors, one caption per image it covers.
        image_vectors: (B, E) the image vectors (the teacher's, or with `train_image` the
            student's own).
        logit_scale: the teacher's log inverse temperature.
        teacher_vectors: (B, E) the teacher's vectors of the first language's captions.
        languages: a name per entry of `student_vectors`.
        teacher_centroids: (B, E) per image, the unit mean of the teacher's vectors of all its
            first-language captions; the target of the other languages' captions, or None.
        rows: per language, the (n,) positions in the batch of the images its captions are of;
            None: every language has a caption of every image, in order. The first language
            covers the whole batch.

    Returns:
        {"cmr_<language>": mean of CMR's two directions, per language (its images only),
         "distill": squared distance to the teacher's vectors, first language only,
         "distill_<language>": squared distance to the centroids, other languages (if given)}.
    """
    everything = torch.arange(len(image_vectors))
    rows = rows or [everything] * len(languages)
    zero = image_vectors.new_zeros(())  # the term of a language with no image in the batch
    out = {}
    for lang, vecs, at in zip(languages, student_vectors, rows, strict=True):
        terms = cmr_loss(vecs, image_vectors[at], logit_scale) if len(at) else None
        out[f"cmr_{lang}"] = (terms["cmr_t2i"] + terms["cmr_i2t"]) / 2 if terms else zero
    out["distill"] = (student_vectors[0] - teacher_vectors).pow(2).sum(-1).mean()
    if teacher_centroids is not None:
        for lang, vecs, at in zip(languages[1:], student_vectors[1:], rows[1:], strict=True):
            pull = (vecs - teacher_centroids[at]).pow(2).sum(-1)
            out[f"distill_{lang}"] = pull.mean() if len(at) else zero
    return out


def weighted_sum(
    losses: dict[str, torch.Tensor], distill: float, cross_distill: float
) -> torch.Tensor:
    """The terms of `align_losses` weighted as the recipe says: the mean CMR over languages,
    plus `distill` x distillation, plus `cross_distill` x the mean cross-lingual pull."""
    cmr = [v for k, v in losses.items() if k.startswith("cmr_")]
    loss = sum(cmr) / len(cmr) + distill * losses["distill"]
    others = [v for k, v in losses.items() if k.startswith("distill_")]
    if others and cross_distill:
        loss = loss + cross_distill * sum(others) / len(others)
    return loss


def centroids(text: torch.Tensor, corpus: Corpus) -> torch.Tensor:
    """(C, E) caption vectors -> (N, E) unit mean of each image's captions' vectors."""
    owner = torch.as_tensor(corpus.caption_image)
    sums = torch.zeros(len(corpus.images), text.shape[1]).index_add_(0, owner, text)
    return F.normalize(sums, dim=-1)


@torch.inference_mode()
def evaluate_languages(student: BiEncoder, split: Split, store: FeatureStore | None = None) -> dict:
    """Recall metrics per language on the split (over the images each covers), and their mean
    AR as "ar". With `store`, the student's own image encoder encodes the split's images first
    (else they stay the teacher's)."""
    was = student.training
    student.eval()
    if store is not None:
        split.images = encode_collection(student, RegionSource.of(student, store), split.keys)
    per = {}
    for lang in split.languages:
        vectors = encode_texts(student, lang.corpus.captions).float()
        images = split.images[lang.rows]
        per[lang.name] = recall_metrics(vectors, images, lang.corpus.caption_image, student.bank)
    student.train(was)
    return {"ar": sum(m["ar"] for m in per.values()) / len(per), "languages": per}


class AlignTask(Task):
    """Each epoch, every training image once, with one of its captions in every language that
    covers it."""

    unit = "images"

    def __init__(self, cfg: AlignConfig) -> None:
        self.cfg = cfg
        teacher = load_model(cfg.teacher)
        teacher.drop_concepts()  # the student learns the main space; it shares the view at load
        self.store = store = FeatureStore(cfg.features)
        with torch.inference_mode():
            self.train_split = load_split(cfg, cfg.train_split, store, teacher)
            self.val_split = (
                load_split(cfg, cfg.val_split, store, teacher) if cfg.val_split else None
            )
            first = self.train_split.languages[0].corpus
            self.teacher_text = encode_texts(teacher, first.captions)
            self.teacher_centroids = (
                centroids(self.teacher_text, first) if cfg.cross_distill else None
            )
        self.student = self.module = make_student(cfg, teacher)
        self.offsets, self.local = [], []  # per language: caption offsets; image -> its row
        n = len(self.train_split.keys)
        for lang in self.train_split.languages:
            counts = [len(im.captions) for im in lang.corpus.images]
            self.offsets.append(torch.tensor([0] + counts).cumsum(0))
            local = torch.full((n,), -1, dtype=torch.long)
            local[lang.rows] = torch.arange(len(lang.rows))
            self.local.append(local)
        self.captions = [lang.corpus.captions for lang in self.train_split.languages]
        self.names = [lang.name for lang in self.train_split.languages]
        self.items_per_step = cfg.loop.batch_size

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_split.keys) // self.cfg.loop.batch_size)

    def param_groups(self) -> list[dict]:
        cfg = self.cfg
        heads = ("text.proj", "text.pooled_proj")
        return decay_groups(
            self.student,
            lambda name: cfg.head_lr if name.startswith(heads) else cfg.loop.lr,
            cfg.loop.weight_decay,
        )

    def batches(self, epoch: int, gen: torch.Generator) -> Iterator[tuple]:
        b = self.cfg.loop.batch_size
        order = torch.randperm(len(self.train_split.keys), generator=gen)
        for step in range(self.steps_per_epoch()):
            idx = order[step * b : (step + 1) * b]
            rows, picks = [], []
            for off, local in zip(self.offsets, self.local, strict=True):
                at = torch.nonzero(local[idx] >= 0).squeeze(1)  # the batch's images it covers
                own = local[idx[at]]
                # One caption of each of those images, drawn uniformly.
                count = off[own + 1] - off[own]
                picks.append(off[own] + (torch.rand(len(own), generator=gen) * count).long())
                rows.append(at)
            yield idx, rows, picks

    def loss_terms(self, batch: tuple, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx, rows, picks = batch
        vectors = [
            self.encode([captions[i] for i in pick.tolist()])
            for captions, pick in zip(self.captions, picks, strict=True)
        ]
        targets = self.teacher_centroids
        return align_losses(
            vectors,
            self.image_vectors(idx),
            self.student.logit_scale,
            self.teacher_text[picks[0]],
            self.names,
            None if targets is None else targets[idx],
            rows,
        )

    def image_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,) training images -> (B, E): the teacher's, or the student's own as it trains."""
        if not self.cfg.train_image:
            return self.train_split.images[idx]
        keys = [self.train_split.keys[i] for i in idx.tolist()]
        return self.student.encode_image(self.store.batch(keys, soft_labels=False))

    def encode(self, captions: list[str]) -> torch.Tensor:
        """(n,) captions -> (n, E) student vectors; a language with no image in the batch
        gives an empty tensor (and a zero loss term)."""
        if captions:
            return self.student.encode_text(captions)
        return self.train_split.images.new_zeros((0, self.train_split.images.shape[1]))

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_sum(terms, self.cfg.distill, self.cfg.cross_distill)

    def validate(self) -> Validation | None:
        return (
            None
            if self.val_split is None
            else Validation(
                evaluate_languages(
                    self.student, self.val_split, self.store if self.cfg.train_image else None
                )
            )
        )

    def save(self, folder: Path, extra: dict) -> None:
        save_model(folder, self.student, torch.float32, extra)

    def resume(self, folder: Path, state: dict) -> None:
        load_state_into(self.student, folder / "model.safetensors")


def align(
    cfg: AlignConfig,
    out: str | Path,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the student as the config says (`lightningdot.training.loop.fit`): `out/best` on
    a better mean val AR, `out/last` after every epoch, resumed when interrupted. Returns the
    best metrics."""
    return fit(AlignTask, cfg, "align", out, on_step, log)
