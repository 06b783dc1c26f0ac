"""What is known of each indexed image besides its vector, and those facts as columns.

Each image item keeps, under "meta", what its file says when it is indexed: its size in bytes,
its modification time, its width and height, and from EXIF, when present, the time it was taken
and the camera. Dates are Unix seconds (EXIF times carry no zone: read as UTC). Its path within
its root and the folder of that path (ending in "/", "" at the top) are fields too, read from
the item itself. A hash of the file's bytes is kept beside "meta", as the item's "hash"
(`file_hash`): not a field, but what a sync (`lightningdot.index.sync`) tells content by. Any other field a user gives an image is kept beside those: a number field if
all its values are numbers, else a text field.

`MetadataColumns` turns the items of an index into one array per field, built when a filter
first reads the field (`lightningdot.index.filters`), so that a filter costs a few vectorised
comparisons per search, not a Python loop over the items.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lightningdot.errors import DataError

TEXT, NUMBER, DATE = "text", "number", "date"
BUILT_IN = {
    "path": TEXT,
    "folder": TEXT,
    "size": NUMBER,
    "mtime": DATE,
    "width": NUMBER,
    "height": NUMBER,
    "taken": DATE,
    "camera": TEXT,
}
EXIF_IFD, DATE_TAKEN, DATE_CHANGED, MAKE, MODEL = 0x8769, 36867, 306, 271, 272


def file_metadata(path: Path) -> dict[str, Any]:
    """The built-in fields of an image file (those it cannot give are left out)."""
    try:
        st = path.stat()
    except OSError:
        return {}
    return {"size": st.st_size, "mtime": round(st.st_mtime, 3), **_header_fields(path)}


def file_hash(path: Path) -> str | None:
    """A hash of the file's bytes (BLAKE2b, 128 bits, hex), kept as an item's "hash": what
    tells a sync that a file changed or moved; None when it cannot be read."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def upload_metadata(data: bytes) -> dict[str, Any]:
    """The built-in fields of an uploaded image's bytes (no mtime: a client sends no file
    time, and the same bytes uploaded twice are one item)."""
    return {"size": len(data), **_header_fields(io.BytesIO(data))}


def _header_fields(source: Path | io.BytesIO) -> dict[str, Any]:
    """Width, height and EXIF fields, from the image's header (its pixels are not decoded)."""
    with contextlib.suppress(OSError, UnidentifiedImageError, ValueError, SyntaxError):
        with Image.open(source) as im:
            return {"width": im.width, "height": im.height, **_exif_fields(im.getexif())}
    return {}


def _exif_fields(exif: Image.Exif) -> dict[str, Any]:
    out: dict[str, Any] = {}
    taken = exif.get_ifd(EXIF_IFD).get(DATE_TAKEN) or exif.get(DATE_CHANGED)
    if isinstance(taken, str):
        with contextlib.suppress(ValueError):
            out["taken"] = _exif_seconds(taken)
    camera = " ".join(str(exif.get(t, "")).strip("\x00 ") for t in (MAKE, MODEL)).strip()
    if camera:
        out["camera"] = camera
    return out


