"""`ldot align`: a new text encoder trained into an existing model's embedding space.

    teacher: image encoder ──> image vectors (computed once; frozen)  ─┐
             text encoder  ──> text vectors of its language ──────────┼─> targets
    student: new text encoder (e.g. multilingual-e5-small) ──> vectors ┘

The student keeps the teacher's image encoder, so any index the teacher built answers the
student's queries: a Chinese query is searched against the same image vectors as an English
one. Each step takes a batch of images and one caption of each in every language. The losses:
CMR against the images in every language (in-batch negatives, the teacher's temperature); in
the teacher's own language, the distance to the teacher's vector of the same caption; and,
with `cross_distill`, in the other languages the distance to the teacher's mean vector of the
image's captions in its own language.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lightningdot.config import AlignConfig, ModelConfig
from lightningdot.data import Corpus, read_karpathy
from lightningdot.encode import RegionSource, encode_collection, encode_texts
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.evaluation.metrics import recall_metrics
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import index_identity, load_model, load_state_into, save_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.shipped import is_shipped, resolve
from lightningdot.precision import in_float32
from lightningdot.training.loop import StepCallback, Task, Validation, fit
from lightningdot.training.objectives import cmr_loss
from lightningdot.training.optim import decay_groups


@dataclass
class Split:
    """One split in every language: the same images, in the same order, in each corpus."""

    languages: list[str]  # a short name per annotation file (its stem)
    corpora: list[Corpus]
    images: torch.Tensor  # (N, E) the teacher's image vectors


def load_split(cfg: AlignConfig, split: str, store: FeatureStore, teacher: BiEncoder) -> Split:
    corpora = [read_karpathy(a, split) for a in cfg.annotations]
    keys = [im.key for im in corpora[0].images if im.captions and im.key in store]
    if not keys:
        raise DataError(f"no {split} image of {cfg.annotations[0]} has features in {store.root}")
    for path, c in zip(cfg.annotations, corpora, strict=True):
        by_key = {im.key: im for im in c.images}
        missing = [k for k in keys if not by_key.get(k) or not by_key[k].captions]
        if missing:
            raise DataError(
                f"{path}: {len(missing)} {split} image(s) lack captions, e.g. {missing[0]}"
            )
    aligned = [Corpus([{im.key: im for im in c.images}[k] for k in keys]) for c in corpora]
    images = encode_collection(teacher, RegionSource.of(teacher, store), keys)
    return Split([Path(a).stem for a in cfg.annotations], aligned, images)


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
        shares_index_with=index_identity(teacher),
        # A shipped name stays a name; a folder is made absolute, to load from anywhere.
        image_from=cfg.teacher
        if is_shipped("model", cfg.teacher)
        else str(resolve("model", cfg.teacher).resolve()),
    )


def make_student(cfg: AlignConfig, teacher: BiEncoder) -> BiEncoder:
    student = BiEncoder(student_config(cfg, teacher))
    student.init_pretrained()
    student.adopt_image_side(teacher)
    return student


@in_float32
def align_losses(
    student_vectors: list[torch.Tensor],
    image_vectors: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_vectors: torch.Tensor,
    languages: list[str],
    teacher_centroids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Named loss terms of one step, from tensors alone.

    Args:
        student_vectors: per language, (B, E) unit vectors of caption i of image i.
        image_vectors: (B, E) the teacher's image vectors.
        logit_scale: the teacher's log inverse temperature.
        teacher_vectors: (B, E) the teacher's vectors of the first language's captions.
        languages: a name per entry of `student_vectors`.
        teacher_centroids: (B, E) per image, the unit mean of the teacher's vectors of all its
            first-language captions; the target of the other languages' captions, or None.

    Returns:
        {"cmr_<language>": mean of CMR's two directions, per language,
         "distill": squared distance to the teacher's vectors, first language only,
         "distill_<language>": squared distance to the centroids, other languages (if given)}.
    """
    out = {}
    for lang, vecs in zip(languages, student_vectors, strict=True):
        terms = cmr_loss(vecs, image_vectors, logit_scale)
        out[f"cmr_{lang}"] = (terms["cmr_t2i"] + terms["cmr_i2t"]) / 2
    out["distill"] = (student_vectors[0] - teacher_vectors).pow(2).sum(-1).mean()
    if teacher_centroids is not None:
        for lang, vecs in zip(languages[1:], student_vectors[1:], strict=True):
            out[f"distill_{lang}"] = (vecs - teacher_centroids).pow(2).sum(-1).mean()
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
def evaluate_languages(student: BiEncoder, split: Split) -> dict:
    """Recall metrics per language on the split, and their mean AR as "ar"."""
    was = student.training
    student.eval()
    texts = [encode_texts(student, c.captions).float() for c in split.corpora]
    per = {
        lang: recall_metrics(vectors, split.images, c.caption_image, student.bank)
        for lang, vectors, c in zip(split.languages, texts, split.corpora, strict=True)
    }
    student.train(was)
    return {"ar": sum(m["ar"] for m in per.values()) / len(per), "languages": per}


class AlignTask(Task):
    """Each epoch, every training image once, with one of its captions in every language."""

    unit = "images"

    def __init__(self, cfg: AlignConfig) -> None:
        self.cfg = cfg
        teacher = load_model(cfg.teacher)
        teacher.drop_concepts()  # the student learns the main space; it shares the view at load
        store = FeatureStore(cfg.features)
        with torch.inference_mode():
            self.train_split = load_split(cfg, cfg.train_split, store, teacher)
            self.val_split = (
                load_split(cfg, cfg.val_split, store, teacher) if cfg.val_split else None
            )
            self.teacher_text = encode_texts(teacher, self.train_split.corpora[0].captions)
            self.teacher_centroids = (
                centroids(self.teacher_text, self.train_split.corpora[0])
                if cfg.cross_distill
                else None
            )
        self.student = self.module = make_student(cfg, teacher)
        self.offsets = [
            torch.tensor([0] + [len(im.captions) for im in c.images]).cumsum(0)
            for c in self.train_split.corpora
        ]
        self.captions = [c.captions for c in self.train_split.corpora]  # flat, per language
        self.items_per_step = cfg.loop.batch_size

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_split.images) // self.cfg.loop.batch_size)

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
        order = torch.randperm(len(self.train_split.images), generator=gen)
        for step in range(self.steps_per_epoch()):
            idx = order[step * b : (step + 1) * b]
            # One caption of each image in every language, each drawn uniformly.
            picks = [
                off[idx] + (torch.rand(len(idx), generator=gen) * (off[idx + 1] - off[idx])).long()
                for off in self.offsets
            ]
            yield idx, picks

    def loss_terms(self, batch: tuple, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx, picks = batch
        vectors = [
            self.student.encode_text([captions[i] for i in pick.tolist()])
            for captions, pick in zip(self.captions, picks, strict=True)
        ]
        targets = self.teacher_centroids
        return align_losses(
            vectors,
            self.train_split.images[idx],
            self.student.logit_scale,
            self.teacher_text[picks[0]],
            self.train_split.languages,
            None if targets is None else targets[idx],
        )

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_sum(terms, self.cfg.distill, self.cfg.cross_distill)

    def validate(self) -> Validation | None:
        return (
            None
            if self.val_split is None
            else Validation(evaluate_languages(self.student, self.val_split))
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
