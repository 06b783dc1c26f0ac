"""The optimiser's parameter groups and the learning-rate schedule every trainer uses."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn


def decay_groups(
    module: nn.Module, lr_of: Callable[[str], float], weight_decay: float
) -> list[dict]:
    """AdamW groups of the module's trainable parameters, each at `lr_of(its name)`; biases,
    LayerNorms and temperatures are not decayed."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "LayerNorm" in name or name.endswith("logit_scale")
        groups.setdefault((lr_of(name), 0.0 if no_decay else weight_decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor per step: a linear warm-up over `warmup` of the steps, then a cosine
    decay to 0."""
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
