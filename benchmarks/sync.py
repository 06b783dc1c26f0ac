"""`ldot index --sync` after a tenth of a photo folder changed, against indexing it again.

The Flickr8k images (`--count`, all 7,000 by default) are copied to a temporary folder and
indexed as a user does (`ldot index --images DIR --out INDEX`: no feature store, the default
runtime, region states kept). Then 10 % of them change: 3 % edited (a patch of their pixels
painted over, saved again), 3 % removed, 2 % new images (mirrored copies of others: other
bytes, other vectors) and 2 % moved (renamed into another folder). `ldot index --sync` brings
the index in line; the alternative, a full `ldot index` of the changed folder into a new index,
is timed after it. Each is timed as one command (process start, model load, reading, encoding,
writing). The synced index is checked against the full one: the same ids, and the largest
difference between their vectors.

    python benchmarks/sync.py [--count 7000] [--no-write]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from report import commit, machine, table, write_section

from lightningdot.index.folder import IndexFolder

ROOT = Path(__file__).resolve().parent.parent
LDOT = Path(sys.executable).parent / "ldot"
SHARES = {"edited": 0.03, "removed": 0.03, "added": 0.02, "moved": 0.02}
SUMMARY = re.compile(r"\+\d+ added, \d+ changed, \d+ removed, \d+ moved, \d+ unreadable")


def copy_images(data: Path, count: int, folder: Path) -> list[str]:
    names = sorted(p.name for p in (data / "images").glob("*.jpg"))[:count]
    folder.mkdir()
    for name in names:
        shutil.copy2(data / "images" / name, folder / name)
    return names


def change_tenth(folder: Path, names: list[str], seed: int = 0) -> dict[str, int]:
    """Edit, remove, add and move disjoint shares of the images (SHARES); returns how many of
    each."""
    order = np.random.default_rng(seed).permutation(len(names))
    picked, start = {}, 0
    for kind, share in SHARES.items():
        n = round(share * len(names))
        picked[kind] = [names[i] for i in order[start : start + n]]
        start += n
    for name in picked["edited"]:
        with Image.open(folder / name) as im:
            im = im.convert("RGB")
        ImageDraw.Draw(im).rectangle((0, 0, im.width // 3, im.height // 3), fill=(255, 0, 0))
        im.save(folder / name, quality=90)
    for name in picked["removed"]:
        (folder / name).unlink()
    (folder / "new").mkdir()
    for name in picked["added"]:  # mirrors of images that stay where they are
        with Image.open(folder / name) as im:
            ImageOps.mirror(im.convert("RGB")).save(folder / "new" / f"mirrored-{name}")
    (folder / "moved").mkdir()
    for name in picked["moved"]:
        (folder / name).rename(folder / "moved" / name)
    return {kind: len(v) for kind, v in picked.items()}


def time_ldot(*args: str) -> tuple[float, str]:
    """Wall seconds of one `ldot` command, and what it printed."""
    t0 = time.perf_counter()
    run = subprocess.run([str(LDOT), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"ldot {' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return seconds, run.stdout + run.stderr


def compare(synced: Path, full: Path) -> tuple[bool, float]:
    """Whether the two indexes hold the same ids, and the largest difference of a vector."""
    a, b = IndexFolder.load(synced).image_index, IndexFolder.load(full).image_index
    ids = sorted(it["id"] for it in a.iterate())
    if ids != sorted(it["id"] for it in b.iterate()):
        return False, float("nan")
    return True, float(np.abs(a.vectors(ids) - b.vectors(ids)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--count", type=int, default=7000, help="Images copied and indexed.")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos, index, full = work / "photos", work / "index", work / "full"
        names = copy_images(args.data, args.count, photos)
        built, _ = time_ldot("index", "--images", str(photos), "--out", str(index))
        print(f"built {len(names)} in {built:.1f} s", flush=True)
        counts = change_tenth(photos, names)
        synced, said = time_ldot("index", "--images", str(photos), "--out", str(index), "--sync")
        summary = SUMMARY.search(said).group(0)
        print(f"synced in {synced:.1f} s: {summary}", flush=True)
        again, _ = time_ldot("index", "--images", str(photos), "--out", str(full))
        print(f"indexed again in {again:.1f} s", flush=True)
        same_ids, diff = compare(index, full)
        total = IndexFolder.load(full).image_index.count

    rows = [
        ["`ldot index` (first build)", f"{len(names):,}", f"{built:.1f}", "-"],
        ["`ldot index --sync`", f"{total:,}", f"{synced:.1f}", f"{100 * synced / again:.1f} %"],
        ["`ldot index` of the changed folder", f"{total:,}", f"{again:.1f}", "100 %"],
    ]
    changed = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    body = "\n".join(
        [
            "## Syncing a photo folder after a tenth of it changed",
            "",
            f"Machine: {machine()}; commit {commit()}. {len(names):,} Flickr8k images copied to "
            "a folder and indexed as a user does (`ldot index --images DIR --out INDEX`: no "
            f"feature store, the default runtime, region states kept); then {changed} "
            "(edited: a patch painted over and saved again; added: mirrored copies of others; "
            "moved: renamed into another folder). Each command timed whole: process start, "
            "model load, reading, encoding, writing. Reproduce: `python benchmarks/sync.py`.",
            "",
            table(["command", "images after", "seconds", "of a full re-index"], rows),
            "",
            f"The sync printed `{summary}`. Against the full re-index: "
            f"{'the same ids' if same_ids else 'different ids'}, vectors within {diff:.1e}.",
        ]
    )
    if not args.no_write:
        write_section("sync", body)
    print(body)


if __name__ == "__main__":
    main()
