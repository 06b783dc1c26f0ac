"""Pre-training (VMLM + SMRM + CMR) and fine-tuning (CMR) of the bi-encoder.

One loop serves both: the recipe's objective weights choose the tasks. It runs as a single
process or under `torchrun` (DistributedDataParallel, gloo on CPU, nccl on GPU), where each rank
takes a slice of every epoch and CMR's negatives are gathered from all ranks.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lightningdot.checkpoint import load_state_into, read_model_config, save_model
from lightningdot.config import DataConfig, TrainConfig, from_dict, require_same, to_dict
from lightningdot.data import Corpus, read_karpathy
from lightningdot.encoders import BiEncoder
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.evaluate import RetrievalEvaluator
from lightningdot.features import FeatureStore, RegionBatch
from lightningdot.heads import PretrainHeads
from lightningdot.io import atomic_dir
from lightningdot.masking import drop_regions, mask_regions, mask_tokens
from lightningdot.objectives import IGNORE, cmr_loss, fuse, smrm_loss, vmlm_loss


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group torchrun describes in the environment (a no-op outside it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank, keeping the gradient of this rank's part."""
    if world()[1] == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x))


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
        w = cfg.objectives
        self.heads = None
        if w.vmlm or w.smrm:
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
        w, text, image = self.cfg.objectives, self.model.text, self.model.image
        device = self.model.logit_scale.device
        regions = regions.to(device)  # also fp16 storage -> fp32
        if hard_negatives is not None:
            hard_negatives = hard_negatives.to(device)
        ids, att = tokens["input_ids"], tokens["attention_mask"]
        text_states = text(ids, att)  # (B, T, H)
        image_states = image(regions)  # (B, 1+R, H)
        losses: dict[str, torch.Tensor] = {}
        if w.cmr:
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
            for name, t, i, h, scale in per_view:
                terms = cmr_loss(gather_across_ranks(t), gather_across_ranks(i), scale, h)
                losses.update({name + key.removeprefix("cmr"): v for key, v in terms.items()})
        if w.vmlm:
            tok = self.model.tokenizer
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
            states = fuse(text(masked_ids.to(ids.device), att), image_states[:, 0])
            picked = labels != IGNORE
            words = text.bert.embeddings.word_embeddings.weight
            logits = self.heads.mlm_logits(states[picked], words)  # only masked tokens: (N, V)
            losses.update(vmlm_loss(logits.unsqueeze(0), labels[picked].unsqueeze(0)))
        if w.smrm:
            masked = mask_regions(regions.mask.cpu(), self.cfg.mask_prob, generator).to(ids.device)
            states = fuse(image(regions, masked)[:, 1:], text.pool(text_states, att))
            picked = states[masked]  # (N, H)
            soft = None if regions.soft_labels is None else regions.soft_labels[masked]
            losses.update(
                smrm_loss(
                    self.heads.region_features(picked).unsqueeze(0),
                    regions.features[masked].unsqueeze(0),
                    self.heads.region_classes(picked).unsqueeze(0),
                    None if soft is None else soft.unsqueeze(0),
                    torch.ones(1, len(picked), dtype=torch.bool, device=picked.device),
                )
            )
        return losses


