"""A FAISS index that travels with its ids, its items' metadata and the model that made it.

Layout of a vector index's folder (written whole, then never changed):

    index.faiss   the FAISS index (inner product); row i is items[i]
    items.json    one entry per vector: {"id", "path"?, "captions"?, ...}
    index.json    {"format", "model_id", "dim", "count", "config": IndexConfig, "prior"?,
                  "deleted"?}
    bank.npy      with a query-bank prior (`lightningdot.model.prior`): the bank, (N, dim) float32
    deleted.npy   with deleted items: (count,) bool, True at their rows

A delete leaves the row where it is and marks it (a tombstone): rows stay aligned with what is
kept beside them (region states, row for row), HNSW deletes like the others (it cannot
remove vectors), and a search passes FAISS an id selector that skips the marked rows, as it
does a filter's. A type whose search takes no selector (plain PQ) refuses deletes.

Loading checks that the file, the items and the model agree, and refuses otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from lightningdot.config import IndexConfig, from_dict
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.index.backend import Hit
from lightningdot.index.metadata import MetadataColumns
from lightningdot.index.record import UPLOADS
from lightningdot.io import atomic_dir, link_or_copy, read_json
from lightningdot.model.prior import QueryBank, gallery_side, hub_prior

FORMAT = 1
TOMBSTONE_FORMAT = 2  # written with tombstones, so that releases that ignore them refuse it
COMPACT_BATCH = 65_536  # rows copied at a time by `compacted`


def _as_matrix(vectors: Any, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ConfigMismatchError(f"vectors must be {want}, got {x.shape}")
    return x


@dataclass
class IndexPrior:
    """The query-bank prior of an index's items (`lightningdot.model.prior`)."""

    bank: np.ndarray  # (N, D) vectors of typical queries of this index
    beta: float

    def of(self, vectors: np.ndarray) -> np.ndarray:
        """(G, D + C) item vectors -> (G, D + C + 1) with each item's prior last (read from
        their first D coordinates: C is a concept view's, see `lightningdot.model.prior`)."""
        x = torch.from_numpy(vectors)
        prior = hub_prior(x, torch.from_numpy(self.bank), self.beta)
        return np.ascontiguousarray(gallery_side(x, prior).numpy())


def priors_of(bank: QueryBank | None) -> tuple[IndexPrior | None, IndexPrior | None]:
    """A model's query bank -> the priors of (an image index, a caption index): images are
    searched by text queries, captions by image queries."""
    if bank is None:
        return None, None
    return IndexPrior(bank.text.float().numpy(), bank.beta), IndexPrior(
        bank.image.float().numpy(), bank.beta
    )


def with_prior_weight(queries: np.ndarray, with_prior: bool) -> np.ndarray:
    """(Q, D) queries -> (Q, D + 1): a 1 where an index's rows keep their prior (a 0 to rank by
    the dot product alone)."""
    weight = np.full((len(queries), 1), 1.0 if with_prior else 0.0, np.float32)
    return np.ascontiguousarray(np.hstack([queries, weight]))


