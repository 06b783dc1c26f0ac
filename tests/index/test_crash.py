"""Every write to an index folder, killed at each of its file operations in turn
(`tests.index.crash`), leaves the folder as it was or as the write makes it: nothing half-done,
nothing left over once it is opened again, and running the write again finishes it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from lightningdot.data import Corpus, read_karpathy
from tests import helpers
from tests.helpers import as_older_layout, index_of_saved_model
from tests.index.crash import crash_every_step


def check(found: dict[str, list]) -> None:
    assert not any(found[k] for k in ("broken", "orphans", "unfinished")), found
    assert found["old"] and found["new"], found  # both sides of the commit were hit


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
    return helpers.more_photos(tmp_path)


@pytest.mark.parametrize("fault", ["kill", "enospc"])
def test_an_add_from_another_folder_is_all_or_nothing(index, more_photos, tmp_path, fault):
    folder, annotations = more_photos
    args = {"images": str(folder), "annotations": str(annotations)}
    check(crash_every_step(tmp_path, "add", index, fault, **args))


@pytest.mark.parametrize("fault", ["kill", "enospc"])
def test_an_upload_is_all_or_nothing(index, more_photos, tmp_path, fault):
    folder, _ = more_photos
    files = [str(folder / "a.png"), str(folder / "b.png")]
    check(crash_every_step(tmp_path, "upload", index, fault, files=files))


@pytest.mark.parametrize("fault", ["kill", "enospc"])
def test_a_delete_is_all_or_nothing(index, tmp_path, fault):
    """Two images and their captions."""
    check(crash_every_step(tmp_path, "delete", index, fault, ids=["img01.png", "img02.png"]))


@pytest.mark.parametrize("fault", ["kill", "enospc"])
def test_a_compaction_is_all_or_nothing(index, tmp_path, fault):
    """Of images, captions and region states, after a delete."""
    from lightningdot.index.folder import IndexFolder

    IndexFolder.load(index).delete(["img01.png", "img02.png"])
    check(crash_every_step(tmp_path, "compact", index, fault))


@pytest.mark.parametrize("fault", ["kill", "enospc"])
def test_an_update_of_fields_is_all_or_nothing(index, tmp_path, fault):
    fields = {"stock": 3, "label": "sale"}
    check(crash_every_step(tmp_path, "update", index, fault, image_id="img01.png", fields=fields))


def test_the_first_add_to_a_folder_of_the_older_layout_is_all_or_nothing(
    index, more_photos, tmp_path
):
    """The add that moves the folder to versions, uploads made by earlier releases and all."""
    folder, annotations = more_photos
    older = as_older_layout(index, tmp_path / "older", {"upload-1234.png": png_bytes("olive")})
    check(
        crash_every_step(tmp_path, "add", older, images=str(folder), annotations=str(annotations))
    )


def test_a_build_is_all_or_nothing(corpus_dir, model_dir, tmp_path):
    args = {"images": str(corpus_dir / "images"), "annotations": str(corpus_dir / "captions.json")}
    check(crash_every_step(tmp_path, "build", None, "kill", model=str(model_dir), **args))


@pytest.mark.parametrize("fault", ["kill", "enospc"])
def test_a_sync_is_all_or_nothing(model_dir, tmp_path, fault):
    """An addition, a change, a removal and a move in one commit; killed while it encodes,
    its rerun reads what it staged."""
    import os

    from lightningdot.index.build import index_images

    photos = tmp_path / "photos"
    photos.mkdir()
    colours = ["red", "green", "blue", "yellow"]
    for n, colour in enumerate(colours):
        Image.new("RGB", (12, 12), colour).save(photos / f"p{n}.png")
    index_images(tmp_path / "index", photos, model=str(model_dir))
    Image.new("RGB", (12, 12), "purple").save(photos / "new.png")
    Image.new("RGB", (12, 12), "orange").save(photos / "p0.png")
    os.utime(photos / "p0.png", (1e9, 1e9))
    (photos / "p1.png").unlink()
    (photos / "p2.png").rename(photos / "p2-moved.png")
    check(crash_every_step(tmp_path, "sync", tmp_path / "index", fault, images=str(photos)))
