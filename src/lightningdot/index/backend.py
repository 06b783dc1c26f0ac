"""The one index interface the `Retriever`, the CLI and the server talk to, whatever engine
holds the vectors.

Two backends implement it:

- FAISS (the default): an index folder whose versions hold FAISS indexes
  (`lightningdot.index.folder`, `lightningdot.index.vector`);
- Milvus through `pymilvus`: the same index folder's record, with the vectors and items in
  Milvus collections, embedded milvus-lite for a local file or a Milvus server or cluster for
  an `http://` URI (`lightningdot.index.milvus`).

A collection (`Collection`) changes in commits: add and upsert (`append`), `delete`,
`update_fields`; each is all or nothing. What it holds at one commit is a `View`: a search,
a lookup by id and a count read one view, so that none of them sees half of a change.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from lightningdot.index.filters import Filter


class Hit(NamedTuple):
    """One search result: its score (dot product, plus the item's prior where the index
    keeps one) and its item ({"id", ...})."""

    score: float
    item: dict


class Items(Protocol):
    """One searchable set of items (a collection's images, or their captions), as one view
    holds them."""

    model_id: str  # `index_identity` of the model that made it

    @property
    def dim(self) -> int:
        """The size of the vectors it holds (a prior's coordinate left out)."""

    @property
    def count(self) -> int:
        """How many items it holds."""

    @property
    def kinds(self) -> dict[str, str]:
        """The fields a filter may name, with their kinds (`lightningdot.index.metadata`)."""

    def get(self, item_id: str) -> dict | None:
        """The item with this id, or None."""

    def iterate(self) -> Iterator[dict]:
        """Every item, a page at a time."""

    def vectors(self, item_ids: list[str]) -> np.ndarray:
        """(N, D) the vectors held for these items, as they were added (a prior's coordinate
        left out): what a sync gives a moved image instead of encoding it again."""

    def uploads(self) -> set[str]:
        """The file names of the uploaded images among them (`lightningdot.index.record`)."""


class View(Protocol):
    """What a collection holds at one commit."""

    images: Items
    captions: Items | None

    def search(
        self,
        target: str,
        queries: np.ndarray,
        k: int,
        where: Filter | None = None,
        with_prior: bool = True,
    ) -> list[list[Hit]]:
        """(Q, D) query vectors -> each query's best `k` items of `target` ("images" or
        "captions") that pass `where` (captions by their image's fields), best first.
        `with_prior=False` ranks by the dot product alone (image queries against images)."""

    def states_of(self, image_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the re-ranker reads of these images, where the collection keeps it."""


class Collection(Protocol):
    """A collection's images and captions, changed one commit at a time."""

    @property
    def live(self) -> View:
        """The view searches read now."""

    def append(self, rows, replace: bool = False) -> list[bool]:
        """Add (with `replace`: upsert) images and their captions in one commit."""

    def delete(self, image_ids: list[str]) -> None:
        """Delete images and their captions in one commit."""

    def change(self, rows, gone: list[str]) -> None:
        """Delete images and add others in one commit (a sync's changes)."""

    def update_fields(self, image_id: str, fields: dict) -> dict:
        """Set or remove an image's fields in one commit; returns them as committed."""

    def compact(self) -> int:
        """Drop now what deletes left behind, in one commit; returns the rows dropped."""
