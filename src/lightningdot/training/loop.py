"""The one training loop: epochs of steps, validation, checkpoints, resume and the log, shared
by every trainer (after open_clip's `train_one_epoch` and its tasks).

A trainer is a `Task`: the batches of an epoch, the named loss terms of a batch and their
weighted sum, validation, and how its model is saved and loaded. `fit` does the rest, the same
way for every one of them, in the run folder:

    log.jsonl   one record per finished epoch: time, throughput, mean loss terms, val metrics
    last/       the model after the last finished epoch, with `train_state.pt` (optimiser,
                schedule, random state, epoch, best metrics, the log): a rerun of the same
                recipe resumes from it and continues the same log
    best/       the model of the best val AR so far

Each folder is replaced whole and atomically, so a run killed at any moment resumes from its
last finished epoch. A rerun with a changed recipe is refused.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightningdot.config import from_dict, require_same, to_dict
from lightningdot.errors import DataError
from lightningdot.io import atomic_dir, read_json, recover_dir, write_jsonl
from lightningdot.precision import effective_bf16, mixed_precision
from lightningdot.training.distributed import init_distributed, world
from lightningdot.training.optim import warmup_cosine

StepCallback = Callable[[int, int, int, dict[str, float]], None]  # epoch, step, steps, losses
STATE = "train_state.pt"
CPU = torch.device("cpu")


@dataclass
class Validation:
    metrics: dict  # recall metrics ("ar" picks the best epoch)
    record: dict = field(default_factory=dict)  # more fields for the epoch's log record


class Task:
    """What a trainer gives `fit`. Subclasses set the attributes and implement the methods
    that raise NotImplementedError; the others are optional hooks."""

    module: nn.Module  # put in train mode each epoch; its trainable parameters are clipped
    device: torch.device = CPU
    unit: str = "items"  # the log's `<unit>_per_s` counts these
    items_per_step: int = 1  # on all ranks together

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups, each with its "lr" and "weight_decay"."""
        raise NotImplementedError

    def batches(self, epoch: int, gen: torch.Generator) -> Iterable[Any]:
        """This rank's `steps_per_epoch()` batches of the epoch, drawn with `gen`. Work done
        before returning them (mining negatives) is not counted in the epoch's time."""
        raise NotImplementedError

    def loss_terms(self, batch: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The named loss terms of one batch (run under mixed precision when asked for)."""
        raise NotImplementedError

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the terms that the optimiser minimises."""
        raise NotImplementedError

    def save(self, folder: Path, extra: dict) -> None:
        """Write the model (and `extra` in its config.json) into an empty folder."""
        raise NotImplementedError

    def resume(self, folder: Path, state: dict) -> None:
        """Load what `save` wrote to `folder` and what `state()` returned."""
        raise NotImplementedError

    def validate(self) -> Validation | None:
        return None

    def after_step(self) -> None:
        pass

    def epoch_record(self) -> dict:
        """More fields for the epoch's log record."""
        return {}

    def state(self) -> dict:
        """What else a resumed run needs (e.g. the pre-training heads)."""
        return {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


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


@dataclass
class _Run:
    """A run in progress: where it is, and what it has done so far."""

    task: Task
    recipe: Any  # the trainer's config; its `loop` drives this loop
    key: str  # the recipe's key in the config.json of checkpoints
    out: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start: int = 0  # first epoch to run
    best: dict = field(default_factory=lambda: {"ar": -1.0})
    log: list[dict] = field(default_factory=list)

    def checkpoint(self, folder: Path, extra: dict, state: dict | None = None) -> None:
        with atomic_dir(folder) as tmp:
            self.task.save(tmp, extra)
            if state is not None:
                torch.save(state, tmp / STATE)

    def state(self, epoch: int) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best": self.best,
            "task": self.task.state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "log": self.log,
        }

    def restore(self, state: dict) -> None:
        # A state saved before it had a "task" entry kept the pre-training heads at its top.
        self.task.resume(self.out / "last", state.get("task", state))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start, self.best = state["epoch"] + 1, state["best"]
        if "rng" in state:  # the dropout of the next epoch, as an uninterrupted run has it
            torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.log = state.get("log") or _read_log(self.out / "log.jsonl", self.start)


def _read_log(path: Path, epochs: int) -> list[dict]:
    """The first `epochs` records of a log written before the log travelled with the state."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= epochs]


def _saved_state(out: Path, key: str, recipe: Any) -> dict | None:
    """The state of an interrupted run of the same recipe in `out`, or None for a new run."""
    for folder in ("last", "best"):
        recover_dir(out / folder)
    if not (out / "last" / STATE).is_file():
        return None
    saved = read_json(out / "last" / "config.json", "run config")
    other = DataError(f"{out} holds a run of another trainer (no {key!r} recipe of this one)")
    if key not in saved:
        raise other
    try:
        found = from_dict(type(recipe), saved[key])
    except DataError as e:  # the same key, another trainer's recipe (pretrain and re-ranker)
        raise other from e
    require_same(recipe, found, f"the run in {out}")
    return torch.load(out / "last" / STATE, weights_only=True)


def fit(
    build: Callable[[Any], Task],
    recipe: Any,
    key: str,
    out: str | Path,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
    device: torch.device = CPU,
) -> dict:
    """Seed, build the task from the recipe, and train it for `recipe.loop.epochs` on `device`,
    resuming an interrupted run of the same recipe in `out` (see the module docstring); the
    recipe is saved under `key` in each checkpoint's config.json. Returns the best val metrics,
    on rank 0 ({} without validation, and on other ranks)."""
    out = Path(out)
    # As it will run here: bf16 only where it is native, and the saved recipe says so.
    loop = dataclasses.replace(recipe.loop, bf16=effective_bf16(recipe.loop.bf16, device.type, log))
    recipe = dataclasses.replace(recipe, loop=loop)
    init_distributed()
    if loop.threads:
        torch.set_num_threads(loop.threads)
    seed_everything(loop.seed)
    state = _saved_state(out, key, recipe)
    if state is not None and state["epoch"] + 1 >= loop.epochs:
        log(f"{out} has finished all {loop.epochs} epochs; nothing to do")
        if state.get("log") and world()[0] == 0:  # killed after saving last/, before the log
            write_jsonl(out / "log.jsonl", state["log"])
        return _best(state["best"])
    task = build(recipe)  # after seeding: its random initialisation is the recipe's
    optimizer = torch.optim.AdamW(task.param_groups())
    total_steps = task.steps_per_epoch() * loop.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, loop.warmup)
    )
    run = _Run(task, recipe, key, out, optimizer, scheduler)
    if state is not None:
        run.restore(state)
        log(f"resuming {out} at epoch {run.start + 1}/{loop.epochs}")
    for epoch in range(run.start, loop.epochs):
        _epoch(run, epoch, on_step, log)
    return _best(run.best)


def _best(metrics: dict) -> dict:
    return metrics if metrics["ar"] >= 0 else {}  # {}: the run has no validation


def _epoch(run: _Run, epoch: int, on_step: StepCallback | None, log: Callable[[str], None]):
    task, loop = run.task, run.recipe.loop
    rank, world_size = world()
    gen = torch.Generator().manual_seed(loop.seed * 1000 + epoch)
    task.module.train()
    params = [p for p in task.module.parameters() if p.requires_grad]
    batches = task.batches(epoch, gen)  # before the clock: what it prepares is not a step
    steps, sums, t0 = task.steps_per_epoch(), {}, time.perf_counter()
    for step, batch in enumerate(batches):
        with mixed_precision(task.device, loop.bf16):
            terms = task.loss_terms(batch, gen)
        loss = task.total_loss(terms)
        values = take_step(loss, terms, run.optimizer, run.scheduler, params, loop.grad_clip, sums)
        task.after_step()
        if on_step and rank == 0:
            on_step(epoch, step, steps, values)
    seconds = time.perf_counter() - t0
    record = {
        "epoch": epoch + 1,
        "world_size": world_size,
        "seconds": round(seconds, 2),
        f"{task.unit}_per_s": round(steps * task.items_per_step / seconds, 2),
        "loss": {k: round(v / steps, 5) for k, v in sums.items()},
        **task.epoch_record(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if task.device.type == "cuda":
        record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(task.device) / 2**20, 1)
    if rank == 0:
        _finish_epoch(run, epoch, record, log)


def _finish_epoch(run: _Run, epoch: int, record: dict, log: Callable[[str], None]) -> None:
    """Validate, save best/ and last/, and write the log (rank 0 only)."""
    extra = {run.key: to_dict(run.recipe), "epoch": epoch + 1}
    with mixed_precision(run.task.device, run.recipe.loop.bf16):
        validation = run.task.validate()
    if validation is not None:
        record.update(validation.record)
        record["val"] = extra["val"] = validation.metrics
        if validation.metrics["ar"] > run.best["ar"]:
            run.best = validation.metrics
            run.checkpoint(run.out / "best", extra)
    run.log.append(record)
    run.checkpoint(run.out / "last", extra, run.state(epoch))
    write_jsonl(run.out / "log.jsonl", run.log)
    log(json.dumps(record))
