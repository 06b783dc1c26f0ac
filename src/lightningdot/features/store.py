"""A feature store on disk: region features of many images, in shards written atomically.

Layout of a store folder:

    store.json               what made the features (backbone, sizes); checked on every write
    shard-00000.safetensors  features (n, R, D) fp16, boxes (n, R, 7), num_regions (n,),
                             soft_labels (n, R, C) fp16 when known; the n image keys in metadata

A shard appears whole or not at all, so an interrupted extraction loses at most the shard it was
filling, and a rerun skips every key already in a shard.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features.regions import RegionBatch, RegionFeatures, collate_regions
from lightningdot.io import read_json, write_json, write_safetensors

STORE_VERSION = 1


@dataclass(frozen=True)
class StoreInfo:
    """What produced the features of a store; two stores are compatible when these are equal."""

    backbone: str  # registered backbone name, or "detector" for imported BUTD regions
    feature_dim: int
    num_classes: int  # size of the soft-label distribution; 0 when there are none
    version: int = STORE_VERSION


class FeatureStore:
    """Read access to a feature store folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        info_path = self.root / "store.json"
        info = read_json(
            info_path,
            "feature store info",
            missing=f"not a feature store (no store.json): {self.root}",
        )
        try:
            self.info = StoreInfo(**info)
        except TypeError as e:
            raise DataError(f"malformed {info_path}: {e}") from e
        self._where: dict[str, tuple[Path, int]] = {}
        for shard in sorted(self.root.glob("shard-*.safetensors")):
            try:
                with safe_open(shard, framework="pt") as f:
                    keys = json.loads(f.metadata()["keys"])
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise DataError(f"damaged feature shard {shard}: {e}") from e
            for row, key in enumerate(keys):
                self._where[key] = (shard, row)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> RegionFeatures:
        return self.gather([key])[0]

    def gather(self, keys: list[str], soft_labels: bool = True) -> list[RegionFeatures]:
        """The regions of each key, opening every shard involved once.

        A shard that contributes a few rows is read row by row (a query's top K touches many
        shards for a row or two each); one that contributes many is read whole.
        """
        missing = [k for k in keys if k not in self._where]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) not in feature store {self.root}, e.g. {missing[0]!r}"
            )
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for pos, key in enumerate(keys):
            shard, row = self._where[key]
            by_shard.setdefault(shard, []).append((pos, row))
        out: list[RegionFeatures | None] = [None] * len(keys)
        for shard, wanted in by_shard.items():
            with safe_open(shard, framework="pt") as f:
                names = ["features", "boxes"]
                if soft_labels and "soft_labels" in set(f.keys()):
                    names.append("soft_labels")
                counts = f.get_tensor("num_regions")
                if len(wanted) * 8 >= len(counts):
                    whole = {n: f.get_tensor(n) for n in names}
                    rows = {row: {n: t[row] for n, t in whole.items()} for _, row in wanted}
                else:
                    slices = {n: f.get_slice(n) for n in names}
                    rows = {
                        row: {n: sl[row : row + 1][0] for n, sl in slices.items()}
                        for _, row in wanted
                    }
            for pos, row in wanted:
                n, r = int(counts[row]), rows[row]
                soft = r.get("soft_labels")
                out[pos] = RegionFeatures(
                    r["features"][:n].clone(),
                    r["boxes"][:n].float().clone(),
                    None if soft is None else soft[:n].clone(),
                )
        return out  # type: ignore[return-value]

    def batch(self, keys: list[str], soft_labels: bool = True) -> RegionBatch:
        return collate_regions(self.gather(keys, soft_labels))


class FeatureStoreWriter:
    """Append regions to a store, one atomic shard per `shard_size` images.

    Use as a context manager so the last partial shard is written on a clean exit.
    """

    def __init__(self, root: str | Path, info: StoreInfo, shard_size: int = 256) -> None:
        if shard_size < 1:
            raise DataError(f"shard size must be at least 1, not {shard_size}")
        self.root = Path(root)
        self.info = info
        self.shard_size = shard_size
        info_path = self.root / "store.json"
        _check_root(self.root)
        if info_path.is_file():
            existing = FeatureStore(self.root)
            if existing.info != info:
                raise ConfigMismatchError(
                    f"feature store {self.root} holds {existing.info}, not {info}; "
                    "use another --out folder"
                )
            self.done = set(existing.keys())
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(info_path, asdict(info))
            self.done = set()
        self._pending: list[tuple[str, RegionFeatures]] = []
        self._next_shard = len(list(self.root.glob("shard-*.safetensors")))

    def add(self, key: str, regions: RegionFeatures) -> None:
        if regions.features.shape[1] != self.info.feature_dim:
            raise ConfigMismatchError(
                f"{key}: features of size {regions.features.shape[1]}, "
                f"store expects {self.info.feature_dim}"
            )
        self._pending.append((key, regions))
        self.done.add(key)
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        keys = [k for k, _ in self._pending]
        items = [r for _, r in self._pending]
        batch = collate_regions(items)
        tensors = {
            "features": batch.features.to(torch.float16),
            "boxes": batch.boxes.to(torch.float32),
            "num_regions": batch.mask.sum(1).to(torch.int32),
        }
        if batch.soft_labels is not None and self.info.num_classes:
            tensors["soft_labels"] = batch.soft_labels.to(torch.float16)
        path = self.root / f"shard-{self._next_shard:05d}.safetensors"
        write_safetensors(path, tensors, metadata={"keys": json.dumps(keys)})
        self._next_shard += 1
        self._pending.clear()

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On KeyboardInterrupt too: what was computed is kept; nothing half-written is.
        self.flush()


def _check_root(root: Path) -> None:
    """Refuse a store folder that is a file, or a folder of something else: shards written
    there would mix with its files (an `--out` that names the images folder, say)."""
    if root.exists() and not root.is_dir():
        raise DataError(f"feature store {root} is a file, not a folder; use another --out")
    if root.is_dir() and not (root / "store.json").is_file():
        others = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        if others:
            raise DataError(
                f"{root} holds other files ({others[0]!r}, ...) and no feature store; "
                "use a new or empty --out folder"
            )
