"""The Milvus backend: an index folder whose vectors and items live in Milvus collections,
through `pymilvus`'s `MilvusClient`: embedded milvus-lite for a local file (`PATH.db`), a
Milvus server or cluster for an `http://host:19530` URI.

The folder keeps what a FAISS folder keeps but the vectors (`lightningdot.index.folder`): the
record `retriever.json` (the commit point), uploads, and the query banks of the priors
(`vN/priors/`). Its record names the URI and one collection per part:

    {..., "parts": {"priors": "v1/priors"}, "kinds": {field: kind},
     "backend": {"kind": "milvus", "uri", "base", "config": IndexConfig, "beta"?,
                 "collections": {"images": "<base>_images_v1", "captions": ...}}}

A row of a collection:

    pk      "<batch>:<id>" (an upsert's new row beside the old one it retires)
    id      the item's id
    batch   the version whose commit added it
    gone    the version whose commit retired it (0: none yet)
    vector  the item's vector, with its prior last where the model has a query bank
    item    the item, as a FAISS folder keeps it
    fields  the fields a filter reads (`item_fields`; a caption carries its image's)
    n0..n15, t0..t15
            the same fields as typed columns, for the fields the record gives one (a slot):
            Milvus filters a scalar column some thirty times faster than a key of a JSON
            column, and a schema cannot grow once made, hence slots named by the record.
            A field gets the next free slot of its kind when it first appears (every row
            that holds it is written after that); a number field that turns text loses its
            slot (for good: its old values stay in it) and is filtered on its JSON key, as
            are fields past the last slot.

Commits are versions, as in a FAISS folder: at version V a search reads the rows with
`batch <= V and (gone == 0 or gone > V)`. A change inserts its rows with batch V + 1 and
marks those it deletes or replaces gone = V + 1 (an upsert of the same row, which leaves it
visible at V), flushes, then replaces the record: before that rename searches see none of the
change, after it all of it. A writer marks the folder (`.pending`) before its first row and
clears the mark after its commit: the next writer that finds the mark undoes what a killed
one left (rows of batch > V, marks gone > V, a collection the record does not name). The
rows a commit retires are purged after the next commit (a reader that has not yet read the
new record still sees them), by key: the record lists them.

milvus-lite serves one process: a second process that opens the same file is refused with a
clear error. A Milvus server serves any number. No region states are kept: re-ranking reads
the feature store, else the image files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from lightningdot.config import IndexConfig, from_dict
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.index.backend import Hit
from lightningdot.index.filters import Filter, milvus_literal
from lightningdot.index.folder import IndexFolder, Rows
from lightningdot.index.metadata import TEXT, field_kinds, item_fields
from lightningdot.index.record import RECORD, UPLOADS, Manifest
from lightningdot.index.storage import (
    LOCK,
    PENDING,
    check_buildable,
    commit,
    replaceable,
    sweep_uploads,
)
from lightningdot.index.vector import IndexPrior, with_prior_weight
from lightningdot.io import write_json

PROPERTY = "lightningdot"  # the collection property: {"model_id", "folder"} that made it
PURGE_LIST = 2000  # retired rows a record lists for the next commit to purge by key
BATCH = 1000  # rows per insert, upsert or page read
MAX_LIMIT = 16384  # Milvus's largest top-k
PARTS = ("images", "captions")
SLOTS = {"n": 16, "t": 16}  # typed columns: numbers (and dates), text

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def connect(uri: str) -> Any:
    """The process's `MilvusClient` of `uri` (one per URI: milvus-lite serves one process).

    Raises:
        DataError: pymilvus is missing, the file's folder does not exist, the server cannot be
            reached, or another process holds the milvus-lite file.
    """
    with _clients_lock:
        if uri not in _clients:
            _clients[uri] = _connect(uri)
        return _clients[uri]


def is_local(uri: str) -> bool:
    return "://" not in uri


def _connect(uri: str) -> Any:
    try:
        from pymilvus import MilvusClient, MilvusException
    except ImportError:
        raise DataError(
            "the Milvus backend needs pymilvus: pip install 'lightningdot[milvus]'"
        ) from None
    if is_local(uri):
        _quiet_lite()
        if not uri.endswith(".db"):
            raise DataError(f"a milvus-lite file's name ends in .db, unlike {uri}")
        if not Path(uri).parent.is_dir():
            raise DataError(f"milvus-lite file {uri}: its folder does not exist")
    try:
        return MilvusClient(uri, timeout=10)
    except MilvusException as e:
        if not is_local(uri):
            raise DataError(f"cannot reach Milvus at {uri}: {e.message}") from None
        raise DataError(
            f"cannot open the milvus-lite file {uri} ({e.message}): milvus-lite serves one "
            "process at a time (is `ldot serve` running on it?); for several, run a Milvus "
            "server and give its http:// URI"
        ) from None


class _LiteNoise(logging.Filter):
    """Drops what every page read logs against milvus-lite, which has no timestamp service:
    pymilvus's warning that it falls back to its own clock (which is right there), and the
    embedded server's error for the call it does not implement."""

    NOISE = ("failed to get mvccTs", "Exception calling application: Method not implemented")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def _quiet_lite() -> None:
    for name in ("pymilvus.client.iterator.query_iterator", "grpc._server"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LiteNoise) for f in logger.filters):
            logger.addFilter(_LiteNoise())


