"""What re-ranking reads of each indexed image, kept beside the image index: the image
encoder's states ([IMG] + region tokens), row for row with the image index.

Re-ranking the top K of a text query needs those K images' states. Without them it must
decode the K image files and run the backbone again, seconds per query on a small CPU; read
from here, memory-mapped, they cost a copy of K x (1 + R) x H float16 values (about 63 KB per
image for 81 regions of width 384).

    vN/states/
        states.json      {"format": 1, "rows": N, "hidden": H, "chunks": [n0, n1, ...]}
        chunk-0.npy      (n0, L0, H) float16: each image's states, padded to L0 tokens
        lengths-0.npy    (n0,) int32: the real tokens of each (1 + its regions)
        chunk-1.npy ...  the images a later add brought

Each add writes one new chunk; the chunks already committed are hard links to the previous
version's files (copies where the file system cannot link), so an add costs the size of what
it adds, and committed files are never written again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightningdot.encode import StateRows
from lightningdot.errors import DataError
from lightningdot.io import link_or_copy, read_json

FORMAT = 1
RECORD = "states.json"


def chunk_files(n: int) -> tuple[str, str]:
    return f"chunk-{n}.npy", f"lengths-{n}.npy"


def is_states_file(name: str) -> bool:
    """A file name a states part holds (for the sweep, which removes only its own)."""
    if name == RECORD:
        return True
    stem, _, ext = name.partition(".")
    kind, _, number = stem.partition("-")
    return ext == "npy" and kind in ("chunk", "lengths") and number.isdigit()


@dataclass
class Chunk:
    rows: StateRows
    source: Path | None = None  # the folder its files were read from (None: not written yet)
    number: int = 0  # its files' number there


class RegionStates:
    """The states of every indexed image (see the module docstring)."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self._starts = np.cumsum([0] + [len(c.rows) for c in chunks])

    @classmethod
    def build(cls, rows: StateRows) -> RegionStates:
        return cls([Chunk(rows)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def nbytes(self) -> int:
        return sum(c.rows.states.nbytes + c.rows.lengths.nbytes for c in self.chunks)

    def grown(self, rows: StateRows) -> RegionStates:
        """These states and `rows` after them, as a new part (this one is unchanged)."""
        return RegionStates([*self.chunks, Chunk(rows)])

    def kept(self, keep: np.ndarray) -> RegionStates:
        """Only the rows where `keep` (rows,) is True, as a new part (this one is unchanged): a
        chunk that keeps every row stays as committed (its files linked again), one that keeps
        none goes, the others are copied without the rows dropped."""
        if len(keep) != len(self):
            raise ValueError(f"{len(keep)} flags for {len(self)} image rows")
        chunks = []
        for c, chunk in enumerate(self.chunks):
            mine = keep[self._starts[c] : self._starts[c + 1]]
            if mine.all():
                chunks.append(chunk)
            elif mine.any():
                chunks.append(Chunk(chunk.rows.select(mine)))
        return RegionStates(chunks)

    def committed(self, folder: Path) -> RegionStates:
        """These states, as `write` left them in `folder` (no file is read): the next add
        links their files from there."""
        return RegionStates([Chunk(c.rows, folder, n) for n, c in enumerate(self.chunks)])

    def take(self, rows: list[int]) -> StateRows:
        """The states of image rows `rows` as they are kept (float16, padded to the widest of
        their chunks): for rows added again elsewhere, as a moved image is."""
        parts = []
        for r in rows:
            if not 0 <= r < len(self):
                raise IndexError(f"image row {r} of {len(self)}")
            c = int(np.searchsorted(self._starts, r, side="right")) - 1
            i = r - int(self._starts[c])
            chunk = self.chunks[c].rows
            parts.append(StateRows(np.asarray(chunk.states[i : i + 1]), chunk.lengths[i : i + 1]))
        return StateRows.concat(parts)

    def gather(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The states of image rows `rows`: (K, L, H) float32 and their (K, L) mask, padded to
        the longest of them; as `Reranker.image_states` gives them."""
        picked = []
        for r in rows:
            c = int(np.searchsorted(self._starts, r, side="right")) - 1
            if not 0 <= r < len(self):
                raise IndexError(f"image row {r} of {len(self)}")
            chunk = self.chunks[c].rows
            i = r - int(self._starts[c])
            picked.append((chunk.states[i], int(chunk.lengths[i])))
        width = max(n for _, n in picked)
        states = np.zeros((len(rows), width, picked[0][0].shape[-1]), np.float32)
        for k, (s, n) in enumerate(picked):
            states[k, :n] = s[:n]
        lengths = torch.tensor([n for _, n in picked])
        return torch.from_numpy(states), torch.arange(width)[None, :] < lengths[:, None]

    def write(self, folder: Path) -> None:
        """Write the part into the empty folder `folder`: committed chunks linked, new ones
        saved."""
        for n, chunk in enumerate(self.chunks):
            files = chunk_files(n)
            if chunk.source is not None:
                for old, new in zip(chunk_files(chunk.number), files, strict=True):
                    link_or_copy(chunk.source / old, folder / new)
            else:
                np.save(folder / files[0], chunk.rows.states.astype(np.float16, copy=False))
                np.save(folder / files[1], chunk.rows.lengths.astype(np.int32, copy=False))
        hidden = self.chunks[0].rows.states.shape[-1] if self.chunks else 0
        sizes = [len(c.rows) for c in self.chunks]
        # Written in place: the whole version folder is staged, and flushed before its commit.
        record = {"format": FORMAT, "rows": len(self), "hidden": hidden, "chunks": sizes}
        (folder / RECORD).write_text(json.dumps(record))

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> RegionStates:
        """Read a states part (memory-mapped by default).

        Raises:
            DataError: a file is missing or does not agree with the record.
        """
        record = read_json(folder / RECORD, "region states record")
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise DataError(f"{folder}: unknown region states format")
        sizes, hidden = record.get("chunks"), record.get("hidden")
        if not isinstance(sizes, list) or not all(isinstance(n, int) for n in sizes):
            raise DataError(f"{folder}: damaged {RECORD}")
        chunks = []
        for n, size in enumerate(sizes):
            names = chunk_files(n)
            try:
                states = np.load(folder / names[0], mmap_mode="r" if mmap else None)
                lengths = np.load(folder / names[1])
            except (OSError, ValueError) as e:
                raise DataError(f"{folder}: damaged region states ({e})") from e
            if states.ndim != 3 or len(states) != size or len(lengths) != size:
                raise DataError(f"{folder}: {names[0]} does not hold {size} images' states")
            if states.shape[-1] != hidden or lengths.max(initial=1) > states.shape[1]:
                raise DataError(f"{folder}: {names[0]} does not agree with {RECORD}")
            chunks.append(Chunk(StateRows(states, lengths), folder, n))
        part = cls(chunks)
        if len(part) != record.get("rows"):
            raise DataError(
                f"{folder}: {len(part)} rows of states, {RECORD} says {record.get('rows')}"
            )
        return part
