"""Caption readers and the image-caption records every stage works on.

One record per image: its key (the path relative to the images folder, also its key in a
feature store) and its captions, in any language. Karpathy-format files (Flickr8k, Flickr30k,
COCO, Flickr8k-CN) and plain image folders read into the same records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lightningdot.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageRecord:
    key: str  # path relative to the images folder
    captions: list[str] = field(default_factory=list)


@dataclass
class Corpus:
    """Images with their captions, plus the flat caption list evaluation and training index."""

    images: list[ImageRecord]

    @property
    def captions(self) -> list[str]:
        return [c for im in self.images for c in im.captions]

    @property
    def caption_image(self) -> list[int]:
        """For each caption of `captions`, the position of its image in `images`."""
        return [i for i, im in enumerate(self.images) for _ in im.captions]

    def keys(self) -> list[str]:
        return [im.key for im in self.images]


def read_karpathy(path: str | Path, split: str | None = None) -> Corpus:
    """Read a Karpathy-format annotation file, keeping one split (or all with None).

    COCO's files name a `filepath` folder per image (train2014/val2014): it becomes part of the key.

    Raises:
        DataError: the file is missing, not JSON, or an entry is malformed (the message names
            the entry and the field), or no image is left.
    """
    path = Path(path)
    data = _read_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataError(
            f"{path} is not in Karpathy format: expected an object with an 'images' list, "
            f"got {_shown(data if entries is None else entries)}"
        )
    images, splits = _karpathy_records(entries, split, path)
    if not images:
        if split is not None and splits:
            raise DataError(f"{path} has no split {split!r}; it has {', '.join(sorted(splits))}")
        raise DataError(f"{path} holds no images")
    return Corpus(images)


def _karpathy_records(
    entries: list, split: str | None, path: Path
) -> tuple[list[ImageRecord], set[str]]:
    """The records of `split` (all with None), and every split the entries name."""
    images: list[ImageRecord] = []
    splits: set[str] = set()
    first: dict[str, int] = {}  # key -> the entry that named it
    # Every entry is checked, not only those of `split`: a broken file fails the same way
    # whichever split a command asks for.
    for n, entry in enumerate(entries):
        entry_split, record = _karpathy_entry(entry, f"{path}: image entry {n}")
        # A key is an image's id in stores and indexes: a second entry would index it twice.
        if first.setdefault(record.key, n) != n:
            raise DataError(
                f"{path}: image entry {n} ({record.key}) repeats entry {first[record.key]}"
            )
        splits.add(entry_split)
        if split is None or entry_split == split:
            images.append(record)
    return images, splits


def _read_json(path: Path) -> object:
    if path.is_dir():
        raise DataError(f"annotation file {path} is a folder, not a file")
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"annotation file {path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise DataError(f"cannot read annotation file {path}: {e.strerror or e}") from e
    if not text.strip():
        raise DataError(f"annotation file {path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"annotation file {path} is not valid JSON: {e}") from e


def _karpathy_entry(entry: object, where: str) -> tuple[str, ImageRecord]:
    """One entry of a Karpathy file's `images` -> (its split, its record); `where` names it."""
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object, got {_shown(entry)}")
    key = _image_key(entry, where)
    where = f"{where} ({key})"
    split = _field(entry, "split", str, "a string", where)
    sentences = _field(entry, "sentences", list, 'a list of {"raw": ...} objects', where)
    captions = [_caption(s, f"{where}, sentence {j}") for j, s in enumerate(sentences)]
    return split, ImageRecord(key, [c for c in captions if c])


def _image_key(entry: dict, where: str) -> str:
    name = _field(entry, "filename", str, "a string", where)
    folder = entry.get("filepath")
    if folder is not None and not isinstance(folder, str):
        raise DataError(f"{where}: 'filepath' must be a string, got {_shown(folder)}")
    key = f"{folder}/{name}" if folder else name
    # The key is joined to the images folder and is the image's id in stores and indexes:
    # it must name a file inside that folder.
    pure = PurePosixPath(key)
    if not name or pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"{where}: image {key!r} is not a path inside the images folder")
    return key


def _caption(sentence: object, where: str) -> str:
    if not isinstance(sentence, dict):
        raise DataError(f'{where} must be an object with a "raw" caption, got {_shown(sentence)}')
    return _field(sentence, "raw", str, "a string", where).strip()


def _field(entry: dict, name: str, kind: type, what: str, where: str) -> Any:
    """`entry[name]`, which must be a `kind` (`what` says so in words)."""
    if name not in entry:
        raise DataError(f"{where} has no {name!r}")
    value = entry[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: {name!r} must be {what}, got {_shown(value)}")
    return value


def _shown(value: object, limit: int = 40) -> str:
    """A value as the JSON file wrote it, cut short."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_image_folder(root: str | Path) -> Corpus:
    """Every image file under `root` (recursively), sorted, without captions."""
    root = _image_dir(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return Corpus([ImageRecord(p.relative_to(root).as_posix()) for p in files])


def read_collection(
    image_dir: str | Path, annotations: str | Path | None, split: str | None
) -> Corpus:
    """The images (and captions) a command works on: those an annotation file names, or else
    every image file under `image_dir`."""
    if annotations is not None:
        _image_dir(image_dir)  # else every image it names would fail, one by one
        return read_karpathy(annotations, split)
    return read_image_folder(image_dir)


def _image_dir(root: str | Path) -> Path:
    root = Path(root)
    if root.is_file():
        raise DataError(f"{root} is a file; give the folder of the images")
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    return root
