"""Every write to an index folder, killed at each of its file operations in turn
(`tests.index.crash`), leaves the folder as it was or as the write makes it: nothing half-done,
nothing left over once it is opened again, and running the write again finishes it."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightningdot.data import Corpus, read_karpathy
from lightningdot.errors import DataError
from lightningdot.index.folder import IndexFolder
from lightningdot.index.vector import VectorIndex
from lightningdot.io import write_json
from tests.helpers import as_older_layout, index_of_saved_model
from tests.index.crash import OPS

ROOT = Path(__file__).resolve().parents[2]


def state(folder: Path):
    """What a reader of the folder sees (None: no index), after opening it (which tidies)."""
    try:
        index = IndexFolder.load(folder)
    except DataError:
        return None

    def part(ix: VectorIndex | None):
        if ix is None:
            return None
        return json.dumps(ix.items, sort_keys=True), ix.index.reconstruct_n(0, len(ix))

    return part(index.image_index), part(index.caption_index), index.manifest.roots


def same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    for x, y in zip(a[:2], b[:2], strict=True):
        if (x is None) != (y is None):
            return False
        if x is not None and (x[0] != y[0] or not np.allclose(x[1], y[1], atol=1e-5)):
            return False
    return a[2] == b[2]


def files(folder: Path) -> list[str]:
    """Everything under the folder but its lock file, version folders under one name (a build
    run again after it got through commits the same parts as the next version)."""
    if not folder.exists():
        return []
    paths = (str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != ".lock")
    return sorted(re.sub(r"^v\d+", "v_", p) for p in paths)


def crash_every_step(tmp_path: Path, op: str, before: Path | None, **args) -> None:
    """Run `op` killed at each step; check every copy; return the number of steps."""
    spec = {"op": op, "before": str(before) if before else None, "trials": str(tmp_path / "t")}
    spec["args"] = args
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run(
        [sys.executable, "-m", "tests.index.crash", str(tmp_path / "spec.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    steps = json.loads((tmp_path / "t" / "done.json").read_text())["steps"]
    old_ref, new_ref = tmp_path / "old", tmp_path / "new"
    if before is not None:
        shutil.copytree(before, old_ref)
        shutil.copytree(before, new_ref)
    OPS[op](new_ref, **args)
    old, new = state(old_ref), state(new_ref)
    assert new is not None and not same(old, new)
    found = {"old": [], "new": [], "broken": []}
    for n in range(1, steps + 1):
        trial = tmp_path / "t" / f"crash-{n:03d}"
        seen = state(trial)
        kind = "old" if same(seen, old) else "new" if same(seen, new) else "broken"
        ref = old_ref if kind == "old" else new_ref
        if kind != "broken" and seen is not None and files(trial) != files(ref):
            kind = "broken"  # a leftover the opening did not sweep
        OPS[op](trial, **args)  # the write run again finishes the job
        if not (same(state(trial), new) and files(trial) == files(new_ref)):
            kind = "broken"
        found[kind].append(n)
    assert not found["broken"], f"{op}: broken after crashes at steps {found['broken']}"
    assert found["old"] and found["new"], found  # both sides of the commit were hit
    return steps


def png_bytes(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def index(corpus_dir, model_dir, tmp_path) -> Path:
    corpus = read_karpathy(corpus_dir / "captions.json")
    out = tmp_path / "index"
    index_of_saved_model(model_dir, Corpus(corpus.images[:4]), corpus_dir, out)
    return out


@pytest.fixture
def more_photos(tmp_path) -> tuple[Path, Path]:
    """Another folder of three captioned images, `a.png` among them as in the collection."""
    folder = tmp_path / "more_photos"
    folder.mkdir()
    entries = []
    for name, colour in [("a.png", "teal"), ("b.png", "navy"), ("img00.png", "pink")]:
        Image.new("RGB", (20, 20), colour).save(folder / name)
        sentences = [{"raw": f"a {colour} picture"}, {"raw": f"{colour} things"}]
        entries.append({"filename": name, "split": "train", "sentences": sentences})
    write_json(tmp_path / "more.json", {"images": entries})
    return folder, tmp_path / "more.json"


def test_an_add_from_another_folder_is_all_or_nothing(index, more_photos, tmp_path):
    folder, annotations = more_photos
    crash_every_step(tmp_path, "add", index, images=str(folder), annotations=str(annotations))


def test_an_upload_is_all_or_nothing(index, more_photos, tmp_path):
    folder, _ = more_photos
    crash_every_step(
        tmp_path, "upload", index, files=[str(folder / "a.png"), str(folder / "b.png")]
    )


def test_the_first_add_to_a_folder_of_the_older_layout_is_all_or_nothing(
    index, more_photos, tmp_path
):
    """The add that moves the folder to versions, uploads made by earlier releases and all."""
    folder, annotations = more_photos
    older = as_older_layout(index, tmp_path / "older", {"upload-1234.png": png_bytes("olive")})
    crash_every_step(tmp_path, "add", older, images=str(folder), annotations=str(annotations))


def test_a_build_is_all_or_nothing(corpus_dir, model_dir, tmp_path):
    args = {"images": str(corpus_dir / "images"), "annotations": str(corpus_dir / "captions.json")}
    crash_every_step(tmp_path, "build", None, model=str(model_dir), **args)
