"""An index folder: a collection's image index, its caption index, and what made them, changed
one atomic commit at a time.

    retriever.json  the record, the one file a change replaces: {"format": 2, "model",
                    "model_id", "version": N, "parts": {"images": "v3/images", "captions":
                    "v2/captions"}, "roots": {name: folder}, "features"?: where re-ranking
                    reads regions}
    vN/images/      `VectorIndex` of the images; items {"id", "root", "path", "captions"?}
    vN/captions/    `VectorIndex` of their captions; items {"id": "<image id>#<n>", "image",
                    "caption"}
    uploads/        images added through `ldot serve`, named by a hash of their bytes
    .lock           writers take turns on it

A change writes the parts it changes into a new version folder, flushes them to disk, and then
replaces `retriever.json` (the way SQLite's WAL or Delta Lake commit): before that rename the
folder is as it was, after it as the change made it. Parts are never written again once
committed, so a reader keeps a consistent view while a writer works. What a killed writer left
(a version folder the record does not name, an upload no item names, a temporary file) is
swept by the next writer, and by any opener that finds the lock free.

An item's `path` is relative to its root: the folder it was indexed from (recorded absolute), or
`uploads` (relative to the index folder, so a moved index folder keeps its uploads). Folders of
the layout before versions (`images/` and `captions/` beside a record without a format) open as
version 0; their first change moves them to this one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from lightningdot.errors import DataError
from lightningdot.features import FeatureStore
from lightningdot.index.vector import IndexPrior, VectorIndex, priors_of
from lightningdot.io import atomic_path, fsync_dir, read_json, recover_dir, sync_tree, write_json
from lightningdot.model.checkpoint import index_identity
from lightningdot.model.encoders import BiEncoder

RECORD = "retriever.json"
FORMAT = 2
LOCK = ".lock"
UPLOADS = "uploads"  # the root of uploaded images, and its folder in the index folder
VERSION = re.compile(r"v\d+")
# Names the layout before versions used, and that its writers left after a crash.
LEGACY = {f"{part}{end}" for part in ("images", "captions") for end in ("", ".old", ".tmp")}

# Caption rows to add beside image rows: (vectors (C, D), their items).
CaptionRows = tuple[np.ndarray, list[dict]]


def root_name(folder: Path) -> str:
    """The name a root of images from `folder` goes by: the folder's own, unless reserved."""
    return folder.name if folder.name not in ("", UPLOADS) else "images"


@dataclass
class Manifest:
    """An index folder's record (`retriever.json`): what a commit replaces."""

    model: str  # name or folder of the model that made it
    model_id: str
    version: int = 0
    parts: dict[str, str] = field(default_factory=dict)  # "images"/"captions" -> their folder
    roots: dict[str, str] = field(default_factory=dict)  # the first is the collection's own
    features: str | None = None
    upgraded: bool = False  # from the layout before versions, whose folders may be left over
    legacy: bool = False  # read from that layout (not saved: a commit moves it to this one)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The record of the index folder `folder`.

        Raises:
            DataError: `folder` is not an index folder, or its record is damaged.
        """
        missing = f"not an index folder (no {RECORD}): {folder}"
        data = read_json(folder / RECORD, "index folder record", missing)
        if not isinstance(data, dict) or not {"model", "model_id"} <= data.keys():
            raise DataError(f"damaged index folder record {folder / RECORD}")
        if "format" not in data:
            return cls._of_legacy(folder, data)
        if data["format"] != FORMAT:
            raise DataError(f"{folder}: unknown index folder format {data['format']!r}")
        known = {f.name for f in fields(cls)} - {"legacy"}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        if not (
            isinstance(manifest.version, int)
            and _names_folders(manifest.parts)
            and "images" in manifest.parts
            and _names_folders(manifest.roots)
        ):
            raise DataError(f"damaged index folder record {folder / RECORD}")
        return manifest

    @classmethod
    def _of_legacy(cls, folder: Path, data: dict) -> Manifest:
        parts = {p: p for p in ("images", "captions") if (folder / p).is_dir()}
        parts.setdefault("images", "images")  # where the part is missing, loading says so
        roots = {"images": data["images"]} if data.get("images") else {}
        features = data.get("features")
        return cls(data["model"], data["model_id"], 0, parts, roots, features, legacy=True)

    def write(self, folder: Path) -> None:
        """Replace the folder's record: the commit point of every change."""
        record = {k: v for k, v in asdict(self).items() if v is not None}
        del record["legacy"]
        if not self.upgraded:
            del record["upgraded"]
        write_json(folder / RECORD, {"format": FORMAT, **record})

    @property
    def primary_root(self) -> str | None:
        """The root of the collection the folder was built from."""
        return next((name for name in self.roots if name != UPLOADS), None)


