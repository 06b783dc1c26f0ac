"""Images uploaded to a running server (`POST /images`): decoded, stored under the index folder
and indexed, all or none.

Each image is stored under `<index>/uploads/`, named by a hash of its bytes plus the extension
of the format it decodes as (never the client's, so an upload cannot become an .html page),
which is also its id.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from lightningdot.errors import DataError
from lightningdot.features import load_image
from lightningdot.index.folder import IndexFolder
from lightningdot.io import atomic_path

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
            decoded.append(load_image(data))
            with Image.open(io.BytesIO(data)) as im:
                ids.append(upload_id(data, im.format))
        except (DataError, OSError) as e:
            raise DataError(f"{name}: not an image file this server can decode ({e})") from e
    return decoded, ids


def add_uploads(
    index: IndexFolder,
    uploads: list[tuple[str, bytes]],
    encode: Callable[[list[Image.Image]], np.ndarray],
) -> list[tuple[str, bool]]:
    """Store and index uploaded image files, all or none: `(filename, bytes)` -> `(id, added)`
    each. An image already indexed is not added twice (`added` False). Nothing is written
    before every upload has decoded, and the stored files go again if indexing fails."""
    decoded, ids = decode_uploads(uploads)
    folder = index.folder / "uploads"
    with index.add_lock:  # re-entered by `append`; makes the check and the add one step
        fresh = {}  # id -> position of its first upload, in upload order
        for n, key in enumerate(ids):
            if index.image_index.row(key) is None and key not in fresh:
                fresh[key] = n
        written = []
        try:
            for key, n in fresh.items():
                with atomic_path(folder / key) as tmp:
                    tmp.write_bytes(uploads[n][1])
                written.append(folder / key)
            items = [
                {"id": key, "path": str((folder / key).resolve()), "filename": uploads[n][0]}
                for key, n in fresh.items()
            ]
            if items:
                index.append(encode([decoded[n] for n in fresh.values()]), items)
        except BaseException:
            for f in written:
                f.unlink(missing_ok=True)
            raise
    return [(key, key in fresh and fresh[key] == n) for n, key in enumerate(ids)]
