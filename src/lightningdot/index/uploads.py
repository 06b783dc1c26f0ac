"""Images uploaded to a running server (`POST /images`): decoded, stored under the index folder
and indexed, all or none, in one commit.

Each image is stored as `<index>/uploads/<id>`, its id a hash of its bytes plus the extension
of the format it decodes as (never the client's, so an upload cannot become an .html page).
The files are written under the folder's lock just before the commit that indexes them; a
crash in between leaves files no item names, which the next writer or opener sweeps.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from lightningdot.encode import StateRows
from lightningdot.errors import DataError
from lightningdot.features import load_image
from lightningdot.index.folder import UPLOADS, IndexFolder, Rows
from lightningdot.index.metadata import upload_metadata

# File extensions of the formats an upload is stored under, by Pillow's name for the format.
UPLOAD_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}


def upload_id(data: bytes, image_format: str | None) -> str:
    """The id (and stored file name) of an uploaded image: a hash of its bytes, plus the
    extension of its decoded format (".img" for a format without one here)."""
    suffix = UPLOAD_SUFFIX.get(image_format or "", ".img")
    return f"upload-{hashlib.sha256(data).hexdigest()[:20]}{suffix}"


def decode_uploads(uploads: list[tuple[str, bytes]]) -> tuple[list[Image.Image], list[str]]:
    """`(filename, bytes)` each -> the decoded images and their ids.

    Raises:
        DataError: an upload does not decode as an image (named in the message).
    """
    decoded, ids = [], []
    for name, data in uploads:
        try:
            decoded.append(load_image(data, name=name))
            with Image.open(io.BytesIO(data)) as im:
                ids.append(upload_id(data, im.format))
        except OSError as e:
            raise DataError(f"{name}: not an image file this server can decode ({e})") from e
    return decoded, ids


def add_uploads(
    index: IndexFolder,
    uploads: list[tuple[str, bytes]],
    encode: Callable[[list[Image.Image]], tuple[np.ndarray, StateRows | None]],
) -> list[tuple[str, bool]]:
    """Store and index uploaded image files, all or none: `(filename, bytes)` -> `(id, added)`
    each; `encode`: images -> their vectors (and states, for a folder that keeps them). An
    image already indexed (or repeated in the request) is not added twice (`added` False).
    Nothing is written before every upload has decoded."""
    decoded, ids = decode_uploads(uploads)
    first: dict[str, int] = {}  # id -> position of its first upload, in upload order
    for n, key in enumerate(ids):
        first.setdefault(key, n)
    added: set[str] = set()
    # Those not indexed when the request came are encoded, without holding the folder; the
    # commit decides again, on what is committed then.
    fresh = {key: n for key, n in first.items() if index.image_index.get(key) is None}
    if fresh:
        items = [
            {
                "id": key,
                "root": UPLOADS,
                "path": key,
                "filename": uploads[n][0],
                "meta": upload_metadata(uploads[n][1]),
            }
            for key, n in fresh.items()
        ]
        vectors, states = encode([decoded[n] for n in fresh.values()])
        files = {key: uploads[n][1] for key, n in fresh.items()}
        rows = Rows(vectors, items, root=(UPLOADS, UPLOADS), uploads=files, states=states)
        new = index.append(rows)
        added = {key for key, is_new in zip(fresh, new, strict=True) if is_new}
    return [(key, key in added and first[key] == n) for n, key in enumerate(ids)]
