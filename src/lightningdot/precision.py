"""Mixed precision (`bf16` in a recipe's `[loop]`): the models' matrix products in bfloat16;
weights, optimiser, loss terms and metrics in float32; and a fallback to float32 where
bfloat16 would only be emulated."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware. A CPU without AVX512-BF16 or
    AMX emulates them, several times slower than float32."""
    if device == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device != "cuda" or torch.cuda.is_bf16_supported()


def effective_bf16(requested: bool, device: str, log: Callable[[str], None]) -> bool:
    """`requested`, unless `device` would only emulate bfloat16: then False, and the log says
    so. A recipe written on one machine stays fast on another."""
    if requested and not native_bf16(device):
        log(
            f"bf16 asked for, but this {device} has no native bfloat16 (emulated, it is several "
            "times slower than float32): training in float32"
        )
        return False
    return requested


def mixed_precision(device: str | torch.device, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on `device`, or a no-op when not `enabled`."""
    device_type = device.type if isinstance(device, torch.device) else device
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def _to_float32(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    if isinstance(x, list | tuple):
        return type(x)(_to_float32(v) for v in x)
    return x


def _device_type(values: tuple[Any, ...]) -> str:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device.type
        if isinstance(v, list | tuple) and v:
            return _device_type(tuple(v))
    return "cpu"


def in_float32(fn: F) -> F:
    """Compute from float32 copies of the tensor arguments with autocast off, so that inside a
    bfloat16 autocast region a loss or a metric is never rounded to bfloat16."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(_device_type((*args, *kwargs.values())), enabled=False):
            return fn(*map(_to_float32, args), **{k: _to_float32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
