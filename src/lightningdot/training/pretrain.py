"""Pre-training (VMLM + SMRM + CMR) and fine-tuning (CMR) of the bi-encoder.

One task serves both: the recipe's objective weights choose the objectives. It runs as a single
process or under `torchrun` (DistributedDataParallel, gloo on CPU, nccl on GPU), where each rank
takes a slice of every epoch and CMR's negatives are gathered from all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightningdot.config import ObjectiveWeights, TrainConfig, require_same
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.evaluation.evaluate import evaluate_model
from lightningdot.features import FeatureStore, RegionBatch
from lightningdot.model.checkpoint import load_state_into, read_model_config, save_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.heads import PretrainHeads
from lightningdot.training.data import TrainData, load_split
from lightningdot.training.distributed import gather_across_ranks, local_device, world
from lightningdot.training.loop import StepCallback, Task, Validation, fit
from lightningdot.training.masking import drop_regions, mask_regions, mask_tokens
from lightningdot.training.objectives import (
    IGNORE,
    add_global_state,
    cmr_loss,
    smrm_loss,
    vmlm_loss,
)
from lightningdot.training.optim import decay_groups

# Loss-term prefix of each view's CMR, in the order of `BiEncoder.logit_scales`.
CMR_VIEWS = ("cmr", "cmr_pooled")


class PretrainingModel(nn.Module):
    """The bi-encoder plus the pre-training heads; `forward` returns the named loss terms.

    Everything that needs gradients flows through `forward` so that DDP can synchronise it.
    """

    def __init__(self, model: BiEncoder, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.heads = None
        if cfg.objectives.vmlm or cfg.objectives.smrm:
            m = cfg.model
            self.heads = PretrainHeads(
                m.text.size.hidden_size,
                m.image.feature_dim,
                m.image.num_classes,
                m.text.size.vocab_size,
            )

    def forward(
        self,
        tokens: dict[str, torch.Tensor],
        regions: RegionBatch,
        generator: torch.Generator,
        hard_negatives: RegionBatch | None = None,
    ) -> dict[str, torch.Tensor]:
        w = self.cfg.objectives
        device = self.model.logit_scale.device
        regions = regions.to(device)  # also fp16 storage -> fp32
        if hard_negatives is not None:
            hard_negatives = hard_negatives.to(device)
        ids, att = tokens["input_ids"], tokens["attention_mask"]
        text_states = self.model.text(ids, att)  # (B, T, H)
        image_states = self.model.image(regions)  # (B, 1+R, H)
        losses: dict[str, torch.Tensor] = {}
        if w.cmr:
            losses |= self._cmr(text_states, att, image_states, regions, hard_negatives)
        if w.vmlm:
            losses |= self._vmlm(ids, att, image_states[:, 0], generator)
        if w.smrm:
            losses |= self._smrm(regions, self.model.text.pool(text_states, att), generator)
        return losses

    def _cmr(self, text_states, att, image_states, regions, hard_negatives):
        """CMR of each view, over the batch gathered from every rank."""
        text, image = self.model.text, self.model.image
        hard = [None] * len(self.model.logit_scales)
        if hard_negatives is not None:
            k = len(hard_negatives) // len(regions)
            views = image.views(image(hard_negatives), hard_negatives)
            hard = [gather_across_ranks(v.view(len(regions), k, -1)) for v in views]
        scales = self.model.logit_scales
        per_view = zip(
            CMR_VIEWS[: len(scales)],
            text.views(text_states, att),
            image.views(image_states, regions),
            hard,
            scales,
            strict=True,
        )
        losses = {}
        for name, t, i, h, scale in per_view:
            terms = cmr_loss(gather_across_ranks(t), gather_across_ranks(i), scale, h)
            losses |= {name + key.removeprefix("cmr"): v for key, v in terms.items()}
        return losses

    def _vmlm(self, ids, att, image_global, generator):
        """Masked tokens predicted from the text states plus the image's [IMG] state."""
        text, tok = self.model.text, self.model.tokenizer
        special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (att == 0)
        masked_ids, labels = mask_tokens(
            ids.cpu(),
            special.cpu(),
            tok.mask_token_id,
            self.cfg.model.text.size.vocab_size,
            self.cfg.mask_prob,
            generator,
        )
        labels = labels.to(ids.device)
        states = add_global_state(text(masked_ids.to(ids.device), att), image_global)
        picked = labels != IGNORE
        words = text.bert.embeddings.word_embeddings.weight
        logits = self.heads.mlm_logits(states[picked], words)  # only masked tokens: (N, V)
        return vmlm_loss(logits.unsqueeze(0), labels[picked].unsqueeze(0))

    def _smrm(self, regions, text_global, generator):
        """Masked regions' features and classes predicted from the region states plus the
        text's pooled state."""
        device = text_global.device
        masked = mask_regions(regions.mask.cpu(), self.cfg.mask_prob, generator).to(device)
        states = add_global_state(self.model.image(regions, masked)[:, 1:], text_global)
        picked = states[masked]  # (N, H)
        soft = None if regions.soft_labels is None else regions.soft_labels[masked]
        return smrm_loss(
            self.heads.region_features(picked).unsqueeze(0),
            regions.features[masked].unsqueeze(0),
            self.heads.region_classes(picked).unsqueeze(0),
            None if soft is None else soft.unsqueeze(0),
            torch.ones(1, len(picked), dtype=torch.bool, device=picked.device),
        )


