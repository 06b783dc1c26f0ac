"""How an index folder changes on disk: one commit at a time, and the sweep of what a killed
writer left (see `lightningdot.index.folder` for the layout). Every function here runs with
the folder's lock held by its caller.

A commit writes the changed parts into a new version folder `vN/` and flushes it, then replaces
the record; only that rename makes the change visible. What a sweep removes must be provably
the project's own: a version folder holding nothing but index parts, a temporary record, an
upload no item holds. Anything else in the folder is left alone.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import replace
from pathlib import Path

from lightningdot.errors import DataError
from lightningdot.index.backend import Items
from lightningdot.index.record import LEGACY_PARTS, PARTS, RECORD, UPLOADS, Manifest, legacy_upload
from lightningdot.index.states import RegionStates, is_states_file
from lightningdot.index.vector import VectorIndex
from lightningdot.io import atomic_path, fsync_dir, read_json, recover_dir, sync_tree

LOCK = ".lock"
PENDING = ".pending"  # a Milvus folder's writer at work (`lightningdot.index.milvus`)
VERSION = re.compile(r"v\d+")
# A sync's staging folder (`lightningdot.index.sync`): its encodings in chunks named by a hash,
# and the temporary files of chunks being written. Kept by sweeps (a rerun reads it).
STAGING = ".sync"
STAGED = re.compile(r"[0-9a-f]{32}\.npz|\.[0-9a-f]{32}\.npz\.[^/]+\.tmp")
PART_FILES = {
    "index.faiss",
    "items.json",
    "index.json",
    "bank.npy",
    "deleted.npy",
}  # `VectorIndex.write`'s
PRIOR_FILES = {"images.npy", "captions.npy"}  # a Milvus folder's query banks
# Names the layout before versions used, and that its writers left after a crash.
LEGACY = {f"{part}{end}" for part in LEGACY_PARTS for end in ("", ".old", ".tmp")}


def commit(
    folder: Path,
    current: Manifest,
    new: Manifest,
    indexes: dict[str, VectorIndex | RegionStates],
    uploads: dict[str, bytes],
) -> Manifest:
    """Write `indexes` (and upload files) as the version after `current`'s, then the record
    `new` naming them; returns that record.

    An error before the record is replaced leaves the folder as it was (and its leftovers for
    the next sweep); nothing after that point can undo the commit: the sweep that follows is
    best effort.
    """
    sweep_versions(folder, current)  # a killed writer's, before its version number is reused
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
    committed = replace(new, version=version, parts=parts, upgraded=new.old, legacy=False)
    committed.write(folder)
    with contextlib.suppress(OSError):  # what is left, the next writer or opener sweeps
        sweep_versions(folder, committed)
        if "images" in indexes:
            sweep_uploads(folder, committed, indexes["images"])
    return committed


def sweep_versions(folder: Path, manifest: Manifest) -> None:
    """Remove the version folders and temporary records `manifest` does not name (and, in a
    folder that is or was of the older layout, that layout's folders). A sync's staging is
    not swept: its rerun reads it, and removes it once committed (`remove_staging`)."""
    named = {Path(p).parts[0] for p in manifest.parts.values()}
    for entry in folder.iterdir():
        if entry.name in named or entry.is_symlink():
            continue
        if is_temporary_record(entry.name):
            entry.unlink()
        elif is_version(entry) or (manifest.old and entry.name in LEGACY and entry.is_dir()):
            shutil.rmtree(entry)


def sweep_uploads(folder: Path, manifest: Manifest, images: Items) -> None:
    """Remove the files under uploads/ that no item of `images` (the image index `manifest`
    names, loaded) holds: uploads whose commit never came, or that were deleted. Not in a folder of the older layout,
    whose uploads an older writer may be adding."""
    uploads = folder / UPLOADS
    if manifest.legacy or not uploads.is_dir():
        return
    held = images.uploads()  # a deleted upload goes too
    for f in uploads.iterdir():
        if f.name not in held and (f.is_file() or f.is_symlink()):
            f.unlink()
    if not held and not uploads.is_symlink() and not any(uploads.iterdir()):
        uploads.rmdir()  # made by an upload that never committed


def is_temporary_record(name: str) -> bool:
    return name.startswith(f".{RECORD}.") and name.endswith(".tmp")


def is_version(entry: Path) -> bool:
    """A version folder a writer of index folders made: `vN/` holding index parts and nothing
    else (a user's own `v1/` of photos is not one)."""
    if not VERSION.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
        return False
    for part in entry.iterdir():
        if part.name not in PARTS or part.is_symlink() or not part.is_dir():
            return False
        own = {"states": is_states_file, "priors": PRIOR_FILES.__contains__}.get(
            part.name, PART_FILES.__contains__
        )
        if any(not own(f.name) or not f.is_file() for f in part.iterdir()):
            return False
    return True


def is_staging(entry: Path) -> bool:
    """A sync's staging folder, holding nothing but what a sync writes there."""
    if entry.name != STAGING or entry.is_symlink() or not entry.is_dir():
        return False
    return all(STAGED.fullmatch(f.name) and f.is_file() for f in entry.iterdir())


def remove_staging(folder: Path) -> None:
    """Remove the files a sync staged in `folder`, and the staging folder once empty (a file
    of anyone else's stays, and so does the folder then)."""
    staging = folder / STAGING
    if staging.is_symlink() or not staging.is_dir():
        return
    for f in staging.iterdir():
        if STAGED.fullmatch(f.name) and f.is_file():
            f.unlink()
    if not any(staging.iterdir()):
        staging.rmdir()


def recover_legacy(folder: Path, manifest: Manifest) -> None:
    """Put back a part a writer of the layout before versions left only as `<part>.old`."""
    if manifest.legacy:
        for part in LEGACY_PARTS:
            recover_dir(folder / part)


def check_buildable(folder: Path) -> None:
    """Refuse to build into a file, or into a folder that holds anything but an index folder
    or what an interrupted build left.

    Raises:
        DataError: naming the folder.
    """
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file, not an index folder")
    if not folder.is_dir() or (folder / RECORD).exists():
        return
    for entry in folder.iterdir():
        ours = entry.name in (LOCK, PENDING) or is_temporary_record(entry.name)
        if not (ours or is_staging(entry) or is_version(entry)):
            raise DataError(f"{folder} is not empty and not an index folder: choose another")


def replaceable(folder: Path) -> Manifest | None:
    """The record of the index folder a build will replace; None for a new folder (emptied of
    what an interrupted build left).

    Raises:
        DataError: see `check_buildable`; or the index folder holds uploads a rebuild would
            drop.
    """
    check_buildable(folder)
    if not (folder / RECORD).exists():
        sweep_versions(folder, Manifest("", ""))
        remove_staging(folder)
        return None
    current = Manifest.read(folder)
    recover_legacy(folder, current)
    if current.backend is not None:  # its uploads: the files no sweep has found unheld
        uploads = folder / UPLOADS
        uploaded = sum(1 for _ in uploads.iterdir()) if uploads.is_dir() else 0
    else:
        items = read_json(folder / current.parts["images"] / "items.json", "index items")
        uploaded = sum(it.get("root") == UPLOADS or bool(legacy_upload(it, folder)) for it in items)
    if uploaded:
        raise DataError(
            f"{folder} holds {uploaded} uploaded image(s) a rebuild would drop: add to it with "
            "--add, or build into a new folder"
        )
    return current
