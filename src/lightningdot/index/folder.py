"""An index folder: a collection's image index, its caption index, and what made them, changed
one atomic commit at a time.

    retriever.json  the record, the one file a change replaces: {"format": 2, "model",
                    "model_id", "version": N, "parts": {"images": "v3/images", "captions":
                    "v2/captions"}, "roots": {name: folder}, "features"?: where re-ranking
                    reads regions; a Milvus folder's also "backend" and "kinds":
                    `lightningdot.index.milvus`}
    vN/images/      `VectorIndex` of the images; items {"id", "root", "path", "captions"?}
    vN/captions/    `VectorIndex` of their captions; items {"id": "<image id>#<n>", "image",
                    "caption"}
    vN/states/      what re-ranking reads of each image, row for row with the image index
                    (`lightningdot.index.states`; absent when built with --no-states)
    uploads/        images added through `ldot serve`, named by a hash of their bytes
    .sync/          what a sync in progress encoded, for its rerun after an interruption
                    (`lightningdot.index.sync`); removed once the sync commits
    .lock           writers take turns on it

A change writes the parts it changes into a new version folder, flushes them to disk, and then
replaces `retriever.json` (the way SQLite's WAL or Delta Lake commit): before that rename the
folder is as it was, after it as the change made it (`lightningdot.index.storage`; the record
itself is `lightningdot.index.record`). Parts are never written again once committed, so a
reader keeps a consistent view while a writer works. What a killed writer left (a version
folder the record does not name, an upload no item names, a temporary file) is swept by the
next writer, and by any opener that finds the lock free.

An item's `path` is relative to its root: the folder it was indexed from (recorded absolute), or
`uploads` (relative to the index folder, so a moved index folder keeps its uploads). Folders of
the layout before versions (`images/` and `captions/` beside a record without a format) open as
version 0; their first change moves them to this one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from lightningdot.encode import StateRows
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore
from lightningdot.index.backend import Hit
from lightningdot.index.filters import Filter
from lightningdot.index.metadata import check_fields
from lightningdot.index.record import UPLOADS, Manifest, legacy_upload
from lightningdot.index.states import RegionStates
from lightningdot.index.storage import (
    LOCK,
    check_buildable,
    commit,
    recover_legacy,
    replaceable,
    sweep_uploads,
    sweep_versions,
)
from lightningdot.index.vector import IndexPrior, VectorIndex, priors_of
from lightningdot.model.checkpoint import index_identity
from lightningdot.model.encoders import BiEncoder

OLDER_LOCK = ".add.lock"  # the lock file of the releases before versions

# Caption rows to add beside image rows: (vectors (C, D), their items).
CaptionRows = tuple[np.ndarray, list[dict]]


def root_name(folder: Path) -> str:
    """The name a root of images from `folder` goes by: the folder's own, unless reserved."""
    return folder.name if folder.name not in ("", UPLOADS) else "images"


