"""An index folder brought in line with a folder of images: `ldot index --images DIR --out INDEX
--sync`.

Each image of the folder is compared with the item the index holds at its path:

- same size and mtime as the item records: unchanged (its file is not read);
- else its bytes are hashed (`file_hash`, recorded as the item's "hash" since `ldot index`
  and `--add` keep one): the same hash as the item's is a touch (the item's fields are
  updated, its vector kept); another is a change (encoded again);
- a path the index does not hold, with the hash of an indexed image whose file is gone, is a
  move: the image takes the new path and id and keeps its vector, captions and region states;
  any other new path is an addition;
- an indexed image whose file is gone (and did not move) is removed, with its captions.

An image that needs a vector gets the one the index holds for the same bytes, wherever they
are (a copy, two files swapped), and is encoded only when there is none. Items recorded
before hashes were kept (no "hash"): unchanged while their size and mtime are, encoded again
when those change, and never taken for the source of a move.

Captions: with an annotation file, every image the sync writes gets the captions the file
gives it (and an unchanged image whose captions differ is written again), as a build would;
without one, each image keeps the captions the index holds for it, under its new id when it
moved, and new images have none. A user's fields file (`--metadata`) sets the fields it names
on the images the sync writes and on unchanged ones whose fields then differ; fields it does
not name are kept.

Every change lands in one commit (`IndexFolder.change`): a search sees the index before the
sync or after it. Encoding, the expensive part, runs without holding the folder; what it
encodes is staged as it goes in `INDEX/.sync/` (chunks keyed by the images' hashes, each
written whole), so a sync killed halfway encodes only the rest when run again; the staging is
removed once the sync commits. A sync refuses a folder that is gone or holds none of its
images while the index holds some (a drive that is not mounted must not empty the index), and
a folder that is not one of the index's roots (add it with `--add` first).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightningdot.config import AUTO_RUNTIME, RuntimeConfig
from lightningdot.data import ImageRecord, read_collection
from lightningdot.encode import RegionSource, StateRows, encode_readable, encode_texts
from lightningdot.errors import DataError
from lightningdot.index.build import caption_items, image_items, user_fields
from lightningdot.index.engines import load_index, open_index
from lightningdot.index.folder import IndexFolder, Rows
from lightningdot.index.metadata import BUILT_IN, file_hash
from lightningdot.index.record import UPLOADS, Manifest
from lightningdot.index.storage import STAGING, remove_staging
from lightningdot.index.vector import VectorIndex
from lightningdot.io import atomic_path
from lightningdot.model.checkpoint import load_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.progress import Progress, Silent
from lightningdot.runtime import accelerate

STAGE_CHUNK = 256  # images encoded between two writes of the staging
TRIES = 5  # plans made again when another writer commits while a sync encodes


@dataclass
class SyncReport:
    """What a sync changed (each image counted once)."""

    added: int = 0  # paths new to the index (moves not counted)
    changed: int = 0  # images whose content changed
    removed: int = 0  # images whose file is gone
    moved: int = 0  # images found under another path, their vectors kept
    touched: int = 0  # same content, new mtime, captions or fields: updated, not encoded
    encoded: int = 0  # images run through the encoder (the others' vectors were kept)
    total: int = 0  # images in the index after the sync
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why) not decoded
    skipped_fields: list[tuple[str, str]] = field(default_factory=list)  # (row, why)

    @property
    def line(self) -> str:
        """The summary `ldot index --sync` prints: "+12 added, 3 changed, 40 removed, 7 moved,
        1 unreadable"."""
        return (
            f"+{self.added} added, {self.changed} changed, {self.removed} removed, "
            f"{self.moved} moved, {len(self.failed)} unreadable"
        )


@dataclass
class Entry:
    """An image the sync writes a row for."""

    path: str
    kind: str  # "added", "changed", "moved" or "touched"
    digest: str | None  # the hash of its bytes (None: an older item's, not read)
    donor: str | None = None  # the id of an indexed image whose vector it takes, else encoded
    old: dict | None = None  # the item it replaces (or, for a move, the one it came from)


@dataclass
class Plan:
    """What a sync of one root changes in the index as one view holds it."""

    entries: list[Entry] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # ids deleted (those written again too)
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # files that cannot be read

    def to_encode(self, pool: dict, failed: dict) -> dict[str, str]:
        """{hash: path} of the bytes no vector is known of (nor known not to decode)."""
        return {
            e.digest: e.path
            for e in self.entries
            if e.donor is None and e.digest not in pool and e.digest not in failed
        }


