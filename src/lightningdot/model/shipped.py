"""The weights that ship inside the package, by name: one registry for models and re-rankers.

    model     "default"       the English bi-encoder     weights/default/
              "multilingual"  its multilingual text side weights/multilingual/
    reranker  "default"       the default's re-ranker    weights/default-reranker/

Every place that takes a model or re-ranker accepts one of these names or a folder.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Literal

from lightningdot.errors import DataError

Kind = Literal["model", "reranker"]

SHIPPED: dict[Kind, dict[str, str]] = {
    "model": {"default": "default", "multilingual": "multilingual"},
    "reranker": {"default": "default-reranker"},
}
WHAT = {"model": "model", "reranker": "re-ranker"}  # as messages name each kind


def is_shipped(kind: Kind, name: str | os.PathLike[str]) -> bool:
    return str(name) in SHIPPED[kind]


def shipped_dir(kind: Kind, name: str) -> Path:
    """The folder of a shipped model or re-ranker inside the installed package."""
    return Path(str(resources.files("lightningdot") / "weights" / SHIPPED[kind][name]))


def resolve(kind: Kind, name_or_path: str | os.PathLike[str] | None) -> Path:
    """A shipped name (None: "default") or a folder -> the folder holding the weights."""
    if name_or_path is None or is_shipped(kind, name_or_path):
        return shipped_dir(kind, str(name_or_path or "default"))
    path = Path(name_or_path)
    if not path.exists():
        raise DataError(
            f"no {WHAT[kind]} {str(name_or_path)!r}: neither a shipped name "
            f"{tuple(SHIPPED[kind])} nor a folder"
        )
    return path
