"""`ldot export`: a compact copy of a model or re-ranker (trained parameters only, in a small
dtype), for shipping inside the package, that never replaces a better one by accident."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightningdot.errors import DataError
from lightningdot.io import read_json
from lightningdot.model.checkpoint import load_model, load_reranker, save_model, save_reranker
from lightningdot.model.shipped import resolve

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# What a training run recorded beside its weights, carried over to the copy.
RECORDED = ("val", "val_rerank_k", "epoch", "train", "align")


def _recorded(folder: Path) -> dict:
    return read_json(
        folder / "config.json",
        "config",
        missing=f"not a model or re-ranker folder (no config.json): {folder}",
    )


def _val_ar(saved: dict, languages: set[str] | None = None) -> float | None:
    """The recorded val AR; with `languages`, the mean over those languages alone."""
    val = saved.get("val") or {}
    if languages is None:
        return val.get("ar")
    per = val["languages"]
    return sum(per[lang]["ar"] for lang in languages) / len(languages)


def _shared_languages(old: dict, new: dict) -> set[str] | None:
    """The caption languages both students were measured on, when they were measured on
    different ones (a mean over other languages is no comparison); else None."""
    old_langs = set((old.get("val") or {}).get("languages") or ())
    new_langs = set((new.get("val") or {}).get("languages") or ())
    if old_langs == new_langs or not old_langs & new_langs:
        return None
    return old_langs & new_langs


def export(
    source: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str, force: bool = False
) -> Path:
    """Write `source` (a model or re-ranker folder, or a shipped name) to `out` in `dtype`;
    returns the weights file written.

    Raises:
        DataError: an unknown dtype, or `out` holds one with a higher recorded val AR than
            `source` (unless `force`).
    """
    if dtype not in DTYPES:
        raise DataError(f"--dtype must be one of {sorted(DTYPES)}")
    out = Path(out)
    saved = _recorded(resolve("model", source))
    new_ar = _val_ar(saved)
    if (out / "config.json").is_file() and not force:
        old = _recorded(out)
        shared = _shared_languages(old, saved)
        old_ar, new_ar = _val_ar(old, shared), _val_ar(saved, shared)
        if old_ar is not None and (new_ar is None or new_ar < old_ar):
            on = f" on the languages both were measured on ({', '.join(sorted(shared or ()))})"
            raise DataError(
                f"{out} holds a model with val AR {old_ar:.2f}{on if shared else ''}, this one "
                f"has {'none recorded' if new_ar is None else f'{new_ar:.2f}'}; use --force "
                "to replace it"
            )
    extra = {k: saved[k] for k in RECORDED if k in saved}
    if "reranker" in saved:
        save_reranker(out, load_reranker(source), saved["bi_encoder"], DTYPES[dtype], extra)
    else:
        save_model(out, load_model(source), DTYPES[dtype], extra)
    return out / "model.safetensors"