@dataclass
class Collection:
    """The folder's side of a sync: its images, and what the user gives of them."""

    root: str  # the root name the index records the folder under
    folder: Path  # resolved
    prefix: str  # of the ids of its images ("" for the index's first root)
    # path -> (size, mtime) of each image file there
    present: dict[str, tuple[int, float]] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)  # named by the annotations, no file
    captions: dict[str, list[str]] | None = None  # path -> captions, from an annotation file
    fields: dict[str, dict] | None = None  # path -> the user's fields, from a fields file
    hashes: dict[tuple, str | None] = field(default_factory=dict)  # (path, stat) -> hash

    def hash_of(self, path: str) -> str | None:
        key = (path, *self.present[path])
        if key not in self.hashes:
            self.hashes[key] = file_hash(self.folder / path)
        return self.hashes[key]

    def item(self, entry: Entry) -> dict:
        """The item the index will hold for `entry` (its user fields kept, the file's read
        again)."""
        old = entry.old or {}
        if self.captions is not None:
            captions = self.captions.get(entry.path, [])
        else:
            captions = list(old.get("captions") or [])
        record = ImageRecord(entry.path, captions)
        hashes = {entry.path: entry.digest} if entry.digest else None
        (it,) = image_items([record], self.root, self.prefix, self.folder, self.fields, hashes)
        kept = {k: v for k, v in (old.get("meta") or {}).items() if k not in BUILT_IN}
        if meta := {**kept, **it.get("meta", {})}:
            it["meta"] = meta
        return it

    def differs(self, item: dict) -> bool:
        """Whether an unchanged file's item lacks the captions or fields given for it."""
        path = item["path"]
        if self.captions is not None and (item.get("captions") or []) != self.captions[path]:
            return True
        meta = item.get("meta") or {}
        return self.fields is not None and {**meta, **self.fields.get(path, {})} != meta


def same_stat(item: dict, stat: tuple[int, float]) -> bool:
    meta = item.get("meta") or {}
    return (meta.get("size"), meta.get("mtime")) == stat


def file_stat(path: Path) -> tuple[int, float] | None:
    """(size, mtime) as `file_metadata` records them; None for no file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, round(st.st_mtime, 3)) if os.path.isfile(path) else None


def held_items(index: IndexFolder, images: VectorIndex, root: str) -> dict[str, dict]:
    """path -> item of the images the index holds from root `root`."""
    primary = index.manifest.primary_root
    return {
        it["path"]: it
        for it in images.iterate()
        if (it.get("root") or primary) == root
        and isinstance(it.get("path"), str)
        and not os.path.isabs(it["path"])
    }


def plan_sync(
    images: VectorIndex, held: dict[str, dict], ours: Collection, progress: Progress
) -> Plan:
    """Compare the folder's files with the items `held` of the image index `images`."""
    plan, fresh = Plan(), []
    by_hash: dict[str, str] = {}  # a hash -> an image of the index that holds those bytes
    for it in images.iterate():
        if it.get("hash"):
            by_hash.setdefault(it["hash"], it["id"])
    progress.start(len(ours.present), "comparing files")
    for path in ours.present:
        progress.advance(1)
        old = held.get(path)
        if old is not None and same_stat(old, ours.present[path]):
            if ours.differs(old):
                plan.entries.append(Entry(path, "touched", old.get("hash"), old["id"], old))
            continue
        digest = ours.hash_of(path)
        if digest is None:
            plan.failed.append((path, "cannot be read"))
        elif old is None:
            fresh.append((path, digest))
        elif old.get("hash") == digest:
            plan.entries.append(Entry(path, "touched", digest, old["id"], old))
        else:
            plan.entries.append(Entry(path, "changed", digest, by_hash.get(digest), old))
    _plan_moves(plan, fresh, held, ours, by_hash)
    plan.failed += [(p, "file not found") for p in ours.absent if p not in held]
    plan.gone = [held[e.path]["id"] for e in plan.entries if e.kind in ("touched", "changed")]
    plan.gone += [it["id"] for it in held.values() if it["path"] not in ours.present]
    return plan


def _plan_moves(
    plan: Plan,
    fresh: list[tuple[str, str]],
    held: dict[str, dict],
    ours: Collection,
    by_hash: dict[str, str],
) -> None:
    """Each new path takes the item of a vanished file with its hash (a move), else it is
    added; vanished files no new path took are removed."""
    vanished: dict[str, list[dict]] = {}
    for it in held.values():
        if it["path"] not in ours.present and it.get("hash"):
            vanished.setdefault(it["hash"], []).append(it)
    for path, digest in fresh:
        if vanished.get(digest):
            source = vanished[digest].pop(0)
            plan.entries.append(Entry(path, "moved", digest, source["id"], source))
        else:
            plan.entries.append(Entry(path, "added", digest, by_hash.get(digest)))
    moved = sum(e.kind == "moved" for e in plan.entries)
    plan.removed = sum(it["path"] not in ours.present for it in held.values()) - moved


