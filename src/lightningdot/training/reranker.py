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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lightningdot.config import RerankTrainConfig
from lightningdot.evaluation.evaluate import evaluate_reranked
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import (
    load_model,
    load_state_into,
    read_folder_config,
    save_reranker,
)
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.prior import hub_prior
from lightningdot.model.reranker import (
    Reranker,
    caption_states,
    gallery_states,
    vectors_of_states,
)
from lightningdot.training.data import TrainData, load_split
from lightningdot.training.loop import StepCallback, Task, Validation, fit
from lightningdot.training.objectives import itm_loss


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
def mine_negatives(
    bi: BiEncoder, data: TrainData, k: int, text: torch.Tensor, image: torch.Tensor
) -> Mined:
    """The top-k wrong answers of the bi-encoder, whose vectors of the data's captions and
    images are `text` and `image`, ranked as its indexes rank."""
    owner = torch.as_tensor(data.corpus.caption_image)
    image_prior, caption_prior = torch.zeros(len(image)), torch.zeros(len(text))
    if bi.bank is not None:
        image_prior = hub_prior(image, bi.bank.text, bi.bank.beta)
        caption_prior = hub_prior(text, bi.bank.image, bi.bank.beta)
    dot = bi.score(text, image)  # (C, G)
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


class RerankerTask(Task):
    """Each epoch, every training caption once, as a text->image and an image->text query
    against the right answer and negatives the bi-encoder confuses."""

    unit = "queries"

    def __init__(self, cfg: RerankTrainConfig, val_k: int, log: Callable[[str], None]) -> None:
        self.cfg, self.val_k = cfg, val_k
        bi = load_model(cfg.bi_encoder)
        bi.drop_concepts()  # the re-ranker learns on the main vectors' candidates and priors
        # A copy of the recipe's re-ranker config: validation may tune its fusion weight.
        self.reranker = self.module = Reranker(bi, dataclasses.replace(cfg.reranker))
        self.reranker.init_pretrained()
        store = FeatureStore(cfg.data.features)
        train = load_split(cfg.data, cfg.data.train_split, store, soft_labels=False)
        val = cfg.data.val_split
        self.val = load_split(cfg.data, val, store, False) if val else None
        log("mining hard negatives with the bi-encoder")
        # The bi-encoder is frozen: the states the cross-encoder reads are computed once.
        self.image_states = gallery_states(self.reranker, train.regions)
        self.caption_states = caption_states(self.reranker, train.corpus.captions)
        vectors = vectors_of_states(bi, self.caption_states, self.image_states, train.regions)
        self.mined = mine_negatives(bi, train, cfg.mine_from, *vectors)
        self.owner = torch.as_tensor(train.corpus.caption_image)
        self.items_per_step = 2 * cfg.loop.batch_size

    def steps_per_epoch(self) -> int:
        return max(1, len(self.owner) // self.cfg.loop.batch_size)

    def param_groups(self) -> list[dict]:
        # One group, all decayed, as the shipped re-ranker was trained.
        params = [p for p in self.reranker.cross.parameters() if p.requires_grad]
        return [
            {"params": params, "lr": self.cfg.loop.lr, "weight_decay": self.cfg.loop.weight_decay}
        ]

    def batches(self, epoch: int, gen: torch.Generator) -> Iterator[tuple]:
        cfg, b, n = self.cfg, self.cfg.loop.batch_size, self.cfg.negatives + 1
        order = torch.randperm(len(self.owner), generator=gen)
        states, masks = self.image_states
        for step in range(self.steps_per_epoch()):
            cap = order[step * b : (step + 1) * b]
            img = self.owner[cap]
            images = (states, drop_region_states(masks, cfg.region_keep, gen))
            # text -> image: the caption against its image and n - 1 confusable images
            hard_images = sample_columns(self.mined.hard_images[cap], n - 1, gen)
            # image -> text: the image against that caption and n - 1 confusable captions
            hard_captions = sample_columns(self.mined.hard_captions[img], n - 1, gen)
            cand_img = torch.cat([img[:, None], hard_images], 1)
            cand_cap = torch.cat([cap[:, None], hard_captions], 1)
            yield cap, img, images, cand_img, cand_cap

    def loss_terms(self, batch: tuple, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cap, img, images, cand_img, cand_cap = batch
        n, rr = cand_img.shape[1], self.reranker
        t2i = rr.cross_scores(
            self.caption_states, images, cap.repeat_interleave(n), cand_img.flatten()
        )
        i2t = rr.cross_scores(
            self.caption_states, images, cand_cap.flatten(), img.repeat_interleave(n)
        )
        w = self.cfg.train_fusion
        return itm_loss(
            rr.fused_score(t2i.float().view(-1, n), self.mined.dot_t2i(cap, cand_img), w),
            rr.fused_score(i2t.float().view(-1, n), self.mined.dot_i2t(img, cand_cap), w),
        )

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return (terms["itm_t2i"] + terms["itm_i2t"]) / 2

    def validate(self) -> Validation | None:
        if self.val is None:
            return None
        val, rr = self.val, self.reranker
        args = (rr, val.corpus.captions, val.corpus.caption_image, val.regions, self.val_k)
        if not self.cfg.fusion_grid:
            return Validation(evaluate_reranked(*args), {"fusion": rr.cfg.fusion})
        sweep = evaluate_reranked(*args, fusions=self.cfg.fusion_grid)
        rr.cfg.fusion = max(sweep, key=lambda w: sweep[w]["ar"])
        return Validation(
            sweep[rr.cfg.fusion],
            {
                "val_fusion_ar": {str(w): round(m["ar"], 3) for w, m in sweep.items()},
                "fusion": rr.cfg.fusion,
            },
        )

    def save(self, folder: Path, extra: dict) -> None:
        if "val" in extra:
            extra = {**extra, "val_rerank_k": self.val_k}
        save_reranker(folder, self.reranker, self.cfg.bi_encoder, extra=extra)

    def resume(self, folder: Path, state: dict) -> None:
        load_state_into(self.reranker.cross, folder / "model.safetensors")
        self.reranker.cfg.fusion = read_folder_config(folder, "reranker")["reranker"]["fusion"]


def train_reranker(
    cfg: RerankTrainConfig,
    out: str | Path,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
    val_k: int = 16,
) -> dict:
    """Train a re-ranker for the recipe's bi-encoder (`lightningdot.training.loop.fit`);
    `out/best` holds the best val AR re-ranking the top `val_k`."""
    return fit(lambda c: RerankerTask(c, val_k, log), cfg, "train", out, on_step, log)