class VectorIndex:
    """Inner-product search over unit vectors, with the item behind each row.

    With a prior, each row also holds its item's prior and each query gets a 1 in that place, so
    the scores searched and returned are q·g + prior(g).
    """

    def __init__(
        self,
        index: faiss.Index,
        items: list[dict],
        model_id: str,
        cfg: IndexConfig,
        prior: IndexPrior | None = None,
        deleted: np.ndarray | None = None,
    ):
        if index.ntotal != len(items):
            raise DataError(f"index holds {index.ntotal} vectors but {len(items)} items")
        self.index, self.items, self.model_id, self.cfg = index, items, model_id, cfg
        self.prior = prior
        self.deleted = deleted if deleted is not None and deleted.any() else None
        self._rows: dict[str, int] | None = None  # id -> row, built on first lookup
        self._columns: MetadataColumns | None = None
        # The committed part folders whose index.faiss (and items.json) hold this index's
        # vectors (and items) as they are: a write links those files instead of writing them
        # again (a delete changes neither, an update of fields only the items).
        self.source: Path | None = None
        self.items_source: Path | None = None
        self._apply_search_params()

    @classmethod
    def build(
        cls,
        vectors: Any,
        items: list[dict],
        model_id: str,
        cfg: IndexConfig | None = None,
        prior: IndexPrior | None = None,
    ) -> VectorIndex:
        cfg = cfg or IndexConfig()
        x = _as_matrix(vectors)
        if prior is not None and x.shape[1] < prior.bank.shape[1]:
            raise ConfigMismatchError(
                f"vectors of {x.shape[1]} coordinates for a query bank of {prior.bank.shape[1]}"
            )
        if len(x) != len(items):
            raise ValueError(f"{len(x)} vectors for {len(items)} items")
        _check_ids(items)
        if prior is not None:
            x = prior.of(x)
        try:
            index = faiss.index_factory(x.shape[1], cfg.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise DataError(f"FAISS cannot build {cfg.factory!r}: {e}") from e
        if not index.is_trained:
            try:
                index.train(x)
            except RuntimeError as e:
                raise DataError(f"training {cfg.factory!r} on {len(x)} vectors failed: {e}") from e
        index.add(x)
        return cls(index, list(items), model_id, cfg, prior)

    @staticmethod
    def check_factory(factory: str, dim: int) -> None:
        """Refuse a FAISS factory string before any vector is computed for it.

        Raises:
            DataError: FAISS cannot make an index of `dim` from it.
        """
        try:
            faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            why = str(e).strip().rsplit(": ", 1)[-1]  # past FAISS's C++ function and line
            raise DataError(f"FAISS cannot build {factory!r}: {why}") from e

    @property
    def dim(self) -> int:
        """Dimension of the vectors it takes (the prior's coordinate not counted)."""
        return self.index.d - (self.prior is not None)

    def __len__(self) -> int:
        """Rows, deleted ones included (what row-aligned parts are checked against)."""
        return self.index.ntotal

    @property
    def count(self) -> int:
        """Items in the index: its rows less the deleted ones."""
        return len(self) - (0 if self.deleted is None else int(self.deleted.sum()))

    @property
    def columns(self) -> MetadataColumns:
        """Its items' fields as columns, for filters (`lightningdot.index.filters`)."""
        if self._columns is None:
            self._columns = MetadataColumns(self.items)
        return self._columns

    @property
    def kinds(self) -> dict[str, str]:
        """Each field a filter may name, and its kind (`lightningdot.index.metadata`)."""
        return self.columns.kinds

    def get(self, item_id: str) -> dict | None:
        """The item with this id (not deleted), or None."""
        row = self.row(item_id)
        return None if row is None else self.items[row]

    def iterate(self) -> Iterator[dict]:
        """The items not deleted, in row order."""
        return (self.items[row] for row in self.live_rows())

    def uploads(self) -> set[str]:
        """The file names of the uploaded images it holds (`lightningdot.index.record`)."""
        return {it["path"] for it in self.iterate() if it.get("root") == UPLOADS}

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
        """A search's (Q, k) scores and rows -> each query's (score, item), past row -1 none."""
        return [
            [Hit(s, self.items[r]) for s, r in zip(qs, qr, strict=True) if r >= 0]
            for qs, qr in zip(scores.tolist(), rows.tolist(), strict=True)
        ]

    def vectors(self, item_ids: list[str]) -> np.ndarray:
        """(N, D) float32: the vectors the index holds for these items, in order, as given
        to `build` or `add` (without the prior's coordinate). Lossy types (PQ, SQ, a PCA)
        give back their decoded vectors. An IVF index is given a direct map (row -> list) on
        first use.

        Raises:
            DataError: an id is not in the index.
        """
        rows = [self.row(i) for i in item_ids]
        if missing := [i for i, r in zip(item_ids, rows, strict=True) if r is None]:
            raise DataError(f"{len(missing)} id(s) not in the index, e.g. {missing[:3]}")
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(self._stored(rows)[:, : self.dim], dtype=np.float32)

    def _stored(self, rows: list[int] | np.ndarray) -> np.ndarray:
        """(N, d) the rows as the FAISS index holds them, the prior's coordinate included."""
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:  # not an IVF type: it reconstructs without help
            ivf = None
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))

    def live_rows(self) -> Iterator[int]:
        """The rows of items not deleted, in order."""
        if self.deleted is None:
            return iter(range(len(self)))
        return iter(np.flatnonzero(~self.deleted).tolist())

    def without(self, item_ids: list[str]) -> VectorIndex:
        """A copy with these items deleted (this one is unchanged); the FAISS index is shared,
        since a delete only marks rows.

        Raises:
            DataError: an id is not in the index.
        """
        rows = [self.row(i) for i in item_ids]
        if missing := [i for i, r in zip(item_ids, rows, strict=True) if r is None]:
            raise DataError(f"{len(missing)} id(s) not in the index, e.g. {missing[:3]}")
        # Its searches must skip deleted rows: refuse the delete where its type cannot.
        self.search(np.zeros((1, self.dim), np.float32), 1, allowed=np.zeros(len(self), bool))
        deleted = np.zeros(len(self), bool) if self.deleted is None else self.deleted.copy()
        deleted[rows] = True
        out = VectorIndex(self.index, self.items, self.model_id, self.cfg, self.prior, deleted)
        out.source, out.items_source = self.source, self.items_source
        out._columns = self._columns  # the same items: their columns hold
        out._rows = self._rows  # shared, never changed: `row` skips the rows deleted since
        return out

    def compacted(self) -> VectorIndex:
        """A copy without the deleted rows (this one is unchanged, and so is one without
        deletes): the live rows' stored vectors, priors included, added in order to an empty
        index of the same type and training, so an IVF index keeps its centroids and each
        vector its list. Flat, IVF-Flat and HNSW-Flat give back the same vectors; a lossy
        type re-encodes its decoded ones."""
        if self.deleted is None:
            return self
        kept = np.flatnonzero(~self.deleted)
        index = faiss.clone_index(self.index)
        index.reset()
        for start in range(0, len(kept), COMPACT_BATCH):  # a bounded copy in memory at a time
            index.add(self._stored(kept[start : start + COMPACT_BATCH]))
        items = [self.items[r] for r in kept.tolist()]
        return VectorIndex(index, items, self.model_id, self.cfg, self.prior)

    def with_fields(self, item_id: str, fields: dict[str, Any]) -> VectorIndex:
        """A copy in which item `item_id`'s fields ("meta") are updated by `fields` (a None
        value removes a field); this one is unchanged.

        Raises:
            DataError: the id is not in the index.
        """
        row = self.row(item_id)
        if row is None:
            raise DataError(f"no image {item_id!r} in the index")
        meta = {**(self.items[row].get("meta") or {}), **fields}
        items = list(self.items)
        items[row] = {**items[row], "meta": {k: v for k, v in meta.items() if v is not None}}
        out = VectorIndex(self.index, items, self.model_id, self.cfg, self.prior, self.deleted)
        out.source = self.source
        out._rows = self._rows  # the same ids in the same rows
        return out

    def add(self, vectors: Any, items: list[dict]) -> None:
        """Append items without a rebuild (a trained IVF index keeps its coarse centroids)."""
        x = _as_matrix(vectors, self.dim)
        if len(x) != len(items):
            raise ValueError(f"{len(x)} vectors for {len(items)} items")
        _check_ids(items, self.row)
        self.index.add(x if self.prior is None else self.prior.of(x))
        self.items.extend(items)
        if self.deleted is not None:
            self.deleted = np.concatenate([self.deleted, np.zeros(len(items), bool)])
        self._rows, self._columns = None, None
        self.source = self.items_source = None

    def copy(self) -> VectorIndex:
        """An independent in-memory copy (of a memory-mapped index too), to grow while the
        original keeps answering searches."""
        return VectorIndex(
            faiss.clone_index(self.index),
            list(self.items),
            self.model_id,
            self.cfg,
            self.prior,
            self.deleted,
        )

    def row(self, item_id: str) -> int | None:
        """The row of the item with this id (not deleted), or None."""
        if self._rows is None:
            self._rows = {self.items[i]["id"]: i for i in self.live_rows()}
        row = self._rows.get(item_id)
        if row is not None and self.deleted is not None and self.deleted[row]:
            return None
        return row

    def search(
        self, queries: Any, k: int, with_prior: bool = True, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> (Q, k') scores and row ids, best first; k' = min(k, len(self)),
        row -1 (score -inf) past the last item a search may return.

        `with_prior=False` ranks by the dot product alone (a 0 where the prior's 1 would be),
        for queries of another kind than the bank's, such as images against an image index.
        `allowed` (rows,) bool: only those rows (a filter's mask); deleted rows never.
        """
        q = _as_matrix(queries, self.dim)
        if self.prior is not None:
            q = with_prior_weight(q, with_prior)
        k = max(1, min(k, len(self)))
        if self.deleted is not None:
            allowed = ~self.deleted if allowed is None else allowed & ~self.deleted
        if allowed is None:
            return self.index.search(q, k)
        # FAISS reads the bitmap while it searches: it must outlive the call.
        bitmap = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        try:
            return self.index.search(q, k, params=self._search_params(self.index, selector))
        except RuntimeError as e:
            raise DataError(
                f"this FAISS index ({self.cfg.factory}) cannot search a subset of its rows, as "
                f"filters and deletes need: rebuild it as Flat, IVF or HNSW ({e})"
            ) from e

    def _search_params(self, index: faiss.Index, selector) -> faiss.SearchParameters:
        """The search parameters of `index`'s type (wrapped types too), as configured, with an
        id selector."""
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexPreTransform):
            below = self._search_params(inner.index, selector)
            return faiss.SearchParametersPreTransform(sel=selector, index_params=below)
        if isinstance(inner, faiss.IndexRefine):
            below = self._search_params(inner.base_index, selector)
            return faiss.IndexRefineSearchParameters(sel=selector, base_index_params=below)
        if hasattr(inner, "nprobe"):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.cfg.nprobe)
        if getattr(inner, "hnsw", None) is not None:
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.cfg.ef_search)
        return faiss.SearchParameters(sel=selector)

    def tune(self, cfg: IndexConfig) -> None:
        """Search with `cfg`'s search-time settings (nprobe, ef_search) from now on; the
        vectors and what the index was built as stay as they are."""
        if cfg.factory != self.cfg.factory:
            raise ValueError(f"a {self.cfg.factory} index cannot be tuned as {cfg.factory}")
        self.cfg = cfg
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        inner = faiss.downcast_index(self.index)
        if hasattr(inner, "nprobe"):
            inner.nprobe = self.cfg.nprobe
        hnsw = getattr(inner, "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = self.cfg.ef_search

    def save(self, folder: str | Path) -> None:
        """Write the index to `folder`, replacing what is there in one step."""
        with atomic_dir(folder) as tmp:
            self.write(tmp)

    def write(self, folder: Path) -> None:
        """Write the index's files into the empty folder `folder` (those of `source` linked)."""
        if self.source is not None:
            link_or_copy(self.source / "index.faiss", folder / "index.faiss")
        else:
            faiss.write_index(self.index, str(folder / "index.faiss"))
        if self.items_source is not None:
            link_or_copy(self.items_source / "items.json", folder / "items.json")
        else:
            (folder / "items.json").write_text(json.dumps(self.items, ensure_ascii=False))
        manifest = {
            "format": FORMAT if self.deleted is None else TOMBSTONE_FORMAT,
            "model_id": self.model_id,
            "dim": self.dim,
            "count": len(self),
            "config": asdict(self.cfg),
        }
        if self.prior is not None:
            manifest["prior"] = {"beta": self.prior.beta, "bank": len(self.prior.bank)}
            np.save(folder / "bank.npy", self.prior.bank.astype(np.float32))
        if self.deleted is not None:
            manifest["deleted"] = int(self.deleted.sum())
            np.save(folder / "deleted.npy", self.deleted)
        (folder / "index.json").write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(
        cls, folder: str | Path, model_id: str | None = None, mmap: bool = False
    ) -> VectorIndex:
        """Read an index folder; with `model_id`, refuse an index another model made.

        `mmap` maps the index file instead of reading it, where FAISS supports it for the type.
        """
        folder = Path(folder)
        missing = f"not an index folder (no index.json): {folder}"
        manifest = read_json(folder / "index.json", "index metadata", missing)
        items = read_json(folder / "items.json", "index items")
        if not isinstance(manifest, dict) or manifest.get("format") not in (
            FORMAT,
            TOMBSTONE_FORMAT,
        ):
            found = manifest.get("format") if isinstance(manifest, dict) else manifest
            raise DataError(f"{folder}: unknown index format {found!r}")
        _check_metadata(folder, manifest, items)
        if model_id is not None and manifest["model_id"] != model_id:
            raise ConfigMismatchError(
                f"index {folder} was made by model {manifest['model_id'][:12]}, not by the loaded "
                f"model {model_id[:12]}; rebuild it with `ldot index` or load the same model"
            )
        index = _read_faiss(folder / "index.faiss", mmap)
        prior = _read_prior(folder, manifest) if "prior" in manifest else None
        if index.d != manifest["dim"] + (prior is not None) or index.ntotal != manifest["count"]:
            raise DataError(
                f"{folder}: index.faiss has {index.ntotal} x {index.d}, index.json says "
                f"{manifest['count']} x {manifest['dim']}{' + prior' if prior is not None else ''}"
            )
        try:
            config = from_dict(IndexConfig, manifest["config"])
        except (TypeError, ValueError, DataError) as e:
            raise DataError(f"{folder}: damaged index.json ({e})") from e
        deleted = _read_deleted(folder, manifest) if "deleted" in manifest else None
        out = cls(index, items, manifest["model_id"], config, prior, deleted)
        out.source = out.items_source = folder
        return out


def _check_metadata(folder: Path, manifest: dict, items: Any) -> None:
    """Refuse metadata another writer (or a hand) left malformed, naming the folder.

    Raises:
        DataError: a key of index.json is missing or of the wrong type, or an item is not an
            object with a string id (and a string path, when it has one).
    """
    types = {"model_id": str, "dim": int, "count": int, "config": dict}
    if any(not isinstance(manifest.get(k), t) for k, t in types.items()):
        raise DataError(f"{folder}: damaged index.json (needs {', '.join(types)})")
    prior = manifest.get("prior", {"bank": 0, "beta": 0.0})
    if not (
        isinstance(prior, dict)
        and isinstance(prior.get("bank"), int)
        and isinstance(prior.get("beta"), int | float)
    ):
        raise DataError(f"{folder}: damaged index.json (prior)")
    well_formed = isinstance(items, list) and all(
        isinstance(it, dict)
        and isinstance(it.get("id"), str)
        and isinstance(it.get("path", ""), str)
        for it in items
    )
    if not well_formed:
        raise DataError(f"{folder}: damaged items.json (each item needs a string id)")


def _check_ids(items: list[dict], held=lambda _: None) -> None:
    """Refuse items whose id repeats, among them or (`held(id)` not None) in the index: an id
    names one row, always.

    Raises:
        DataError: naming up to three such ids.
    """
    seen: set[str] = set()
    twice = []
    for it in items:
        if it["id"] in seen or held(it["id"]) is not None:
            twice.append(it["id"])
        seen.add(it["id"])
    if twice:
        raise DataError(f"{len(twice)} id(s) already in the index or repeated, e.g. {twice[:3]}")


def _read_faiss(path: Path, mmap: bool) -> faiss.Index:
    """The index file, memory-mapped where FAISS can map its type and `mmap` asks for it."""
    try:
        try:
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            if not mmap:
                raise
            return faiss.read_index(str(path))  # an index type FAISS cannot map
    except RuntimeError as e:
        raise DataError(f"damaged or truncated index file {path}: {e}") from e


def _read_prior(folder: Path, manifest: dict) -> IndexPrior:
    try:
        bank = np.load(folder / "bank.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"damaged or missing query bank {folder / 'bank.npy'}: {e}") from e
    # The bank may cover the items' first coordinates alone (a model's main view).
    if bank.ndim != 2 or len(bank) != manifest["prior"]["bank"] or bank.shape[1] > manifest["dim"]:
        raise DataError(
            f"{folder}: bank.npy is {bank.shape}, index.json says "
            f"{manifest['prior']['bank']} vectors of at most {manifest['dim']} coordinates"
        )
    return IndexPrior(bank.astype(np.float32), float(manifest["prior"]["beta"]))


def _read_deleted(folder: Path, manifest: dict) -> np.ndarray:
    try:
        deleted = np.load(folder / "deleted.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"damaged or missing tombstones {folder / 'deleted.npy'}: {e}") from e
    if deleted.shape != (manifest["count"],) or deleted.dtype != bool:
        raise DataError(f"{folder}: deleted.npy does not fit the {manifest['count']} rows")
    if int(deleted.sum()) != manifest["deleted"]:
        raise DataError(
            f"{folder}: deleted.npy marks {int(deleted.sum())} rows, index.json says {manifest['deleted']}"
        )
    return deleted


def recall_against_exact(
    index: VectorIndex, exact: VectorIndex, queries: Any, k: int = 10
) -> float:
    """Mean fraction of the exact top-k that the index also returns (1.0 for an exact index)."""
    _, got = index.search(queries, k)
    _, want = exact.search(queries, k)
    hits = [len(set(g) & set(w)) / len(w) for g, w in zip(got.tolist(), want.tolist(), strict=True)]
    return float(np.mean(hits))
