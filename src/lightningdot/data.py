"""Caption readers and the image-caption records every stage works on.

One record per image: its key (the path relative to the images folder, also its key in a
feature store) and its captions, in any language. Karpathy-format files (Flickr8k, Flickr30k,
COCO, Flickr8k-CN) and plain image folders read into the same records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not in Karpathy format (expected an 'images' list)")
    images: list[ImageRecord] = []
    splits: set[str] = set()
    for n, entry in enumerate(data["images"]):
        try:
            splits.add(entry["split"])
            if split is not None and entry["split"] != split:
                continue
            key = entry["filename"]
            if entry.get("filepath"):
                key = f"{entry['filepath']}/{key}"
            captions = [s["raw"].strip() for s in entry["sentences"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: image entry {n} is malformed (missing {e})") from e
        images.append(ImageRecord(key, [c for c in captions if c]))
    if not images:
        if split is not None and splits:
            raise DataError(f"{path} has no split {split!r}; it has {', '.join(sorted(splits))}")
        raise DataError(f"{path} holds no images")
    return Corpus(images)


def read_image_folder(root: str | Path) -> Corpus:
    """Every image file under `root` (recursively), sorted, without captions."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
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
        return read_karpathy(annotations, split)
    return read_image_folder(image_dir)