@dataclass(frozen=True)
class MilvusTarget:
    """Where `ldot index --backend milvus` puts a collection: a URI and the base name of its
    collections (default: from the index folder's name)."""

    uri: str
    collection: str | None = None

    def resolved(self, folder: Path) -> MilvusTarget:
        """With a local file's path absolute (the record opens from anywhere) and a base."""
        uri = str(Path(self.uri).resolve()) if is_local(self.uri) else self.uri
        base = self.collection or "ldot_" + re.sub(r"\W", "_", folder.resolve().name)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", base):
            raise DataError(
                f"Milvus collection name {base!r}: letters, digits and _, not first a digit"
            )
        return MilvusTarget(uri, base)


@dataclass
class Priors:
    """The query-bank priors of a Milvus folder's images and captions (a part of the folder,
    `vN/priors/`: what a FAISS index keeps in its own folder)."""

    images: IndexPrior | None
    captions: IndexPrior | None

    def write(self, folder: Path) -> None:
        for name in PARTS:
            if (prior := getattr(self, name)) is not None:
                np.save(folder / f"{name}.npy", prior.bank.astype(np.float32))

    @classmethod
    def read(cls, folder: Path, beta: float | None) -> Priors:
        def one(name: str) -> IndexPrior | None:
            path = folder / f"{name}.npy"
            if beta is None or not path.is_file():
                return None
            try:
                return IndexPrior(np.load(path).astype(np.float32), beta)
            except (OSError, ValueError) as e:
                raise DataError(f"damaged query bank {path}: {e}") from e

        return cls(one("images"), one("captions"))

    @property
    def beta(self) -> float | None:
        prior = self.images or self.captions
        return None if prior is None else prior.beta


def check_target(target: MilvusTarget, cfg: IndexConfig) -> None:
    """Refuse a build's Milvus target before anything is encoded for it.

    Raises:
        DataError: Milvus cannot be reached there, or builds no index like `cfg`.
    """
    index_settings(cfg)
    connect(target.uri)


def index_settings(cfg: IndexConfig) -> tuple[dict, dict]:
    """An `IndexConfig`'s Milvus index (type and build parameters) and search parameters.

    Raises:
        DataError: a factory string with no Milvus counterpart here.
    """
    if cfg.factory == "Flat":
        return {"index_type": "FLAT", "params": {}}, {}
    if m := re.fullmatch(r"IVF(\d+),Flat", cfg.factory):
        return {"index_type": "IVF_FLAT", "params": {"nlist": int(m[1])}}, {"nprobe": cfg.nprobe}
    raise DataError(
        f"the Milvus backend builds 'Flat' or 'IVF<n>,Flat' indexes, not {cfg.factory!r}"
    )