def _exif_seconds(text: str) -> float:
    """EXIF's "2024:06:01 18:30:00" -> Unix seconds, read as UTC."""
    from datetime import UTC, datetime

    return (
        datetime.strptime(text.strip("\x00 "), "%Y:%m:%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    )


DERIVED = ("path", "folder")  # read from the item's path, not kept with its fields
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def check_fields(fields: Any) -> None:
    """Refuse fields a user may not give an image: a name that is not a plain identifier (as
    Milvus and SQL need), `path` or `folder` (they follow the file), or a value that is not
    text, a number or None (which removes the field).

    Raises:
        DataError: naming the field.
    """
    if not isinstance(fields, dict):
        raise DataError("fields are a JSON object of names and values")
    for name, value in fields.items():
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
            raise DataError(f"field name {name!r} is not a plain identifier (letters, digits, _)")
        if name in DERIVED:
            raise DataError(f"field {name!r} follows the image's file and cannot be set")
        ok = (
            value is None
            or isinstance(value, str)
            or (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        )
        if not ok:
            raise DataError(f"field {name!r}: {value!r} is not text, a finite number or null")


def read_fields_file(path: Path) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """A user's fields for images, from JSON Lines (one object per line) or CSV (a header
    row), each row keyed by the image's `path` within its folder: {path: fields}, and the rows
    skipped as (where, why). CSV values that read as numbers are numbers; empty ones are left
    out. A row whose fields `check_fields` refuses is skipped, not the file.

    Raises:
        DataError: the file cannot be read, or a CSV has no `path` column.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the fields file {path}: {e}") from e
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else _jsonl_rows(text)
    fields, skipped = {}, []
    for where, row, bad in rows:
        try:
            if bad:
                raise DataError(bad)
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                raise DataError("no text `path`")
            own = {k: v for k, v in row.items() if k != "path" and v is not None}
            check_fields(own)
        except DataError as e:
            skipped.append((where, str(e)))
            continue
        fields[row["path"]] = own
    return fields, skipped


def _jsonl_rows(text: str):
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line), None
        except json.JSONDecodeError as e:
            yield f"line {n}", None, f"not JSON ({e.msg})"


def _csv_rows(text: str, path: Path):
    reader = csv.DictReader(io.StringIO(text))
    if "path" not in (reader.fieldnames or []):
        raise DataError(f"{path}: a CSV of fields needs a `path` column")
    for n, row in enumerate(reader, 2):
        if None in row:  # more cells than the header names
            yield f"line {n}", None, "more cells than columns"
            continue
        cells = {k: _cell(v) if k != "path" else v for k, v in row.items() if v not in ("", None)}
        yield f"line {n}", cells, None


def _cell(text: str) -> str | int | float:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            value = kind(text)
            return value if math.isfinite(value) else text
    return text


def item_fields(item: dict) -> dict[str, Any]:
    """Every field of an image item: its path and folder, then its "meta"."""
    fields: dict[str, Any] = {}
    if isinstance(item.get("path"), str):
        path = PurePosixPath(item["path"])
        folder = path.parent.as_posix()
        fields.update(path=item["path"], folder="" if folder == "." else f"{folder}/")
    fields.update(item.get("meta") or {})
    return fields


def field_kind(values: list[Any]) -> str:
    """A user field's kind from its values: number when every one is a number."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return NUMBER if values and numeric else TEXT


def field_kinds(
    fields: list[dict[str, Any]], known: dict[str, str] | None = None
) -> dict[str, str]:
    """The kind of every field of items whose fields are `fields`; with `known`, the kinds
    of others' fields as well, a field of both a number field only if it is one in each."""
    found: dict[str, list[Any]] = {}
    for each in fields:
        for name, value in each.items():
            if name not in BUILT_IN:
                found.setdefault(name, []).append(value)
    kinds = dict(known or BUILT_IN)
    for name, values in found.items():
        kind = field_kind(values)
        kinds[name] = kind if kinds.get(name, kind) == kind else TEXT
    return kinds


class MetadataColumns:
    """The fields of an index's items as columns, each built on first use."""

    def __init__(self, items: list[dict]) -> None:
        self.rows = len(items)
        self._fields = [item_fields(it) for it in items]
        self.kinds = field_kinds(self._fields)
        self._columns: dict[str, Any] = {}

    def numbers(self, name: str) -> np.ndarray:
        """(rows,) float64 values of a number or date field, NaN where an item lacks it."""
        if name not in self._columns:
            values = [f.get(name) for f in self._fields]
            self._columns[name] = np.array(
                [v if isinstance(v, int | float) else np.nan for v in values], dtype=np.float64
            )
        return self._columns[name]

    def texts(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A text field as (codes (rows,) int32, -1 where missing; its distinct values)."""
        if name not in self._columns:
            values = [f.get(name) for f in self._fields]
            present = np.array([v is not None for v in values], dtype=bool)
            text = np.array([str(v) for v in values if v is not None], dtype=object)
            categories, codes = np.unique(text, return_inverse=True)
            column = np.full(self.rows, -1, dtype=np.int32)
            column[present] = codes
            self._columns[name] = (column, categories)
        return self._columns[name]