@dataclass(frozen=True)
class Live:
    """The parts searches read, put live together (one attribute, replaced whole): a search
    that takes them once reads one version, whatever a change puts live meanwhile. The FAISS
    `View` (`lightningdot.index.backend`)."""

    images: VectorIndex
    captions: VectorIndex | None = None
    states: RegionStates | None = None  # what re-ranking reads, when the folder keeps it

    def search(
        self,
        target: str,
        queries: np.ndarray,
        k: int,
        where: Filter | None = None,
        with_prior: bool = True,
    ) -> list[list[Hit]]:
        index = self.images if target == "images" else self.captions
        allowed = None if where is None else where.mask(self.images.columns)
        if allowed is not None and target == "captions":
            image_rows = self._caption_image_rows
            allowed = (image_rows >= 0) & allowed[np.maximum(image_rows, 0)]
        return index.hits(*index.search(queries, k, with_prior, allowed))

    @functools.cached_property
    def _caption_image_rows(self) -> np.ndarray:
        """(captions,) the image index's row of each caption's image, -1 where it has none."""
        rows = (self.images.row(it.get("image", "")) for it in self.captions.items)
        return np.array([-1 if r is None else r for r in rows], dtype=np.int64)

    def states_of(self, image_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.states is None:
            return None
        return self.states.gather([self.images.row(i) for i in image_ids])


@dataclass
class Rows:
    """Rows to add to an index folder in one commit."""

    vectors: np.ndarray  # (N, D) of the images
    items: list[dict]  # {"id", "root", "path", ...} each
    captions: CaptionRows | None = None
    root: tuple[str, str] | None = None  # (name, folder) of the items' root, recorded with them
    uploads: dict[str, bytes] = field(default_factory=dict)  # files to store under uploads/
    states: StateRows | None = None  # of the images, for a folder that keeps them


class IndexFolder:
    """An index folder opened for search and for changes (see the module docstring)."""

    def __init__(
        self, folder: Path, manifest: Manifest, live: Live, caption_prior: IndexPrior | None = None
    ) -> None:
        self.folder, self.manifest = folder, manifest
        self._live = live
        self.caption_prior = caption_prior  # of a caption index the first captioned add makes
        # Changes in this process take turns on the first (re-entrant: a caller may hold it
        # around a check and a change), and with other processes on the lock file as well.
        self._thread_lock = threading.RLock()
        self._file_lock = FileLock(folder / LOCK)
        self._files: tuple[VectorIndex, set[str]] | None = None  # see `_held_files`

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
        first tidying what a killed writer left, if no writer is at work now."""
        folder = Path(folder)
        Manifest.read(folder)  # a clear error for a folder that is not an index folder
        lock = FileLock(folder / LOCK)
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):  # a writer at work (it tidies), or a read-only folder
            return cls._load_current(folder, model_id, caption_prior, mmap)
        try:
            recover_legacy(folder, Manifest.read(folder))
            index = cls._load_current(folder, model_id, caption_prior, mmap)
            index._tidy()
            return index
        finally:
            lock.release()

    def _tidy(self) -> None:
        """Remove what a killed writer left (with the folder's lock held)."""
        with contextlib.suppress(OSError):  # tidying is not what the caller came for
            sweep_versions(self.folder, self.manifest)
            sweep_uploads(self.folder, self.manifest, self.image_index)

    @classmethod
    def _load_current(cls, folder, model_id, caption_prior, mmap, tries: int = 3) -> IndexFolder:
        manifest = Manifest.read(folder)
        try:
            parts = load_parts(folder, manifest, model_id, mmap)
        except DataError:
            # A writer may have committed, and swept the parts just read, meanwhile.
            if tries == 1 or Manifest.read(folder).version == manifest.version:
                raise
            return cls._load_current(folder, model_id, caption_prior, mmap, tries - 1)
        return cls(folder, manifest, Live(*parts), caption_prior)

    @property
    def live(self) -> Live:
        """The view searches read now (`lightningdot.index.backend.View`)."""
        return self._live

    @property
    def image_index(self) -> VectorIndex:
        return self.live.images

    @property
    def caption_index(self) -> VectorIndex | None:
        return self.live.captions

    @property
    def states(self) -> RegionStates | None:
        return self.live.states

    @property
    def features(self) -> FeatureStore | None:
        """The feature store the folder was built from, while it is still there."""
        path = self.manifest.features
        return FeatureStore(path) if path and Path(path).is_dir() else None

    def root_folder(self, name: str | None) -> Path:
        """The folder of a root (by default the collection's own).

        Raises:
            DataError: the folder records no root of that name.
        """
        if name == UPLOADS:  # where it is, whichever layout recorded it
            return self.folder / UPLOADS
        name = name or self.manifest.primary_root
        if name not in self.manifest.roots:
            raise DataError(f"{self.folder} records no image folder {name!r}")
        path = Path(self.manifest.roots[name])
        return path if path.is_absolute() else self.folder / path

    def file_of(self, item: dict, root: Path | None = None) -> Path:
        """The file of an indexed image (an absolute `path`, as older folders hold, as it is);
        `root`: the folder of its root, for one not recorded yet.

        Raises:
            DataError: its root is unknown, or its path leads out of its root.
        """
        path = item.get("path", item["id"])
        if os.path.isabs(path) and "root" not in item:
            return Path(path)
        if ".." in Path(path).parts or os.path.isabs(path):
            raise DataError(f"image {item['id']!r} leads out of its folder")
        return (root or self.root_folder(item.get("root"))) / path

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
        folder's, made unique, and no prefix of an id already held)."""
        where = image_dir.resolve()
        for name in self.manifest.roots:
            if name != UPLOADS and self.root_folder(name).resolve() == where:
                return name
        base, n = root_name(where), 1
        name = base
        while name in self.manifest.roots or name == UPLOADS or self._prefixes(name):
            n += 1
            name = f"{base}-{n}"
        return name

    def _prefixes(self, name: str) -> bool:
        return any(str(it["id"]).startswith(f"{name}/") for it in self.image_index.iterate())

    def indexed(self, item: dict, root: Path | None = None) -> bool:
        """Whether this image is indexed already: under the item's id, or its file under
        another id (as when a collection's parent folder is added); `root` as for `file_of`.

        Raises:
            DataError: the id is taken by another image.
        """
        file = os.path.normpath(self.file_of(item, root).resolve())
        held = self.image_index.get(item["id"])
        if held is None:
            return file in self._held_files()
        if os.path.normpath(self.file_of(held).resolve()) != file:
            raise DataError(
                f"image id {item['id']!r} is taken by another image in this index "
                f"({held.get('path')!r} of {held.get('root') or 'the collection'!r})"
            )
        return True

    def _held_files(self) -> set[str]:
        """The files of the indexed images, resolved (once per image index)."""
        if self._files is None or self._files[0] is not self.image_index:
            roots = {}
            held = set()
            for it in self.image_index.iterate():
                if "path" not in it:
                    continue
                key = it.get("root")
                if key not in roots:
                    roots[key] = self.root_folder(key).resolve()
                held.add(os.path.normpath(roots[key] / it["path"]))
            self._files = (self.image_index, held)
        return self._files[1]

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the folder for a change: other threads and processes wait their turn, and the
        indexes are brought up to what others committed before this one starts. A folder of
        the older layout is also held on that layout's lock, against its writers."""
        with self._thread_lock, self._file_lock, contextlib.ExitStack() as older:
            if self.manifest.legacy:
                older.enter_context(FileLock(self.folder / OLDER_LOCK))
            self._catch_up()
            yield

    def append(self, rows: Rows, replace: bool = False) -> list[bool]:
        """Add image rows (and caption rows) in one commit, then put them live; returns for
        each item whether it was added (False: the same image was indexed already). With
        `replace` (an upsert), an item whose id is indexed replaces it, captions and all, in
        the same commit, and every item is added.

        The live indexes are copied, grown, committed and then swapped in, so a search running
        meanwhile sees the old index or the new one, and a failed commit changes nothing in
        memory. The copy makes an add cost O(index size): cheap at 10K-100K images, a
        rebuild's worth at 1M.

        Raises:
            DataError: an id repeats among the items or names another image in the index, or
                the rows' root name went meanwhile to another folder.
        """
        ids = [it["id"] for it in rows.items]
        if len(set(ids)) != len(ids):
            raise DataError(f"image ids repeated among those added: {ids[:3]}")
        with self.writing():
            named = rows.root is not None and rows.root[0] != UPLOADS
            root = Path(rows.root[1]) if named else None  # uploads/: `root_folder` knows it
            if replace:
                new = [True] * len(rows.items)
                gone = [i for i in ids if self.image_index.get(i) is not None]
            else:
                new, gone = [not self.indexed(it, root) for it in rows.items], []
            if any(new):
                self._commit_rows(rows, new, gone)
        return new

    def change(self, rows: Rows, gone: list[str]) -> None:
        """Delete the images `gone` (and their captions) and add `rows` (an id of `gone` may
        come back among them) in one commit: a sync's changes, all or none. Nothing to add
        and nothing to delete: no commit.

        Raises:
            DataError: an id repeats, an id of `gone` is not in the index, or an added id is
                held by an image not `gone`.
        """
        ids = [it["id"] for it in rows.items]
        if len(set(ids)) != len(ids) or len(set(gone)) != len(gone):
            raise DataError(f"image ids repeated among those changed: {(ids + gone)[:3]}")
        if not ids:
            self.delete(gone)
            return
        with self.writing():
            if missing := [i for i in gone if self.image_index.get(i) is None]:
                raise DataError(f"{len(missing)} id(s) not in the index, e.g. {missing[:3]}")
            self._commit_rows(rows, [True] * len(ids), gone)

    def _commit_rows(self, rows: Rows, new: list[bool], gone: list[str]) -> None:
        """Commit the `new` rows, the images `gone` (and their captions) deleted first."""
        base = self.image_index.without(gone) if gone else self.image_index
        captions = self.caption_index
        if gone and (their := self._caption_ids(gone)):
            captions = captions.without(their)
        images = base.copy()
        images.add(
            rows.vectors[np.array(new)], [it for it, n in zip(rows.items, new, strict=True) if n]
        )
        indexes = {"images": images}
        if captions is not self.caption_index:
            indexes["captions"] = captions
        if rows.captions is not None and (grown := self._grown_captions(captions, *rows.captions)):
            indexes["captions"] = grown
        roots = self._roots_with(rows)
        if self.states is not None:
            indexes["states"] = self._grown_states(rows, new)
        uploads = {k: v for k, v in rows.uploads.items() if images.row(k) is not None}
        self._commit(replace(self.manifest, roots=roots), indexes, uploads)

    def _roots_with(self, rows: Rows) -> dict[str, str]:
        """The recorded roots with the rows' root (refused if its name went meanwhile to
        another folder)."""
        roots = dict(self.manifest.roots)
        if rows.root is not None:
            name, where = rows.root
            if roots.setdefault(name, where) != where:
                raise DataError(f"another add took the name {name!r} meanwhile: add again")
        return roots

    def delete(self, image_ids: list[str]) -> None:
        """Delete images, and their captions, in one commit (`VectorIndex.without`); an
        uploaded image's file goes with it. Searches running meanwhile see all or none of it.

        Raises:
            DataError: an id is not in the index (nothing is deleted).
        """
        if len(set(image_ids)) != len(image_ids):
            raise DataError(f"image ids repeated among those deleted: {image_ids[:3]}")
        if not image_ids:
            return
        with self.writing():
            self._delete(image_ids)

    def _delete(self, image_ids: list[str]) -> None:
        indexes: dict = {"images": self.image_index.without(image_ids)}
        captions = self._caption_ids(image_ids)
        if captions:
            indexes["captions"] = self.caption_index.without(captions)
        self._commit(self.manifest, indexes, {})

    def compact(self) -> int:
        """Drop the rows of deleted images and captions (their tombstones), and those images'
        region states, in one commit; returns the rows dropped (none: no commit). Searches stop
        stepping over them and the files shrink. It costs a copy of the kept vectors, and an
        HNSW index builds its graph again; searches running meanwhile see the old version."""
        with self.writing():
            images, captions = self.image_index, self.caption_index
            indexes = {"images": images.compacted()}
            if captions is not None and captions.deleted is not None:
                indexes["captions"] = captions.compacted()
            if self.states is not None and images.deleted is not None:
                indexes["states"] = self.states.kept(~images.deleted)
            dropped = sum(
                len(index) - index.count for index in (images, captions) if index is not None
            )
            if dropped:
                self._commit(self.manifest, indexes, {})
        return dropped

    def update_fields(self, image_id: str, fields: dict) -> dict:
        """Update an image's fields in one commit (`VectorIndex.with_fields`); returns its
        fields as committed.

        Raises:
            DataError: the id is not in the index, or a field cannot be set (`check_fields`).
        """
        check_fields(fields)
        if not fields:  # nothing to change: nothing to commit
            item = self.image_index.get(image_id)
            if item is None:
                raise DataError(f"no image {image_id!r} in the index")
            return item.get("meta", {})
        with self.writing():
            self._update(image_id, fields)
        return self.image_index.get(image_id).get("meta", {})

    def _update(self, image_id: str, fields: dict) -> None:
        images = self.image_index.with_fields(image_id, fields)
        self._commit(self.manifest, {"images": images}, {})

    def _caption_ids(self, image_ids: list[str]) -> list[str]:
        """The ids of these images' captions in the caption index."""
        index = self.caption_index
        if index is None:
            return []
        out = []
        for image_id in image_ids:
            item = self.image_index.get(image_id)
            out += [f"{image_id}#{j}" for j in range(len(item.get("captions") or []))]
        return [c for c in out if index.get(c) is not None]

    def _commit(self, manifest: Manifest, indexes: dict, uploads: dict[str, bytes]) -> None:
        """Commit the changed parts `indexes` under `manifest`, then put them live; a failed
        commit leaves the folder and what is live as they were."""
        try:
            self.manifest = commit(self.folder, self.manifest, manifest, indexes, uploads)
        except BaseException:
            if Manifest.read(self.folder).version == self.manifest.version:  # not committed
                with contextlib.suppress(OSError):
                    sweep_versions(self.folder, self.manifest)
                    sweep_uploads(self.folder, self.manifest, self.image_index)
                raise
            self._catch_up()  # the commit came before the error: take what it committed
            raise
        states = indexes.get("states", self.states)
        if "states" in indexes:  # where committed: the next add links those files
            states = states.committed(self.folder / self.manifest.parts["states"])
        for name in ("images", "captions"):  # and the next delete, these
            if name in indexes:
                part = self.folder / self.manifest.parts[name]
                indexes[name].source = indexes[name].items_source = part
        self._swap(indexes["images"], indexes.get("captions", self.caption_index), states)

    def _swap(self, images, captions, states) -> None:
        """Put committed parts live, in one step."""
        self._live = Live(images, captions, states)

    def _grown_states(self, rows: Rows, new: list[bool]) -> RegionStates:
        if rows.states is None:
            raise DataError(
                f"{self.folder} keeps region states (rebuilt with them while this add ran?): "
                "add again"
            )
        return self.states.grown(rows.states.select(np.array(new)))

    def _grown_captions(
        self, index: VectorIndex | None, text: np.ndarray, items: list[dict]
    ) -> VectorIndex | None:
        """The caption index `index` with the rows not in it yet (made, the first time, like
        the image index); None when all are there. Captions whose image is already indexed are
        in it, unless a folder of the older layout lost them to a crash; then they come back."""
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
        images, captions, states = load_parts(self.folder, on_disk, model_id, mmap=False)
        self.manifest = on_disk
        self._swap(images, captions, states)

    @classmethod
    def create(
        cls, folder: Path, manifest: Manifest, indexes: dict[str, VectorIndex | RegionStates]
    ) -> None:
        """Write a new index folder, or replace every part of the index folder at `folder`, in
        one commit.

        Raises:
            DataError: `folder` is a file, holds files but no index, or holds uploaded images
                a rebuild would drop.
        """
        check_buildable(folder)  # before a lock file is made in it
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(folder / LOCK):
            current = replaceable(folder)
            if current is not None:
                manifest = replace(manifest, version=current.version, upgraded=current.old)
            commit(folder, current or manifest, manifest, indexes, {})


def load_parts(
    folder: Path, manifest: Manifest, model_id: str | None, mmap: bool
) -> tuple[VectorIndex, VectorIndex | None, RegionStates | None]:
    """The image index, caption index and region states the record names (uploads recorded by
    the older layout given their root).

    Raises:
        DataError: a part is missing or damaged, or the states are not the images' own.
    """
    images = VectorIndex.load(folder / manifest.parts["images"], model_id, mmap)
    if manifest.legacy:
        images.items_source = None  # its items change here: the next write writes them
        for it in images.items:
            if (name := legacy_upload(it, folder)) is not None:
                it.update(root=UPLOADS, path=name)
    captions = None
    if "captions" in manifest.parts:
        captions = VectorIndex.load(folder / manifest.parts["captions"], model_id, mmap)
    states = None
    if "states" in manifest.parts:
        # Mapped whatever `mmap` says: states are never changed in place, only linked.
        states = RegionStates.load(folder / manifest.parts["states"])
        if len(states) != len(images):
            raise DataError(f"{folder}: {len(states)} images' states for {len(images)} images")
    return images, captions, states
