"""An index folder opened with the backend its record names: FAISS parts in the folder
(`lightningdot.index.folder`) or Milvus collections (`lightningdot.index.milvus`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from lightningdot.index.folder import IndexFolder
from lightningdot.index.milvus import MilvusFolder
from lightningdot.index.record import RECORD, Manifest
from lightningdot.index.vector import IndexPrior
from lightningdot.model.encoders import BiEncoder
from lightningdot.runtime import accelerate


def backend_of(folder: str | Path) -> type[IndexFolder]:
    """The class that opens the index folder `folder`.

    Raises:
        DataError: it is not an index folder, or its record is damaged.
    """
    return MilvusFolder if Manifest.read(Path(folder)).backend else IndexFolder


def open_index(folder: str | Path, model: BiEncoder, mmap: bool = True) -> IndexFolder:
    """`IndexFolder.open` with the folder's backend.

    An index built before its model had a concept view holds the main vectors alone (the
    view's coordinates come after them): the model then answers it with its main vectors
    (`BiEncoder.drop_concepts`), as it did when the index was built, and says so once.
    """
    index = backend_of(folder).open(folder, model, mmap)
    if model.concepts is not None and index.image_index.dim == model.cfg.vector_dim:
        warnings.warn(
            f"{folder} was built without the model's concept view: searching it with the main "
            "vectors alone; rebuild it with `ldot index` to search by concepts too",
            stacklevel=2,
        )
        runtime = model.runtime
        model.drop_concepts()
        if runtime is not None:
            accelerate(model, runtime)
    return index


def load_index(
    folder: str | Path,
    model_id: str | None = None,
    caption_prior: IndexPrior | None = None,
    mmap: bool = True,
) -> IndexFolder:
    """`IndexFolder.load` with the folder's backend."""
    return backend_of(folder).load(folder, model_id, caption_prior, mmap)


def current_record(folder: Path) -> Manifest | None:
    """The record a build into `folder` replaces, if any (read before the build, whose
    commit drops the Milvus collections it names: `drop_replaced`)."""
    return Manifest.read(folder) if (folder / RECORD).is_file() else None