def weighted_loss(losses: dict[str, torch.Tensor], w: ObjectiveWeights) -> torch.Tensor:
    """Sum the named terms, each objective weighted and its terms averaged where paired."""
    total = torch.zeros((), device=next(iter(losses.values())).device)
    for view in CMR_VIEWS:
        if f"{view}_t2i" in losses:
            total = total + w.cmr * (losses[f"{view}_t2i"] + losses[f"{view}_i2t"]) / 2
    if "vmlm" in losses:
        total = total + w.vmlm * losses["vmlm"]
    if "smrm_mrfr" in losses:
        total = total + w.smrm * (losses["smrm_mrfr"] + losses.get("smrm_kl", 0.0))
    return total


def check_store(cfg: TrainConfig, store: FeatureStore) -> None:
    want = cfg.model.image
    if store.info.feature_dim != want.feature_dim:
        raise ConfigMismatchError(
            f"feature store {store.root} has {store.info.feature_dim}-d regions; "
            f"model.image.feature_dim is {want.feature_dim}"
        )
    if cfg.objectives.smrm and store.info.num_classes not in (0, want.num_classes):
        raise ConfigMismatchError(
            f"feature store has {store.info.num_classes} region classes; "
            f"model.image.num_classes is {want.num_classes}"
        )


@torch.inference_mode()
def mine_hard_negatives(
    model: BiEncoder, data: TrainData, caption_of: list[int], k: int, batch: int = 256
) -> torch.Tensor:
    """For each image's caption this epoch, the k most similar other images: (N, k) indices."""
    was = model.training
    model.eval()
    captions = data.corpus.captions
    texts = torch.cat(
        [
            model.encode_text([captions[c] for c in caption_of[s : s + batch]])
            for s in range(0, len(caption_of), batch)
        ]
    )
    images = torch.cat([model.encode_image(chunk) for chunk in data.regions.chunks(batch)])
    scores = model.score(texts, images)
    scores.fill_diagonal_(float("-inf"))
    model.train(was)
    return scores.topk(k, dim=1).indices


def param_groups(module: PretrainingModel, cfg: TrainConfig) -> list[dict]:
    """The pretrained text layers at `text_lr`, everything else at the loop's `lr`."""
    text_lr, lr = cfg.text_lr, cfg.loop.lr
    return decay_groups(
        module,
        lambda name: text_lr if name.startswith("model.text.bert.") else lr,
        cfg.loop.weight_decay,
    )


def init_model(cfg: TrainConfig) -> BiEncoder:
    """The bi-encoder a run starts from: packaged weights, or the `init_from` checkpoint."""
    model = BiEncoder(cfg.model)
    model.init_pretrained(cfg.temperature)
    if cfg.init_from:
        init_cfg, _ = read_model_config(Path(cfg.init_from))
        require_same(cfg.model, init_cfg, f"init_from checkpoint {cfg.init_from}")
        load_state_into(model, Path(cfg.init_from) / "model.safetensors")
        if not cfg.learn_temperature:
            for scale in model.logit_scales:
                scale.data.fill_(math.log(1.0 / cfg.temperature))
    for scale in model.logit_scales:
        scale.requires_grad_(cfg.learn_temperature)
    return model