def _names_folders(table: object) -> bool:
    return isinstance(table, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in table.items()
    )


@dataclass
class Rows:
    """Rows to add to an index folder in one commit."""

    vectors: np.ndarray  # (N, D) of the images
    items: list[dict]  # {"id", "root", "path", ...} each
    captions: CaptionRows | None = None
    root: tuple[str, str] | None = None  # (name, folder) of the items' root, recorded with them
    uploads: dict[str, bytes] = field(default_factory=dict)  # files to store under uploads/


class IndexFolder:
    """An index folder opened for search and for changes (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        image_index: VectorIndex,
        caption_index: VectorIndex | None,
        caption_prior: IndexPrior | None = None,
    ) -> None:
        self.folder, self.manifest = folder, manifest
        self.image_index, self.caption_index = image_index, caption_index
        self.caption_prior = caption_prior  # of a caption index the first captioned add makes
        # Changes in this process take turns on the first (re-entrant: a caller may hold it
        # around a check and a change), and with other processes on the lock file as well.
        self._thread_lock = threading.RLock()
        self._file_lock = FileLock(folder / LOCK)

    @classmethod
    def open(cls, folder: str | Path, model: BiEncoder, mmap: bool = True) -> IndexFolder:
        """Load the folder's indexes, refusing them unless `model` (or one sharing its
        indexes) made them."""
        return cls.load(folder, index_identity(model), priors_of(model.bank)[1], mmap)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        model_id: str | None = None,
        caption_prior: IndexPrior | None = None,
        mmap: bool = True,
    ) -> IndexFolder:
        """Load the folder's current version (refused unless made by `model_id`, when given),
        first tidying what a crashed writer left, if no writer is at work now."""
        folder = Path(folder)
        Manifest.read(folder)  # a clear error for a folder that is not an index folder
        lock = FileLock(folder / LOCK)
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):  # a writer at work (it tidies), or a read-only folder
            return cls._load_current(folder, model_id, caption_prior, mmap)
        try:
            _recover_legacy(folder, Manifest.read(folder))
            index = cls._load_current(folder, model_id, caption_prior, mmap)
            _sweep(folder, index.manifest, index.image_index)
            return index
        finally:
            lock.release()

    @classmethod
    def _load_current(cls, folder, model_id, caption_prior, mmap, tries: int = 3) -> IndexFolder:
        manifest = Manifest.read(folder)
        try:
            images, captions = _load_parts(folder, manifest, model_id, mmap)
        except DataError:
            # A writer may have committed, and swept the parts just read, meanwhile.
            if tries == 1 or Manifest.read(folder).version == manifest.version:
                raise
            return cls._load_current(folder, model_id, caption_prior, mmap, tries - 1)
        return cls(folder, manifest, images, captions, caption_prior)

    @property
    def features(self) -> FeatureStore | None:
        """The feature store the folder was built from, while it is still there."""
        path = self.manifest.features
        return FeatureStore(path) if path and Path(path).is_dir() else None

    def root_folder(self, name: str | None) -> Path:
        """The folder of a root (by default the collection's own)."""
        if name == UPLOADS:  # where it is, whichever layout recorded it
            return self.folder / UPLOADS
        path = self.manifest.roots.get(name or self.manifest.primary_root or "", ".")
        return self.folder / path if not Path(path).is_absolute() else Path(path)

    def file_of(self, item: dict) -> Path:
        """The file of an indexed image (an absolute `path`, as older folders hold, as it is)."""
        return self.root_folder(item.get("root")) / item.get("path", item["id"])

    def places(self) -> dict[str, str]:
        """The folders this index reads, as text, each with the name to show in its stead to
        those who should not learn the layout of this disk; longest first, so that a folder
        inside another is named before the outer one."""
        named = {str(self.root_folder(name).resolve()): name for name in self.manifest.roots}
        named[str(self.folder.resolve())] = "<index>"
        if self.manifest.features:
            named[str(Path(self.manifest.features).resolve())] = "<features>"
        return dict(sorted(named.items(), key=lambda kv: -len(kv[0])))

    def root_for(self, image_dir: Path) -> str:
        """The root of images from `image_dir`: the one recorded for it, else a new name (the
        folder's, made unique)."""
        where = image_dir.resolve()
        for name in self.manifest.roots:
            if name != UPLOADS and self.root_folder(name).resolve() == where:
                return name
        base, n = root_name(where), 1
        name = base
        while name in self.manifest.roots or name == UPLOADS:
            n += 1
            name = f"{base}-{n}"
        return name

    def indexed(self, item: dict) -> bool:
        """Whether this image is indexed already under the item's id.

        Raises:
            DataError: the id is taken by another image.
        """
        row = self.image_index.row(item["id"])
        if row is None:
            return False
        held = self.image_index.items[row]
        if self.file_of(held).resolve() != self.file_of(item).resolve():
            raise DataError(
                f"image id {item['id']!r} already names {held.get('path')!r} in this index"
            )
        return True

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the folder for a change: other threads and processes wait their turn, and the
        indexes are brought up to what others committed before this one starts."""
        with self._thread_lock, self._file_lock:
            self._catch_up()
            yield

    def append(self, rows: Rows) -> list[bool]:
        """Add image rows (and caption rows) in one commit, then put them live; returns for
        each item whether it was added (False: the same image was indexed already).

        The live indexes are copied, grown, committed and then swapped in, so a search running
        meanwhile sees the old index or the new one, and a failed commit changes nothing in
        memory. The copy makes an add cost O(index size): cheap at 10K-100K images, a
        rebuild's worth at 1M.

        Raises:
            DataError: an id repeats among the items, or names another image in the index.
        """
        ids = [it["id"] for it in rows.items]
        if len(set(ids)) != len(ids):
            raise DataError(f"image ids repeated among those added: {ids[:3]}")
        with self.writing():
            new = [not self.indexed(it) for it in rows.items]
            if not any(new):
                return new
            images = self.image_index.copy()
            images.add(
                rows.vectors[np.array(new)],
                [it for it, n in zip(rows.items, new, strict=True) if n],
            )
            indexes = {"images": images}
            if rows.captions is not None and (grown := self._grown_captions(*rows.captions)):
                indexes["captions"] = grown
            roots = dict(self.manifest.roots)
            if rows.root is not None:
                roots.setdefault(*rows.root)
            uploads = {k: v for k, v in rows.uploads.items() if images.row(k) is not None}
            grown = replace(self.manifest, roots=roots)
            try:
                self.manifest = _commit(self.folder, self.manifest, grown, indexes, uploads)
            except BaseException:
                _sweep(self.folder, self.manifest, self.image_index)  # what it wrote, now
                raise
            self.image_index = images
            self.caption_index = indexes.get("captions", self.caption_index)
        return new

    def _grown_captions(self, text: np.ndarray, items: list[dict]) -> VectorIndex | None:
        """The caption index with the rows not in it yet (made, the first time, like the image
        index); None when all are there. Captions whose image is already indexed are in it,
        unless a folder of the older layout lost them to a crash; then they come back."""
        index = self.caption_index
        keep = [index is None or index.row(it["id"]) is None for it in items]
        if not any(keep):
            return None
        text, items = text[np.array(keep)], [it for it, k in zip(items, keep, strict=True) if k]
        if index is None:
            made_like = self.image_index.model_id, self.image_index.cfg
            return VectorIndex.build(text, items, *made_like, self.caption_prior)
        grown = index.copy()
        grown.add(text, items)
        return grown

    def _catch_up(self) -> None:
        """Load the folder's indexes again if another process committed since we did."""
        on_disk = Manifest.read(self.folder)
        if (on_disk.version, on_disk.parts) == (self.manifest.version, self.manifest.parts):
            return
        model_id = self.image_index.model_id
        images, captions = _load_parts(self.folder, on_disk, model_id, mmap=False)
        self.manifest, self.image_index, self.caption_index = on_disk, images, captions

    @classmethod
    def create(cls, folder: Path, manifest: Manifest, indexes: dict[str, VectorIndex]) -> None:
        """Write a new index folder, or replace every part of the index folder at `folder`, in
        one commit.

        Raises:
            DataError: `folder` holds files but no index, or holds uploaded images a rebuild
                would drop.
        """
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{folder} is a file, not an index folder")
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(folder / LOCK):
            current = _replaceable(folder)
            if current is not None:
                manifest = replace(manifest, version=current.version, upgraded=_old(current))
            _commit(folder, current or manifest, manifest, indexes, {})


def _old(manifest: Manifest) -> bool:
    return manifest.legacy or manifest.upgraded


def _replaceable(folder: Path) -> Manifest | None:
    """The record of the index folder a build will replace; None for a new folder (emptied of
    what an interrupted build left)."""
    if not (folder / RECORD).exists():
        if any(p.name != LOCK and not _is_leftover(p.name) for p in folder.iterdir()):
            raise DataError(f"{folder} is not empty and not an index folder: choose another")
        _sweep(folder, Manifest("", ""))
        return None
    current = Manifest.read(folder)
    _recover_legacy(folder, current)
    items = read_json(folder / current.parts["images"] / "items.json", "index items")
    uploaded = sum(it.get("root") == UPLOADS or _legacy_upload(it) is not None for it in items)
    if uploaded:
        raise DataError(
            f"{folder} holds {uploaded} uploaded image(s) a rebuild would drop: add to it with "
            "--add, or build into a new folder"
        )
    return current


def _is_leftover(name: str) -> bool:
    """A name only a writer of index folders makes: a version folder, a temporary record."""
    return bool(VERSION.fullmatch(name)) or (
        name.startswith(f".{RECORD}.") and name.endswith(".tmp")
    )


def _load_parts(
    folder: Path, manifest: Manifest, model_id: str | None, mmap: bool
) -> tuple[VectorIndex, VectorIndex | None]:
    images = VectorIndex.load(folder / manifest.parts["images"], model_id, mmap)
    if manifest.legacy:
        for it in images.items:
            if (name := _legacy_upload(it)) is not None:
                it.update(root=UPLOADS, path=name)
    captions = None
    if "captions" in manifest.parts:
        captions = VectorIndex.load(folder / manifest.parts["captions"], model_id, mmap)
    return images, captions


def _commit(
    folder: Path,
    current: Manifest,
    new: Manifest,
    indexes: dict[str, VectorIndex],
    uploads: dict[str, bytes],
) -> Manifest:
    """Write `indexes` (and upload files) as the version after `current`'s, then the record
    `new` naming them; returns that record. The caller holds the folder's lock."""
    _sweep(folder, current)  # what a crashed writer left, before its version number is reused
    version = current.version + 1
    staged = folder / f"v{version}"
    for name, data in uploads.items():
        if not (folder / UPLOADS / name).is_file():  # named by its hash: the same bytes
            with atomic_path(folder / UPLOADS / name) as tmp:
                tmp.write_bytes(data)
    for name, index in indexes.items():
        (staged / name).mkdir(parents=True)
        index.write(staged / name)
    sync_tree(staged)
    fsync_dir(folder)
    parts = {**new.parts, **{name: f"v{version}/{name}" for name in indexes}}
    committed = replace(new, version=version, parts=parts, upgraded=_old(new))
    committed.write(folder)
    _sweep(folder, committed, indexes.get("images"))
    return committed


def _recover_legacy(folder: Path, manifest: Manifest) -> None:
    """Put back a part a writer of the layout before versions left only as `<part>.old`."""
    if manifest.legacy:
        for part in ("images", "captions"):
            recover_dir(folder / part)


def _legacy_upload(item: dict) -> str | None:
    """The file name of an upload as the older layout recorded it (an absolute path into the
    index folder's uploads/), else None."""
    path = item.get("path") or ""
    if "root" in item or not os.path.isabs(path) or Path(path).parent.name != UPLOADS:
        return None
    return Path(path).name if item["id"].startswith("upload-") else None


def _sweep(folder: Path, manifest: Manifest, images: VectorIndex | None = None) -> None:
    """Remove what the record `manifest` does not name: version folders, the older layout's
    folders, temporary files, and (given its image index, loaded) uploads no item holds. The
    caller holds the folder's lock."""
    named = {Path(p).parts[0] for p in manifest.parts.values()}
    for entry in folder.iterdir():
        ours = _is_leftover(entry.name) or (_old(manifest) and entry.name in LEGACY)
        if ours and entry.name not in named:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    uploads = folder / UPLOADS
    if images is not None and uploads.is_dir():
        held = {it["path"] for it in images.items if it.get("root") == UPLOADS}
        for f in uploads.iterdir():
            if f.name not in held:
                f.unlink()
        if not held:
            uploads.rmdir()  # made by an upload that never committed
