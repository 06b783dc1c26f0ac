"""Files the project writes: atomically (a reader sees the old file or the new one, never half
of either), and JSON read back with a clear error when it is missing or damaged."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lightningdot.errors import DataError


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it sets it: done once, before any thread
    os.umask(umask)
    return umask


UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it over `path` only on success.

    The rename is atomic on POSIX because source and target share a file system; an
    exception (or a kill) leaves the previous file untouched and removes the temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and some writers (safetensors) replace the file with another 0600
        # one: set the mode a file written in place would have, after writing.
        os.chmod(tmp_path, 0o666 & ~UMASK)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)  # the rename itself survives a power cut only once its folder is
    finally:
        tmp_path.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to the file `src` (a copy where the file system cannot link): for
    files that are never written again once committed."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (the names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str | os.PathLike[str]) -> None:
    """Flush every file and folder under `path` to disk: what a commit will point at must be
    on disk before the commit is."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: str | os.PathLike[str], records: list[Any]) -> None:
    """One JSON object per line, the whole file replaced at once."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def read_json(path: str | os.PathLike[str], what: str, missing: str | None = None) -> Any:
    """A JSON file the project wrote (a config, an index's metadata).

    Raises:
        DataError: the file is missing (`missing`, or "<what> not found") or is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(missing or f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"damaged {what} {path}: {e}") from e


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def recover_dir(path: str | os.PathLike[str]) -> None:
    """Put back the folder a crash inside `atomic_dir` left only as `path.old` (killed between
    moving the old folder aside and moving the new one in)."""
    final = Path(path)
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.is_dir():
        old.rename(final)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; it replaces `path` only when the block succeeds.

    The previous folder is kept (renamed) until the new one is in place, so a crash at any point
    leaves a complete folder under `path` or under `path.old`.
    """
    final = Path(path)
    recover_dir(final)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