def total_loss(losses: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """Sum the named terms, each objective weighted and its terms averaged where paired."""
    w = cfg.objectives
    total = torch.zeros((), device=next(iter(losses.values())).device)
    for view in CMR_VIEWS:
        if f"{view}_t2i" in losses:
            total = total + w.cmr * (losses[f"{view}_t2i"] + losses[f"{view}_i2t"]) / 2
    if "vmlm" in losses:
        total = total + w.vmlm * losses["vmlm"]
    if "smrm_mrfr" in losses:
        total = total + w.smrm * (losses["smrm_mrfr"] + losses.get("smrm_kl", 0.0))
    return total


@dataclass
class TrainData:
    corpus: Corpus
    regions: RegionBatch  # preloaded, in corpus order


def load_split(data: DataConfig, split: str, store: FeatureStore, soft_labels: bool) -> TrainData:
    corpus = read_karpathy(data.annotations, split)
    missing = [im.key for im in corpus.images if im.key not in store]
    if missing:
        raise DataError(
            f"{len(missing)} {split} image(s) have no features in {store.root} "
            f"(e.g. {missing[0]}); run `ldot extract` first"
        )
    corpus = Corpus([im for im in corpus.images if im.captions])
    regions = store.batch(corpus.keys())
    if not soft_labels:
        regions.soft_labels = None
    return TrainData(corpus, regions)


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


def build_optimizer(module: PretrainingModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    return adamw(
        module,
        lambda name: cfg.text_lr if name.startswith("model.text.bert.") else cfg.lr,
        cfg.weight_decay,
    )


def adamw(
    module: nn.Module, lr_of: Callable[[str], float], weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over the module's trainable parameters, each at `lr_of(its name)`; biases,
    LayerNorms and the temperature are not decayed."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "LayerNorm" in name or name.endswith("logit_scale")
        groups.setdefault((lr_of(name), 0.0 if no_decay else weight_decay), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    )


def mixed_precision(model: nn.Module, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on the model's device, or a no-op when not `enabled`."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware. A CPU without AVX512-BF16 or
    AMX emulates them, several times slower than float32."""
    if device == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device != "cuda" or torch.cuda.is_bf16_supported()


def effective_bf16(requested: bool, model: nn.Module, log: Callable[[str], None]) -> bool:
    """`requested`, unless the model's device would only emulate bfloat16: then False, and the
    log says so. A recipe written on one machine stays fast on another."""
    device = next(model.parameters()).device.type
    if requested and not native_bf16(device):
        log(
            f"bf16 asked for, but this {device} has no native bfloat16 (emulated, it is several "
            "times slower than float32): training in float32"
        )
        return False
    return requested


def take_step(
    loss: torch.Tensor,
    losses: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: Iterable[nn.Parameter],
    grad_clip: float,
    sums: dict[str, float],
) -> dict[str, float]:
    """One optimiser and schedule step on `loss`, gradients clipped to `grad_clip` (0: not).
    Returns the step's terms and "loss" as floats, and adds them to the epoch's `sums`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    values = {k: float(v.detach()) for k, v in losses.items()} | {"loss": float(loss.detach())}
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v
    return values


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    scores = texts @ images.T
    scores.fill_diagonal_(float("-inf"))
    model.train(was)
    return scores.topk(k, dim=1).indices


StepCallback = Callable[[int, int, int, dict[str, float]], None]  # epoch, step, steps, losses


def train(
    cfg: TrainConfig,
    out: str | Path,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train as the recipe says, writing `out/last` each epoch and `out/best` on a better val AR.

    Resumes from `out/last` when it holds a run of the same recipe. Returns the best metrics.
    """
    out = Path(out)
    init_distributed()
    rank, world_size = world()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    store = FeatureStore(cfg.data.features)
    check_store(cfg, store)
    train_data = load_split(
        cfg.data, cfg.data.train_split, store, soft_labels=bool(cfg.objectives.smrm)
    )
    val_data = (
        load_split(cfg.data, cfg.data.val_split, store, False) if cfg.data.val_split else None
    )

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
    module = PretrainingModel(model, cfg).to(device)
    wrapped: nn.Module = module
    if world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)

    n_images = len(train_data.corpus.images)
    per_rank = n_images // world_size
    steps_per_epoch = max(1, per_rank // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(module, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup))

    start_epoch, best = 0, {"ar": -1.0}
    state_path = out / "last" / "train_state.pt"
    if state_path.is_file():
        saved = json.loads((out / "last" / "config.json").read_text())
        require_same(cfg, from_dict(TrainConfig, saved["train"]), f"the run in {out}")
        load_state_into(model, out / "last" / "model.safetensors")
        state = torch.load(state_path, weights_only=True)
        if module.heads is not None:
            module.heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        if start_epoch < cfg.epochs:
            log(f"resuming {out} at epoch {start_epoch + 1}/{cfg.epochs}")
        else:
            log(f"{out} has finished all {cfg.epochs} epochs; nothing to do")

    evaluator = None
    if val_data is not None:
        evaluator = RetrievalEvaluator(val_data.corpus, lambda: val_data.regions.chunks(256))

    captions = train_data.corpus.images
    offsets = np.cumsum([0] + [len(im.captions) for im in captions])
    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(n_images, generator=gen)
        # One caption per image per epoch: a batch never holds two captions of one image, so
        # in-batch negatives are true negatives.
        pick = [
            int(offsets[i]) + int(torch.randint(len(captions[i].captions), (1,), generator=gen))
            for i in range(n_images)
        ]
        hard_idx = None
        if cfg.hard_negatives and epoch > 0:
            hard_idx = mine_hard_negatives(model, train_data, pick, cfg.hard_negatives)
        mine = order[rank * per_rank : (rank + 1) * per_rank]
        module.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        flat = train_data.corpus.captions
        for step in range(steps_per_epoch):
            idx = mine[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            tokens = model.tokenize([flat[pick[i]] for i in idx.tolist()])
            tokens = {k: v.to(device) for k, v in tokens.items()}
            regions = drop_regions(train_data.regions.select(idx), cfg.region_keep, gen)
            regions = regions.to(device)
            hard = None
            if hard_idx is not None:
                hard = train_data.regions.select(hard_idx[idx].flatten()).to(device)
            losses = wrapped(tokens, regions, gen, hard)
            loss = total_loss(losses, cfg)
            values = take_step(
                loss, losses, optimizer, scheduler, module.parameters(), cfg.grad_clip, sums
            )
            with torch.no_grad():
                for scale in model.logit_scales:
                    scale.clamp_(0, math.log(100.0))
            if on_step and rank == 0:
                on_step(epoch, step, steps_per_epoch, values)
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "world_size": world_size,
            "seconds": round(seconds, 2),
            "pairs_per_s": round(steps_per_epoch * cfg.batch_size * world_size / seconds, 2),
            "loss": {k: round(v / steps_per_epoch, 5) for k, v in sums.items()},
            "temperature": [round(1.0 / float(s.detach().exp()), 5) for s in model.logit_scales],
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if device.type == "cuda":
            record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if evaluator is not None and rank == 0:
            metrics = evaluator(model)
            record["val"] = metrics
            if metrics["ar"] > best["ar"]:
                best = metrics
                save_run(out / "best", model, cfg, {"val": metrics, "epoch": epoch + 1})
        if rank == 0:
            save_run(
                out / "last",
                model,
                cfg,
                {"epoch": epoch + 1},
                module,
                optimizer,
                scheduler,
                epoch,
                best,
            )
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log(json.dumps(record))
    if evaluator is None:
        return {}
    return best


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def save_run(
    folder: Path,
    model: BiEncoder,
    cfg: TrainConfig,
    extra: dict,
    module: PretrainingModel | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    epoch: int = 0,
    best: dict | None = None,
) -> None:
    """Write a checkpoint folder beside `folder` and swap it in whole."""
    with atomic_dir(folder) as tmp:
        save_model(tmp, model, torch.float32, {"train": to_dict(cfg), **extra})
        if optimizer is not None:
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best": best,
                "heads": None
                if module is None or module.heads is None
                else module.heads.state_dict(),
            }
            torch.save(state, tmp / "train_state.pt")