class PretrainTask(Task):
    """Each epoch, every training image once with one of its captions (in a random order, this
    rank's slice of it), with the recipe's objectives."""

    unit = "pairs"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.device = cfg, local_device()
        store = FeatureStore(cfg.data.features)
        check_store(cfg, store)
        smrm = bool(cfg.objectives.smrm)
        self.train_data = load_split(cfg.data, cfg.data.train_split, store, soft_labels=smrm)
        val = cfg.data.val_split
        self.val_data = load_split(cfg.data, val, store, False) if val else None
        self.model = init_model(cfg)
        self.module = PretrainingModel(self.model, cfg).to(self.device)
        self.rank, world_size = world()
        self.wrapped: nn.Module = self.module
        if world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.module, find_unused_parameters=True
            )
        self.per_rank = len(self.train_data.corpus.images) // world_size
        self.items_per_step = cfg.loop.batch_size * world_size  # each rank takes a batch

    def steps_per_epoch(self) -> int:
        return max(1, self.per_rank // self.cfg.loop.batch_size)

    def param_groups(self) -> list[dict]:
        return param_groups(self.module, self.cfg)

    def batches(self, epoch: int, gen: torch.Generator) -> Iterator[tuple]:
        cfg, data = self.cfg, self.train_data
        images = data.corpus.images
        order = torch.randperm(len(images), generator=gen)
        # One caption per image per epoch: a batch never holds two captions of one image, so
        # in-batch negatives are true negatives.
        offsets = np.cumsum([0] + [len(im.captions) for im in images])
        pick = [
            int(offsets[i]) + int(torch.randint(len(images[i].captions), (1,), generator=gen))
            for i in range(len(images))
        ]
        hard_idx = None
        if cfg.hard_negatives and epoch > 0:
            hard_idx = mine_hard_negatives(self.model, data, pick, cfg.hard_negatives)
        share = order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return self._steps(share, pick, hard_idx, gen)

    def _steps(self, share, pick, hard_idx, gen: torch.Generator) -> Iterator[tuple]:
        cfg, data, b = self.cfg, self.train_data, self.cfg.loop.batch_size
        captions = data.corpus.captions
        for step in range(self.steps_per_epoch()):
            idx = share[step * b : (step + 1) * b]
            tokens = self.model.tokenize([captions[pick[i]] for i in idx.tolist()])
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
            regions = drop_regions(data.regions.select(idx), cfg.region_keep, gen)
            hard = None
            if hard_idx is not None:
                hard = data.regions.select(hard_idx[idx].flatten()).to(self.device)
            yield tokens, regions.to(self.device), hard

    def loss_terms(self, batch: tuple, gen: torch.Generator) -> dict[str, torch.Tensor]:
        tokens, regions, hard = batch
        return self.wrapped(tokens, regions, gen, hard)

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_loss(terms, self.cfg.objectives)

    def after_step(self) -> None:
        with torch.no_grad():
            for scale in self.model.logit_scales:
                scale.clamp_(0, math.log(100.0))

    def epoch_record(self) -> dict:
        scales = self.model.logit_scales
        return {"temperature": [round(1.0 / float(s.detach().exp()), 5) for s in scales]}

    def validate(self) -> Validation | None:
        if self.val_data is None:
            return None
        val = self.val_data
        return Validation(evaluate_model(self.model, val.corpus, val.regions.chunks(256)))

    def save(self, folder: Path, extra: dict) -> None:
        save_model(folder, self.model, torch.float32, extra)

    def resume(self, folder: Path, state: dict) -> None:
        load_state_into(self.model, folder / "model.safetensors")
        if self.module.heads is not None:
            self.module.heads.load_state_dict(state["heads"])

    def state(self) -> dict:
        heads = self.module.heads
        return {"heads": None if heads is None else heads.state_dict()}


def train(
    cfg: TrainConfig,
    out: str | Path,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train as the recipe says (`lightningdot.training.loop.fit`): `out/last` each epoch,
    `out/best` on a better val AR, resumed from `out/last` when it holds a run of the same
    recipe. Returns the best val metrics."""
    return fit(PretrainTask, cfg, "train", out, on_step, log, local_device())


def finetune(
    cfg: TrainConfig,
    out: str | Path,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """`train` with CMR alone, as the paper fine-tunes.

    Raises:
        DataError: the recipe weighs in VMLM or SMRM.
    """
    if cfg.objectives.vmlm or cfg.objectives.smrm:
        raise DataError("fine-tuning uses CMR alone; set vmlm = smrm = 0 in [objectives]")
    return train(cfg, out, on_step, log)
