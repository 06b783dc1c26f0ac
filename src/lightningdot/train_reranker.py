"""Training of the cross-attention re-ranker on hard negatives mined by the bi-encoder.

An epoch goes once through the training captions. Each step takes a batch of them with their
images, and asks the re-ranker to pick, in both directions, the right answer among it and
`negatives` wrong ones drawn from the bi-encoder's own top `mine_from`: exactly the confusions
re-ranking exists to fix. The bi-encoder is frozen, so the states the cross-encoder reads are
computed once, before the first step. The loss is on the cross logit plus `train_fusion` x the
bi-encoder's logit, and the weight used at query time (`reranker.fusion`) can be chosen on val
from `fusion_grid`. The bi-encoder's logit (dot / temperature) is large next to a cross logit
that starts near zero; `train_fusion = 0` takes it out of training, so the cross-attention
model has to rank on its own.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lightningdot.checkpoint import load_model
from lightningdot.config import RerankTrainConfig, to_dict
from lightningdot.encoders import BiEncoder
from lightningdot.features import FeatureStore
from lightningdot.io import atomic_dir
from lightningdot.objectives import itm_loss
from lightningdot.prior import hub_prior
from lightningdot.rerank import (
    Reranker,
    caption_states,
    evaluate_reranked,
    gallery_states,
    save_reranker,
    vectors_of_states,
)
from lightningdot.train import (
    TrainData,
    effective_bf16,
    load_split,
    mixed_precision,
    peak_rss_mb,
    seed_everything,
    take_step,
    warmup_cosine,
)


@dataclass
class Mined:
    text: torch.Tensor  # (C, E) the bi-encoder's caption vectors
    image: torch.Tensor  # (G, E) its image vectors
    image_prior: torch.Tensor  # (G,) query-bank prior of each image (zeros without a bank)
    caption_prior: torch.Tensor  # (C,) and of each caption
    hard_images: torch.Tensor  # (C, k) its top-k wrong images per caption
    hard_captions: torch.Tensor  # (G, k) its top-k wrong captions per image

    def dot_t2i(self, captions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The bi-encoder's scores, as its index returns them: (B,) captions x (B, n) images."""
        return (self.text[captions, None] * self.image[images]).sum(-1) + self.image_prior[images]

    def dot_i2t(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """(B,) images x (B, n) captions."""
        dot = (self.text[captions] * self.image[images, None]).sum(-1)
        return dot + self.caption_prior[captions]


@torch.inference_mode()
def mine(bi: BiEncoder, data: TrainData, k: int, text: torch.Tensor, image: torch.Tensor) -> Mined:
    """The top-k wrong answers of the bi-encoder, whose vectors of the data's captions and
    images are `text` and `image`, ranked as its indexes rank."""
    owner = torch.as_tensor(data.corpus.caption_image)
    image_prior, caption_prior = torch.zeros(len(image)), torch.zeros(len(text))
    if bi.bank is not None:
        image_prior = hub_prior(image, bi.bank.text, bi.bank.beta)
        caption_prior = hub_prior(text, bi.bank.image, bi.bank.beta)
    dot = text @ image.T  # (C, G)
    own = owner[:, None] == torch.arange(len(image))
    wrong_images = (dot + image_prior).masked_fill(own, float("-inf"))
    wrong_captions = (dot + caption_prior[:, None]).masked_fill(own, float("-inf")).T
    return Mined(
        text,
        image,
        image_prior,
        caption_prior,
        wrong_images.topk(k, dim=1).indices,
        wrong_captions.topk(k, dim=1).indices,
    )


def sample_columns(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n distinct entries of each row of `pool`, uniformly: (B, P) -> (B, n)."""
    pick = torch.rand(pool.shape, generator=gen).argsort(dim=1)[:, :n]
    return pool.gather(1, pick)


def drop_region_states(mask: torch.Tensor, keep: float, gen: torch.Generator) -> torch.Tensor:
    """Hide each region state with probability 1 - keep: (N, 1 + R) mask -> mask. [IMG] stays."""
    if keep == 1:
        return mask
    kept = torch.rand(mask.shape, generator=gen) < keep
    kept[:, 0] = True
    return mask * kept


def train_reranker(
    cfg: RerankTrainConfig,
    out: str | Path,
    on_step: Callable[[int, int, int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
    val_k: int = 16,
) -> dict:
    """Train a re-ranker for the recipe's bi-encoder; `out/best` holds the best val AR."""
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    bi = load_model(cfg.bi_encoder)
    reranker = Reranker(bi, dataclasses.replace(cfg.reranker))  # its fusion may be tuned below
    reranker.init_pretrained()
    cfg = dataclasses.replace(cfg, bf16=effective_bf16(cfg.bf16, reranker.cross, log))
    store = FeatureStore(cfg.data.features)
    train = load_split(cfg.data, cfg.data.train_split, store, soft_labels=False)
    val = load_split(cfg.data, cfg.data.val_split, store, False) if cfg.data.val_split else None

    log("mining hard negatives with the bi-encoder")
    image_states, image_masks = gallery_states(reranker, train.regions)
    captions = caption_states(reranker, train.corpus.captions)
    vectors = vectors_of_states(bi, captions, (image_states, image_masks), train.regions)
    mined = mine(bi, train, cfg.mine_from, *vectors)

    owner = torch.as_tensor(train.corpus.caption_image)
    steps = max(1, len(owner) // cfg.batch_size)
    params = [p for p in reranker.cross.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps * cfg.epochs, cfg.warmup)
    )
    n = cfg.negatives + 1
    best: dict = {"ar": -1.0}
    for epoch in range(cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(owner), generator=gen)
        reranker.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for step in range(steps):
            cap = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            img = owner[cap]
            images = (image_states, drop_region_states(image_masks, cfg.region_keep, gen))
            # text -> image: the caption against its image and n - 1 confusable images
            cand_img = torch.cat(
                [img[:, None], sample_columns(mined.hard_images[cap], n - 1, gen)], 1
            )
            # image -> text: the image against that caption and n - 1 confusable captions
            cand_cap = torch.cat(
                [cap[:, None], sample_columns(mined.hard_captions[img], n - 1, gen)], 1
            )
            with mixed_precision(reranker.cross, cfg.bf16):
                t2i = reranker.cross_scores(
                    captions, images, cap.repeat_interleave(n), cand_img.flatten()
                )
                i2t = reranker.cross_scores(
                    captions, images, cand_cap.flatten(), img.repeat_interleave(n)
                )
            t2i, i2t = t2i.float().view(-1, n), i2t.float().view(-1, n)
            w = cfg.train_fusion
            losses = itm_loss(
                reranker.fuse(t2i, mined.dot_t2i(cap, cand_img), w),
                reranker.fuse(i2t, mined.dot_i2t(img, cand_cap), w),
            )
            loss = (losses["itm_t2i"] + losses["itm_i2t"]) / 2
            values = take_step(loss, losses, optimizer, scheduler, params, cfg.grad_clip, sums)
            if on_step:
                on_step(epoch, step, steps, values)
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "seconds": round(seconds, 2),
            "queries_per_s": round(2 * steps * cfg.batch_size / seconds, 2),
            "loss": {k: round(v / steps, 5) for k, v in sums.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if val is not None:
            args = (reranker, val.corpus.captions, val.corpus.caption_image, val.regions, val_k)
            if cfg.fusion_grid:
                sweep = evaluate_reranked(*args, fusions=cfg.fusion_grid)
                record["val_fusion_ar"] = {str(w): round(m["ar"], 3) for w, m in sweep.items()}
                reranker.cfg.fusion = max(sweep, key=lambda w: sweep[w]["ar"])
                metrics = sweep[reranker.cfg.fusion]
            else:
                metrics = evaluate_reranked(*args)
            record["fusion"] = reranker.cfg.fusion
            record["val"] = metrics
            if metrics["ar"] > best["ar"]:
                best = metrics
                with atomic_dir(out / "best") as tmp:
                    save_reranker(
                        tmp, reranker, cfg.bi_encoder, extra=meta(cfg, epoch, metrics, val_k)
                    )
        with atomic_dir(out / "last") as tmp:
            save_reranker(
                tmp, reranker, cfg.bi_encoder, extra=meta(cfg, epoch, record.get("val"), val_k)
            )
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log(json.dumps(record))
    return best if val is not None else {}


def meta(cfg: RerankTrainConfig, epoch: int, val: dict | None, val_k: int) -> dict:
    extra = {"val": val, "val_rerank_k": val_k} if val else {}
    return {"train": to_dict(cfg), "epoch": epoch + 1, **extra}