def assign_slots(kinds: dict[str, str], backend: dict) -> dict:
    """`backend` with a slot for every field of `kinds` that has none yet (while slots last),
    and none for a field whose kind no longer suits its slot."""
    slots, spent = dict(backend.get("slots") or {}), list(backend.get("spent") or [])
    for name, kind in kinds.items():
        want = "t" if kind == TEXT else "n"
        if name in slots and slots[name][0] != want:
            spent.append(slots.pop(name))
        if name not in slots:
            taken = set(slots.values()) | set(spent)
            free = [f"{want}{i}" for i in range(SLOTS[want]) if f"{want}{i}" not in taken]
            if free:
                slots[name] = free[0]
    return {**backend, "slots": slots, "spent": spent}


def with_fields_of(manifest: Manifest, items: list[dict]) -> Manifest:
    """The record with the fields of image items about to be written: their kinds, and
    their slots."""
    kinds = field_kinds([item_fields(it) for it in items], manifest.kinds)
    return replace(manifest, kinds=kinds, backend=assign_slots(kinds, manifest.backend))


def slot_values(fields: dict[str, Any], slots: dict[str, str]) -> dict[str, Any]:
    """A row's typed columns: each slot's field value (None where the item lacks it); text
    slots hold a value as text, as a FAISS folder's text columns do."""
    out: dict[str, Any] = {f"{k}{i}": None for k, n in SLOTS.items() for i in range(n)}
    for name, slot in slots.items():
        value = fields.get(name)
        if value is None:
            continue
        if slot[0] == "t":
            out[slot] = str(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[slot] = float(value)
    return out


@dataclass(frozen=True)
class MilvusItems:
    """A collection's items at one version (the `Items` of `lightningdot.index.backend`)."""

    client: Any
    collection: str
    version: int
    model_id: str
    field_kinds: dict[str, str]
    prior: IndexPrior | None
    slots: dict[str, str] = field(default_factory=dict)  # field -> its typed column

    @property
    def gate(self) -> str:
        """The rows this version holds (see the module docstring)."""
        v = self.version
        return f"batch <= {v} and (gone == 0 or gone > {v})"

    @property
    def dim(self) -> int:
        fields = self.client.describe_collection(self.collection)["fields"]
        vector = next(f for f in fields if f["name"] == "vector")
        return int(vector["params"]["dim"]) - (self.prior is not None)

    @property
    def count(self) -> int:
        rows = self.client.query(self.collection, filter=self.gate, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @property
    def kinds(self) -> dict[str, str]:
        return self.field_kinds

    def get(self, item_id: str) -> dict | None:
        rows = self.rows([item_id], ["item"])
        return rows[0]["item"] if rows else None

    def rows(self, item_ids: list[str], fields: list[str]) -> list[dict]:
        """The visible rows of these items (`fields` of each), a batch of ids at a time."""
        out = []
        for start in range(0, len(item_ids), BATCH):
            ids = ", ".join(milvus_literal(i) for i in item_ids[start : start + BATCH])
            expr = f"id in [{ids}] and {self.gate}"
            out += self.client.query(self.collection, filter=expr, output_fields=fields)
        return out

    def iterate(self, expr: str = "") -> Iterator[dict]:
        """Every item (passing the expression `expr`, when given), a page at a time."""
        gate = f"{self.gate} and ({expr})" if expr else self.gate
        for page in _pages(self.client, self.collection, gate, ["item"]):
            yield from (row["item"] for row in page)

    def uploads(self) -> set[str]:
        return {it["path"] for it in self.iterate(f'item["root"] == "{UPLOADS}"')}

    def vectors(self, item_ids: list[str]) -> np.ndarray:
        """(N, D) the vectors of these items, in order (their priors left out)."""
        by_id = {r["id"]: r["vector"] for r in self.rows(item_ids, ["id", "vector"])}
        if missing := [i for i in item_ids if i not in by_id]:
            raise DataError(f"{len(missing)} id(s) not in the index, e.g. {missing[:3]}")
        x = np.array([by_id[i] for i in item_ids], dtype=np.float32)
        return x[:, :-1] if self.prior is not None else x


@dataclass(frozen=True)
class MilvusView:
    """What a Milvus folder holds at one version (the `View` of `lightningdot.index.backend`)."""

    images: MilvusItems
    captions: MilvusItems | None
    search_params: dict

    def search(
        self,
        target: str,
        queries: np.ndarray,
        k: int,
        where: Filter | None = None,
        with_prior: bool = True,
    ) -> list[list[Hit]]:
        items = self.images if target == "images" else self.captions
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if items.prior is not None:
            q = with_prior_weight(q, with_prior)
        expr = items.gate if where is None else f"{items.gate} and {where.expression(items.slots)}"
        found = items.client.search(
            items.collection,
            data=q.tolist(),
            limit=max(1, min(k, MAX_LIMIT)),
            filter=expr,
            output_fields=["item"],
            search_params={"metric_type": "IP", "params": self.search_params},
        )
        return [[Hit(float(h["distance"]), h["entity"]["item"]) for h in hits] for hits in found]

    def states_of(self, image_ids: list[str]) -> None:
        return None  # a Milvus folder keeps no region states


def _pages(client: Any, name: str, expr: str, fields: list[str]) -> Iterator[list[dict]]:
    """The rows of a collection that pass `expr`, a page at a time (a query alone stops at
    Milvus's result window)."""
    pages = client.query_iterator(name, batch_size=BATCH, filter=expr, output_fields=fields)
    try:
        while page := pages.next():
            yield page
    finally:
        pages.close()


def collection_rows(
    vectors: np.ndarray, items: list[dict], fields: list[dict], batch: int, prior, slots
) -> list[dict]:
    """The rows of items with these vectors and filter fields (and their `slots`), added by
    commit `batch`."""
    x = vectors if prior is None else prior.of(np.ascontiguousarray(vectors, dtype=np.float32))
    return [
        {
            "pk": f"{batch}:{it['id']}",
            "id": it["id"],
            "batch": batch,
            "gone": 0,
            "vector": v,
            "item": it,
            "fields": f,
            **slot_values(f, slots),
        }
        for v, it, f in zip(x.tolist(), items, fields, strict=True)
    ]


def insert_rows(client: Any, name: str, vectors: np.ndarray, items, fields, batch, prior, slots):
    """Insert the rows of items (`collection_rows`) into collection `name`, made a batch at a
    time: a row holds its vector as Python floats, about 12 KB at 384 dimensions, so a
    million rows made at once would not fit in memory."""
    for start in range(0, len(items), BATCH):
        end = start + BATCH
        rows = collection_rows(
            vectors[start:end], items[start:end], fields[start:end], batch, prior, slots
        )
        client.insert(name, rows)


def caption_fields(captions: list[dict], images: dict[str, dict]) -> list[dict]:
    """A caption's filter fields: its image's (`images`: id -> item)."""
    return [item_fields(images[c["image"]]) if c["image"] in images else {} for c in captions]


def create_collection(
    client: Any, name: str, dim: int, cfg: IndexConfig, model_id: str, folder: Path
) -> None:
    """Make an empty collection of `dim`-dimensional vectors (a prior's coordinate included).

    Raises:
        DataError: a collection of that name exists (naming who made it).
    """
    from pymilvus import DataType, MilvusClient

    refuse_taken(client, name)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=65535)
    schema.add_field("id", DataType.VARCHAR, max_length=65535)
    schema.add_field("batch", DataType.INT64)
    schema.add_field("gone", DataType.INT64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("item", DataType.JSON)
    schema.add_field("fields", DataType.JSON)
    for kind, n in SLOTS.items():
        typed = {"n": {"datatype": DataType.DOUBLE}}.get(
            kind, {"datatype": DataType.VARCHAR, "max_length": 65535}
        )
        for i in range(n):
            schema.add_field(f"{kind}{i}", nullable=True, **typed)
    index = client.prepare_index_params()
    index.add_index("vector", metric_type="IP", **index_settings(cfg)[0])
    index.add_index("id", index_type="INVERTED")  # lookups by id: a search, not a scan
    props = {PROPERTY: json.dumps({"model_id": model_id, "folder": str(folder.resolve())})}
    client.create_collection(
        name, schema=schema, index_params=index, consistency_level="Strong", properties=props
    )


def refuse_taken(client: Any, name: str) -> None:
    """Raises DataError if a collection of that name exists, naming who made it."""
    if client.has_collection(name):
        made_by = collection_model(client, name)
        whose = f"by model {made_by[:12]}" if made_by else "not by lightningdot"
        raise DataError(
            f"Milvus collection {name} exists already (made {whose}): choose another "
            "--collection, or rebuild the index folder that holds it"
        )


def collection_owner(client: Any, name: str) -> dict:
    """What a collection lightningdot made records of its maker ({"model_id", "folder"});
    {} for another's."""
    props = client.describe_collection(name).get("properties") or {}
    with contextlib.suppress(ValueError, TypeError, KeyError):
        owner = json.loads(props[PROPERTY])
        return owner if isinstance(owner, dict) else {}
    return {}


def collection_model(client: Any, name: str) -> str | None:
    """The model id a collection of lightningdot's records; None for another's."""
    return collection_owner(client, name).get("model_id")


def drop_orphans(client: Any, folder: Path, named: set[str]) -> None:
    """Drop the collections a killed writer of `folder` made that its record does not name."""
    mine = str(folder.resolve())
    for name in client.list_collections():
        if name not in named and collection_owner(client, name).get("folder") == mine:
            client.drop_collection(name)


def check_collections(client: Any, manifest: Manifest, model_id: str | None) -> None:
    """Refuse a record whose collections are gone or were made by another model.

    Raises:
        DataError: a collection is missing; ConfigMismatchError: made by another model.
    """
    for part, name in manifest.backend["collections"].items():
        if not client.has_collection(name):
            raise DataError(
                f"the Milvus {part} collection {name} is gone from {client_uri(manifest)}"
            )
        made_by = collection_model(client, name)
        if made_by != manifest.model_id or (model_id is not None and made_by != model_id):
            raise ConfigMismatchError(
                f"Milvus collection {name} was made by model {str(made_by)[:12]}, not by the "
                f"loaded model {(model_id or manifest.model_id)[:12]}; rebuild the index or "
                "load the same model"
            )
        client.load_collection(name)


def client_uri(manifest: Manifest) -> str:
    return manifest.backend["uri"]


class MilvusFolder(IndexFolder):
    """An index folder whose vectors are in Milvus (see the module docstring). Searches read
    the record's current version, whichever process committed it."""

    def __init__(self, folder: Path, manifest: Manifest, priors: Priors) -> None:
        self.client = connect(client_uri(manifest))
        self.priors = priors
        self._stamp: tuple | None = None
        super().__init__(folder, manifest, self._view(manifest), priors.captions)
        self._stamp = _record_stamp(folder)

    @classmethod
    def _load_current(cls, folder, model_id, caption_prior, mmap) -> MilvusFolder:
        """The folder's collections, refused unless made by `model_id` (when given); the
        model's caption prior is not needed: the folder keeps its own."""
        manifest = Manifest.read(folder)
        check_collections(connect(client_uri(manifest)), manifest, model_id)
        return cls(folder, manifest, cls._priors(folder, manifest))

    def _tidy(self) -> None:
        """Undo what a killed writer left in Milvus, then in the folder."""
        self._recover()
        super()._tidy()

    @staticmethod
    def _priors(folder: Path, manifest: Manifest) -> Priors:
        part = manifest.parts.get("priors")
        beta = manifest.backend.get("beta")
        return Priors.read(folder / part, beta) if part else Priors(None, None)

    def _view(self, manifest: Manifest) -> MilvusView:
        names = manifest.backend["collections"]
        cfg = from_dict(IndexConfig, manifest.backend.get("config") or {})

        def items(part: str) -> MilvusItems | None:
            if part not in names:
                return None
            prior = getattr(self.priors, part)
            kinds, slots = manifest.kinds or {}, manifest.backend.get("slots") or {}
            args = (names[part], manifest.version, manifest.model_id, kinds, prior, slots)
            return MilvusItems(self.client, *args)

        return MilvusView(items("images"), items("captions"), index_settings(cfg)[1])

    @property
    def live(self) -> MilvusView:
        """The view of the record's current version (read again when the record changed)."""
        stamp = _record_stamp(self.folder)
        if self._stamp is not None and stamp != self._stamp:
            with contextlib.suppress(DataError):  # a record being replaced: the one we had
                manifest = Manifest.read(self.folder)
                self._stamp, self.manifest = stamp, manifest
                self._live = self._view(manifest)
        return self._live

    @property
    def states(self) -> None:
        return None

    def _catch_up(self) -> None:
        """Take the record's current version (the same view when it is the one held, as a
        sync checks), and undo what a killed writer left."""
        stamp = _record_stamp(self.folder)
        if stamp is None or stamp != self._stamp:
            self.manifest = Manifest.read(self.folder)
            self._stamp, self._live = stamp, self._view(self.manifest)
        self._recover()

    def _collections(self) -> dict[str, str]:
        return self.manifest.backend["collections"]

    def _recover(self) -> None:
        """Undo what a writer killed before its commit left (its mark says one was at work):
        its rows, its marks on rows, and a collection it made."""
        pending = self.folder / PENDING
        if not pending.exists():
            return
        v = self.manifest.version
        for name in self._collections().values():
            self.client.delete(name, filter=f"batch > {v}")
            for marked in _pages(self.client, name, f"gone > {v}", ["*"]):
                self.client.upsert(name, [{**r, "gone": 0} for r in marked])
            self.client.flush(name)
        drop_orphans(self.client, self.folder, set(self._collections().values()))
        pending.unlink()

    def _tidy_rows(self) -> None:
        """Purge every row retired before the current version."""
        for name in self._collections().values():
            self.client.delete(name, filter=f"gone > 0 and gone < {self.manifest.version}")

    def _commit_rows(self, rows: Rows, new: list[bool], gone: list[str]) -> None:
        """Commit the `new` rows, the images `gone` (and their captions) retired first."""
        keep = np.array(new)
        items = [it for it, n in zip(rows.items, new, strict=True) if n]
        inserts = {"images": (rows.vectors[keep], items, [item_fields(it) for it in items])}
        if rows.captions is not None:
            text, captions = rows.captions
            ids = {it["id"]: it for it in items}
            mine = np.array([c["image"] in ids for c in captions], dtype=bool)
            if mine.any():
                chosen = [c for c, m in zip(captions, mine, strict=True) if m]
                inserts["captions"] = (text[mine], chosen, caption_fields(chosen, ids))
        roots = self._roots_with(rows)
        added = {it["id"] for it in items}
        uploads = {k: v for k, v in rows.uploads.items() if k in added}
        retire = {"images": gone, "captions": self._caption_ids(gone)}
        manifest = with_fields_of(replace(self.manifest, roots=roots), items)
        self._change(manifest, inserts, retire, uploads)

    def _caption_ids(self, image_ids: list[str]) -> list[str]:
        """The ids of these images' captions in the caption collection (two queries)."""
        view = self.live
        if view.captions is None or not image_ids:
            return []
        items = [r["item"] for r in view.images.rows(image_ids, ["item"])]
        wanted = [f"{it['id']}#{j}" for it in items for j in range(len(it.get("captions") or []))]
        return [r["id"] for r in view.captions.rows(wanted, ["id"])]

    def _delete(self, image_ids: list[str]) -> None:
        if missing := [i for i in image_ids if self.image_index.get(i) is None]:
            raise DataError(f"{len(missing)} id(s) not in the index, e.g. {missing[:3]}")
        retire = {"images": image_ids, "captions": self._caption_ids(image_ids)}
        self._change(self.manifest, {}, retire, {})

    def compact(self) -> int:
        """Purge now the rows the last change retired, which the next change would purge
        (Milvus compacts its segments itself); returns how many rows it purges, or -1 for
        those of a change too large to list (purged by a scan). None: no commit."""
        with self.writing():
            retired = self.manifest.backend.get("retired") or {}
            count = -1 if retired == "scan" else sum(map(len, retired.values()))
            if count:
                self._change(self.manifest, {}, {}, {})
        return count

    def _update(self, image_id: str, fields: dict) -> None:
        """Insert the image's row, and its captions', with its new fields; retire the old."""
        view = self.live
        row = next(iter(view.images.rows([image_id], ["vector", "item"])), None)
        if row is None:
            raise DataError(f"no image {image_id!r} in the index")
        meta = {**(row["item"].get("meta") or {}), **fields}
        item = {**row["item"], "meta": {k: v for k, v in meta.items() if v is not None}}
        raw = np.array([row["vector"]], dtype=np.float32)
        inserts = {"images": (raw, [item], [item_fields(item)], True)}
        captions = self._caption_ids([image_id])
        if captions:
            held = view.captions.rows(captions, ["vector", "item"])
            text = np.array([r["vector"] for r in held], dtype=np.float32)
            chosen = [r["item"] for r in held]
            fields_of = caption_fields(chosen, {image_id: item})
            inserts["captions"] = (text, chosen, fields_of, True)
        retire = {"images": [image_id], "captions": captions}
        self._change(with_fields_of(self.manifest, [item]), inserts, retire, {})

    def _change(self, manifest: Manifest, inserts: dict, retire: dict, uploads: dict) -> None:
        """One commit: insert rows ((vectors, items, fields[, vectors hold priors])) per part,
        retire the rows of the ids `retire` names per part, then replace the record with
        `manifest` (see the module docstring). An error before the record is replaced undoes
        what was written."""
        version, previous = self.manifest.version + 1, self.manifest
        write_json(self.folder / PENDING, {"version": version})  # before the first row
        try:
            manifest = self._insert(manifest, inserts, version)
            retired = {part: self._retire(part, ids, version) for part, ids in retire.items()}
            for name in manifest.backend["collections"].values():
                self.client.flush(name)
            listed = sum(map(len, retired.values())) <= PURGE_LIST
            backend = {**manifest.backend, "retired": retired if listed else "scan"}
            committed = commit(
                self.folder, previous, replace(manifest, backend=backend), {}, uploads
            )
        except BaseException:
            if Manifest.read(self.folder).version == previous.version:
                with contextlib.suppress(Exception):
                    self._recover()
                    sweep_uploads(self.folder, previous, self.image_index)
            raise
        (self.folder / PENDING).unlink()
        self.manifest = committed
        self._stamp, self._live = _record_stamp(self.folder), self._view(committed)
        with contextlib.suppress(Exception):  # tidying: the commit is done
            self._purge(previous.backend.get("retired"))
            sweep_uploads(self.folder, committed, self.image_index)

    def _insert(self, manifest: Manifest, inserts: dict, version: int) -> Manifest:
        """Insert rows with batch `version`; a part's first rows make its collection."""
        names = dict(manifest.backend["collections"])
        for part, (vectors, items, fields, *with_prior) in inserts.items():
            if not items:
                continue
            prior = None if with_prior else getattr(self.priors, part)
            if part not in names:
                names[part] = f"{manifest.backend['base']}_{part}_v{version}"
                dim = vectors.shape[1] + (prior is not None)
                cfg = from_dict(IndexConfig, manifest.backend.get("config") or {})
                create_collection(
                    self.client, names[part], dim, cfg, manifest.model_id, self.folder
                )
            slots = manifest.backend["slots"]
            insert_rows(self.client, names[part], vectors, items, fields, version, prior, slots)
        return replace(manifest, backend={**manifest.backend, "collections": names})

    def _retire(self, part: str, ids: list[str], version: int) -> list[str]:
        """Mark the rows of these items gone at `version`; returns their keys."""
        if not ids:
            return []
        items = getattr(self.live, part)
        held = items.rows(ids, ["*"])
        for start in range(0, len(held), BATCH):
            marked = [{**r, "gone": version} for r in held[start : start + BATCH]]
            self.client.upsert(items.collection, marked)
        return [r["pk"] for r in held]

    def _purge(self, retired: dict | str | None) -> None:
        """Remove the rows the commit before this one retired: by key where its record
        lists them, else every row retired before this version."""
        if retired == "scan":
            self._tidy_rows()
            return
        for part, keys in (retired or {}).items():
            if keys and part in self._collections():
                self.client.delete(self._collections()[part], ids=keys)


def build_milvus(
    folder: Path,
    manifest: Manifest,
    target: MilvusTarget,
    images: tuple[np.ndarray, list[dict]],
    captions: tuple[np.ndarray, list[dict]] | None,
    priors: Priors,
    cfg: IndexConfig,
) -> None:
    """Write a new index folder whose collections are in Milvus, or replace every part of the
    index folder at `folder` (of either backend), in one commit.

    Raises:
        DataError: `folder` is not one a build may write (`IndexFolder.create`), a collection
            of the new names exists, or Milvus cannot be reached (nothing is made).
    """
    check_buildable(folder)
    index_settings(cfg)
    client = connect(target.uri)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / LOCK):
        current = replaceable(folder)
        version = (current.version if current is not None else 0) + 1
        names = {p: f"{target.collection}_{p}_v{version}" for p in PARTS}
        backend = {"kind": "milvus", "uri": target.uri, "base": target.collection}
        backend.update(config=asdict(cfg), collections={})
        if priors.beta is not None:
            backend["beta"] = priors.beta
        new = with_fields_of(replace(manifest, backend=backend, parts={}), images[1])
        if current is not None:
            new = replace(new, version=current.version, upgraded=current.old)
        named = set(((current and current.backend) or {}).get("collections", {}).values())
        drop_orphans(client, folder, named)  # what a killed build of this folder made
        for name in names.values():  # refused before anything is made
            refuse_taken(client, name)
        made = _filled(client, folder, names, new, images, captions, priors)
        _commit_build(folder, client, current, new, made, priors)


def _filled(client, folder, names, manifest, images, captions, priors) -> dict[str, str]:
    """Make and fill the collections of a build, named `names` (its version's)."""
    version = manifest.version + 1
    made: dict[str, str] = {}
    try:
        for part, rows in (("images", images), ("captions", captions)):
            if rows is None or not rows[1]:
                continue
            vectors, items = rows
            prior = getattr(priors, part)
            name = names[part]
            dim = vectors.shape[1] + (prior is not None)
            cfg = from_dict(IndexConfig, manifest.backend["config"])
            create_collection(client, name, dim, cfg, manifest.model_id, folder)
            made[part] = name
            fields = (
                [item_fields(it) for it in items]
                if part == "images"
                else caption_fields(items, {it["id"]: it for it in images[1]})
            )
            slots = manifest.backend["slots"]
            insert_rows(client, name, vectors, items, fields, version, prior, slots)
            client.flush(name)
    except BaseException:
        for name in made.values():
            with contextlib.suppress(Exception):
                client.drop_collection(name)
        raise
    return made


def _commit_build(folder, client, current, new, made, priors) -> None:
    """Commit a build's record naming the collections `made`, then drop those it replaced."""
    new = replace(new, backend={**new.backend, "collections": made})
    parts = {"priors": priors} if priors.beta is not None else {}
    try:
        commit(folder, current or new, new, parts, {})
    except BaseException:
        if not _names(folder, made):
            for name in made.values():
                with contextlib.suppress(Exception):
                    client.drop_collection(name)
        raise


def drop_replaced(current: Manifest | None, new: Manifest) -> None:
    """Drop the Milvus collections of the record `current` that `new` no longer names (after
    a rebuild, of either backend, has committed `new`)."""
    if current is None or current.backend is None:
        return
    keep = set((new.backend or {}).get("collections", {}).values())
    with contextlib.suppress(Exception):  # the rebuild is committed: tidying is best effort
        client = connect(client_uri(current))
        for name in current.backend["collections"].values():
            if name not in keep and client.has_collection(name):
                client.drop_collection(name)


def _names(folder: Path, collections: dict[str, str]) -> bool:
    """Whether the folder's record names these collections (a build's commit came)."""
    try:
        backend = Manifest.read(folder).backend
    except DataError:
        return False
    return backend is not None and backend["collections"] == collections


def _record_stamp(folder: Path) -> tuple | None:
    try:
        st = os.stat(folder / RECORD)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
