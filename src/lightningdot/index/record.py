"""An index folder's record, `retriever.json`: the one file a change of the folder replaces
(see `lightningdot.index.folder` for the layout it describes).

It is read with every field checked, so that a damaged or hand-edited record is refused by name
rather than failing later, and so that its parts cannot point outside the folder. A record of
the layout before versions (no "format") reads as version 0 of this one.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

from lightningdot.errors import DataError
from lightningdot.io import read_json, write_json

RECORD = "retriever.json"
FORMAT = 2
UPLOADS = "uploads"  # the root of uploaded images, and its folder in the index folder
PARTS = ("images", "captions", "states", "priors")  # "priors": of a Milvus folder
LEGACY_PARTS = ("images", "captions")  # the parts of the layout before versions


@dataclass
class Manifest:
    """An index folder's record."""

    model: str  # name or folder of the model that made it
    model_id: str
    version: int = 0
    parts: dict[str, str] = field(default_factory=dict)  # "images", ... -> their folder
    roots: dict[str, str] = field(default_factory=dict)  # the first is the collection's own
    features: str | None = None
    # Moved from the layout before versions: its folders (images/, captions/) are leftovers
    # wherever the record does not name them. Kept: a kill may come before they are swept.
    upgraded: bool = False
    legacy: bool = False  # read from that layout (not saved: a commit moves it to this one)
    # Where the vectors are when not in FAISS parts: {"kind": "milvus", "uri", "collections":
    # {"images": name, "captions"?: name}} (`lightningdot.index.milvus`).
    backend: dict | None = None
    kinds: dict[str, str] | None = None  # a Milvus folder's fields and their kinds

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The record of the index folder `folder`.

        Raises:
            DataError: `folder` is not an index folder, or its record is damaged.
        """
        missing = f"not an index folder (no {RECORD}): {folder}"
        data = read_json(folder / RECORD, "index folder record", missing)
        damaged = DataError(f"damaged index folder record {folder / RECORD}")
        if not isinstance(data, dict) or not _texts(data.get("model"), data.get("model_id")):
            raise damaged
        if "format" not in data:
            if not _texts(data.get("images") or "", data.get("features") or ""):
                raise damaged
            return cls._of_legacy(folder, data)
        if data["format"] != FORMAT:
            raise DataError(f"{folder}: unknown index folder format {data['format']!r}")
        known = {f.name for f in fields(cls)} - {"legacy"}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise damaged from e
        if not manifest._well_formed():
            raise damaged
        return manifest

    def _well_formed(self) -> bool:
        return (
            isinstance(self.version, int)
            and isinstance(self.upgraded, bool)
            and (self.features is None or isinstance(self.features, str))
            and _names_texts(self.roots)
            and _names_texts(self.parts)
            and ("images" in self.parts) == (self.backend is None)
            and (self.backend is None or _backend_well_formed(self.backend))
            and (self.kinds is None or _names_texts(self.kinds))
            and set(self.parts) <= set(PARTS)
            and all(_inside(p) for p in self.parts.values())
        )

    @classmethod
    def _of_legacy(cls, folder: Path, data: dict) -> Manifest:
        parts = {p: p for p in LEGACY_PARTS if (folder / p).is_dir()}
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
    def old(self) -> bool:
        """Whether the folder is, or was, in the layout before versions."""
        return self.legacy or self.upgraded

    @property
    def primary_root(self) -> str | None:
        """The root of the collection the folder was built from."""
        return next((name for name in self.roots if name != UPLOADS), None)


def legacy_upload(item: dict, folder: Path) -> str | None:
    """The file name of an upload as the layout before versions recorded it (an absolute path,
    to the file under the index folder's uploads/, where the file still is), else None."""
    path = item.get("path") or ""
    if "root" in item or not os.path.isabs(path) or not str(item["id"]).startswith("upload-"):
        return None
    name = Path(path).name
    return name if (folder / UPLOADS / name).is_file() else None


def _backend_well_formed(backend: object) -> bool:
    if not isinstance(backend, dict) or backend.get("kind") != "milvus":
        return False
    collections = backend.get("collections")
    return (
        isinstance(backend.get("uri"), str)
        and _names_texts(collections)
        and "images" in collections
        and set(collections) <= {"images", "captions"}
    )


def _texts(*values: object) -> bool:
    return all(isinstance(v, str) for v in values)


def _names_texts(table: object) -> bool:
    return isinstance(table, dict) and all(_texts(k, v) for k, v in table.items())


def _inside(path: str) -> bool:
    """A relative path that stays inside the folder it is relative to."""
    p = PurePosixPath(path)
    return not p.is_absolute() and ".." not in p.parts and path not in ("", ".")