class Staging:
    """What a sync encoded and has not committed yet: `INDEX/.sync/<hash>.npz` chunks, each
    written whole (`atomic_path`), holding the vectors (and region states) of images by the
    hash of their bytes and the model that encoded them."""

    def __init__(self, folder: Path, model_id: str, states: bool) -> None:
        self.root, self.model_id, self.states = folder / STAGING, model_id, states

    def read(self) -> dict[str, tuple]:
        """hash -> (vector (D,), states (L, H) and their length, or None) of what is staged
        by this model (a chunk that does not read is left to be encoded again)."""
        pool: dict[str, tuple] = {}
        if self.root.is_symlink() or not self.root.is_dir():
            return pool
        for f in sorted(self.root.glob("*.npz")):
            try:
                with np.load(f, allow_pickle=False) as z:
                    if str(z["model_id"]) != self.model_id or (self.states and "states" not in z):
                        continue
                    hashes, vectors = z["hashes"].tolist(), z["vectors"]
                    states = (z["states"], z["lengths"]) if self.states else None
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                continue
            for n, digest in enumerate(hashes):
                state = None if states is None else (states[0][n], int(states[1][n]))
                pool[digest] = (vectors[n], state)
        return pool

    def write(self, hashes: list[str], vectors: np.ndarray, states: StateRows | None) -> None:
        """Stage the encodings of a chunk of images."""
        name = hashlib.blake2b("".join(hashes).encode(), digest_size=16).hexdigest()
        arrays = {"model_id": np.array(self.model_id), "hashes": np.array(hashes)}
        arrays["vectors"] = np.ascontiguousarray(vectors, dtype=np.float32)
        if states is not None:
            arrays.update(states=states.states, lengths=states.lengths)
        with atomic_path(self.root / f"{name}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)


def encode_staged(
    model: BiEncoder,
    ours: Collection,
    todo: dict[str, str],
    staging: Staging,
    pool: dict,
    failed: dict[str, str],
    progress: Progress,
) -> int:
    """Encode the files `todo` ({hash: path}), STAGE_CHUNK at a time, each chunk staged before
    the next starts, into `pool` (files that do not decode into `failed`); returns how many
    were encoded."""
    source = RegionSource.of(model, None, ours.folder)
    items = list(todo.items())
    progress.start(len(items), "encoding images")
    encoded = 0
    for s in range(0, len(items), STAGE_CHUNK):
        part = items[s : s + STAGE_CHUNK]
        out = encode_readable(model, source, [p for _, p in part], progress, staging.states)
        hash_of = {path: digest for digest, path in part}
        failed.update({hash_of[path]: why for path, why in out.failed})
        if not out.kept:
            continue
        hashes = [part[n][0] for n in out.kept]
        vectors = out.vectors.numpy()
        staging.write(hashes, vectors, out.states)
        for k, digest in enumerate(hashes):
            state = None if out.states is None else (out.states.states[k], out.states.lengths[k])
            pool[digest] = (vectors[k], state)
        encoded += len(hashes)
    return encoded


def rows_of(
    index: IndexFolder, plan: Plan, ours: Collection, model: BiEncoder, pool: dict, failed: dict
) -> tuple[Rows, list[Entry]]:
    """The rows a plan writes (vectors kept from the index or encoded, captions encoded), and
    the entries they are of (those whose bytes do not decode are left out)."""
    entries = [e for e in plan.entries if e.donor is not None or e.digest not in failed]
    images, keeps = index.image_index, index.states is not None
    donors = [e.donor for e in entries if e.donor is not None]
    kept = dict(zip(donors, images.vectors(donors), strict=True))
    kept_states = {}
    if keeps and donors:
        taken = index.states.take([images.row(d) for d in donors])
        kept_states = {d: (taken.states[n], taken.lengths[n]) for n, d in enumerate(donors)}
    vectors, states = [], []
    for e in entries:
        known = e.donor is not None
        vector, state = (kept[e.donor], kept_states.get(e.donor)) if known else pool[e.digest]
        vectors.append(vector)
        states.append(state)
    items = [ours.item(e) for e in entries]
    rows = Rows(np.stack(vectors) if vectors else np.zeros((0, images.dim), np.float32), items)
    rows.root = (ours.root, index.manifest.roots[ours.root])
    if keeps and states:
        parts = [StateRows(np.asarray(s[None]), np.array([n], np.int32)) for s, n in states]
        rows.states = StateRows.concat(parts)
    texts = [c for it in items for c in it["captions"]]
    if texts:
        rows.captions = (encode_texts(model, texts).numpy(), caption_items(items))
    return rows, entries


def sync_collection(
    index: IndexFolder, model: BiEncoder, ours: Collection, progress: Progress | None = None
) -> SyncReport:
    """Bring the index's images of root `ours.root` in line with the folder, in one commit
    (see the module docstring); run again after an interruption, it encodes only what the
    interrupted run had not staged.

    The plan is made on the index as committed, the missing vectors encoded without holding
    the folder, and the commit made only if no other writer committed meanwhile (else the
    plan is made again, the staged encodings kept).

    Raises:
        DataError: other writers kept committing through TRIES plans.
    """
    progress = progress or Silent()
    staging = Staging(index.folder, index.image_index.model_id, index.states is not None)
    pool, failed, encoded = staging.read(), {}, 0
    for attempt in range(TRIES):
        with index.writing():
            images = index.image_index
        held = held_items(index, images, ours.root)
        plan = plan_sync(images, held, ours, progress if attempt == 0 else Silent())
        if todo := plan.to_encode(pool, failed):
            encoded += encode_staged(model, ours, todo, staging, pool, failed, progress)
        with index.writing():
            if index.image_index is not images:
                continue  # another writer committed: plan again
            rows, entries = rows_of(index, plan, ours, model, pool, failed)
            index.change(rows, plan.gone)
            with contextlib.suppress(OSError):  # committed: what is left, the next sync removes
                remove_staging(index.folder)
        return _report(plan, entries, failed, encoded, index.image_index.count)
    raise DataError(f"{index.folder} kept changing while the sync ran: sync again")


def _report(
    plan: Plan, entries: list[Entry], failed: dict[str, str], encoded: int, total: int
) -> SyncReport:
    report = SyncReport(removed=plan.removed, encoded=encoded, total=total)
    for e in entries:
        setattr(report, e.kind, getattr(report, e.kind) + 1)
    report.failed = plan.failed + [
        (e.path, failed[e.digest]) for e in plan.entries if e.donor is None and e.digest in failed
    ]
    return report


def collection_of(
    index: IndexFolder,
    image_dir: Path,
    annotations: Path | None = None,
    split: str | None = None,
    fields_file: Path | None = None,
) -> tuple[Collection, list[tuple[str, str]]]:
    """The folder's side of a sync (the images an annotation file names, or every image under
    `image_dir`; the user's fields from `fields_file`), and the fields rows skipped; with the
    refusals that keep a sync from emptying an index by mistake.

    Raises:
        DataError: `image_dir` is not one of the index's roots, is gone, or holds none of the
            images while the index holds some from it; the fields file cannot be read.
    """
    root = index.root_for(Path(image_dir))
    if root not in index.manifest.roots:
        known = ", ".join(str(index.root_folder(r)) for r in index.manifest.roots if r != UPLOADS)
        raise DataError(
            f"{image_dir} is not a folder of this index ({known}): add it with --add first"
        )
    held = held_items(index, index.image_index, root)
    keep = f"nothing synced: a sync would remove its {len(held)} indexed image(s)"
    if held and not Path(image_dir).is_dir():
        raise DataError(f"image folder not found: {image_dir} ({keep}; is a drive unmounted?)")
    try:
        corpus = read_collection(image_dir, annotations, split)
    except DataError as e:
        raise DataError(f"{e} ({keep})" if held else str(e)) from None
    fields, skipped = user_fields(fields_file, corpus)
    folder = Path(image_dir).resolve()
    stats = {im.key: file_stat(folder / im.key) for im in corpus.images}
    present = {k: s for k, s in stats.items() if s is not None}
    if held and not present:
        raise DataError(f"none of the images are under {image_dir} ({keep})")
    ours = Collection(root, folder, "" if root == index.manifest.primary_root else f"{root}/")
    ours.present = present
    ours.absent = [k for k, s in stats.items() if s is None]
    ours.captions = {im.key: im.captions for im in corpus.images} if annotations else None
    ours.fields = fields if fields_file is not None else None
    return ours, skipped


def sync_images(
    out: Path,
    image_dir: Path,
    annotations: Path | None = None,
    split: str | None = None,
    model: str | None = None,
    progress: Progress | None = None,
    runtime: RuntimeConfig = AUTO_RUNTIME,
    fields_file: Path | None = None,
) -> SyncReport:
    """`ldot index --sync`: bring the index folder `out` in line with the folder `image_dir`
    (by default with the model that built it, run on `runtime`), with the user's fields from
    `fields_file` (see the module docstring).

    Raises:
        DataError: see `collection_of`; the model is not the index's.
    """
    # The folder is checked before the model loads, on the index as committed now.
    ours, skipped = collection_of(load_index(out), image_dir, annotations, split, fields_file)
    net = accelerate(load_model(model or Manifest.read(Path(out)).model), runtime)
    report = sync_collection(open_index(out, net, mmap=False), net, ours, progress)
    report.skipped_fields = skipped
    return report
