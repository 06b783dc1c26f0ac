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
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lightningdot.checkpoint import SHIPPED, index_identity, load_model, resolve_model, save_model
from lightningdot.config import AlignConfig, ModelConfig, to_dict
from lightningdot.data import Corpus, read_karpathy
from lightningdot.encoders import BiEncoder
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.evaluate import encode_region_batches, encode_texts, recall_metrics, store_batches
from lightningdot.features import FeatureStore
from lightningdot.io import atomic_dir
from lightningdot.objectives import cmr_loss
from lightningdot.train import (
    StepCallback,
    adamw,
    effective_bf16,
    mixed_precision,
    peak_rss_mb,
    seed_everything,
    take_step,
    warmup_cosine,
)


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
    images = encode_region_batches(teacher, store_batches(store, keys))
    return Split([Path(a).stem for a in cfg.annotations], aligned, images)


def student_config(cfg: AlignConfig, teacher: BiEncoder) -> ModelConfig:
    mine, theirs = cfg.text.size, teacher.cfg.text.size
    shape = ("hidden_size", "num_heads", "intermediate_size")
    if any(getattr(mine, a) != getattr(theirs, a) for a in shape):
        # The image transformer takes its shape from the text side's (`ImageEncoder`).
        raise ConfigMismatchError(
            "the student's text size must have the teacher's "
            + ", ".join(f"{a} {getattr(theirs, a)}" for a in shape)
            + " to hold its image encoder; the config gives "
            + ", ".join(f"{a} {getattr(mine, a)}" for a in shape)
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
        if cfg.teacher in SHIPPED
        else str(resolve_model(cfg.teacher).resolve()),
    )


def make_student(cfg: AlignConfig, teacher: BiEncoder) -> BiEncoder:
    student = BiEncoder(student_config(cfg, teacher))
    student.init_pretrained()
    student.adopt_image_side(teacher)
    return student


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


def total(losses: dict[str, torch.Tensor], distill: float, cross_distill: float) -> torch.Tensor:
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
def evaluate_languages(student: BiEncoder, split: Split, bf16: bool = False) -> dict:
    """Recall metrics per language on the split, and their mean AR as "ar"."""
    was = student.training
    student.eval()
    with mixed_precision(student, bf16):
        texts = [encode_texts(student, c.captions).float() for c in split.corpora]
    per = {
        lang: recall_metrics(vectors, split.images, c.caption_image, student.bank)
        for lang, vectors, c in zip(split.languages, texts, split.corpora, strict=True)
    }
    student.train(was)
    return {"ar": sum(m["ar"] for m in per.values()) / len(per), "languages": per}


def align(
    cfg: AlignConfig,
    out: str | Path,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the student as the config says; `out/best` on a better mean val AR, `out/last`
    after every epoch, a line per epoch in `out/log.jsonl`. Returns the best metrics."""
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    teacher = load_model(cfg.teacher)
    store = FeatureStore(cfg.features)
    with torch.inference_mode():
        train = load_split(cfg, cfg.train_split, store, teacher)
        val = load_split(cfg, cfg.val_split, store, teacher) if cfg.val_split else None
        teacher_text = encode_texts(teacher, train.corpora[0].captions)
        teacher_centroids = centroids(teacher_text, train.corpora[0]) if cfg.cross_distill else None
    student = make_student(cfg, teacher)
    del teacher
    cfg = dataclasses.replace(cfg, bf16=effective_bf16(cfg.bf16, student, log))

    optimizer = adamw(
        student,
        lambda name: cfg.head_lr if name.startswith(("text.proj", "text.pooled_proj")) else cfg.lr,
        cfg.weight_decay,
    )
    params = [p for p in student.parameters() if p.requires_grad]
    n_images = len(train.images)
    steps = max(1, n_images // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps * cfg.epochs, cfg.warmup)
    )
    offsets = [
        torch.tensor([0] + [len(im.captions) for im in c.images]).cumsum(0) for c in train.corpora
    ]
    flat = [c.captions for c in train.corpora]
    best: dict = {"ar": -1.0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.jsonl").write_text("")  # a run starts over (no resume: it takes minutes)
    for epoch in range(cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(n_images, generator=gen)
        student.train()
        t0, sums = time.perf_counter(), {}
        for step in range(steps):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            picks = [
                (
                    off[idx]
                    + (torch.rand(len(idx), generator=gen) * (off[idx + 1] - off[idx])).long()
                )
                for off in offsets
            ]
            with mixed_precision(student, cfg.bf16):
                vectors = [
                    student.encode_text([texts[i] for i in pick.tolist()]).float()
                    for texts, pick in zip(flat, picks, strict=True)
                ]
            losses = align_losses(
                vectors,
                train.images[idx],
                student.logit_scale,
                teacher_text[picks[0]],
                train.languages,
                None if teacher_centroids is None else teacher_centroids[idx],
            )
            loss = total(losses, cfg.distill, cfg.cross_distill)
            values = take_step(loss, losses, optimizer, scheduler, params, cfg.grad_clip, sums)
            if on_step:
                on_step(epoch, step, steps, values)
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "seconds": round(seconds, 2),
            "images_per_s": round(steps * cfg.batch_size / seconds, 2),
            "loss": {k: round(v / steps, 5) for k, v in sums.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        extra = {"align": to_dict(cfg), "epoch": epoch + 1}
        if val is not None:
            metrics = evaluate_languages(student, val, cfg.bf16)
            record["val"] = metrics
            if metrics["ar"] > best["ar"]:
                best = metrics
                save_checkpoint(out / "best", student, {**extra, "val": metrics})
        save_checkpoint(out / "last", student, extra)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log(json.dumps(record))
    return best if val is not None else {}


def save_checkpoint(folder: Path, model: BiEncoder, extra: dict) -> None:
    with atomic_dir(folder) as tmp:
        save_model(tmp, model, torch.float32, extra)
