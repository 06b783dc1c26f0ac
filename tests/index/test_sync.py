"""`ldot index --sync`: an index folder brought in line with its image folder, each result
checked against a fresh build of the folder as it ends (same ids, items, vectors, states and
captions); moved and touched images are not encoded again; an interrupted sync resumes from
what it staged; a folder that vanished or emptied is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import lightningdot.index.sync as sync_module
from lightningdot.errors import DataError
from lightningdot.index.build import index_images
from lightningdot.index.folder import IndexFolder
from lightningdot.index.record import Manifest
from lightningdot.index.storage import STAGING, check_buildable, remove_staging
from lightningdot.index.sync import sync_images
from tests.helpers import noise_photo as photo


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    for n in range(8):
        photo(folder / f"p{n}.png", n)
    return folder


def build(out: Path, folder: Path, model_dir: Path, **kw) -> None:
    index_images(out, folder, model=str(model_dir), **kw)


def seen(out: Path) -> dict:
    """What the index holds, by id: items, vectors, region states, captions."""
    index = IndexFolder.load(out)
    images = index.image_index
    ids = sorted(it["id"] for it in images.iterate())
    state = {}
    if index.states is not None:
        rows = index.states.take([images.row(i) for i in ids])
        state = {i: rows.states[n, : rows.lengths[n]] for n, i in enumerate(ids)}
    captions = index.caption_index
    caps = {}
    if captions is not None:
        cap_ids = [it["id"] for it in captions.iterate()]
        caps = {
            c: (captions.get(c)["caption"], v)
            for c, v in zip(cap_ids, captions.vectors(cap_ids), strict=True)
        }
    return {
        "items": {i: images.get(i) for i in ids},
        "vectors": dict(zip(ids, images.vectors(ids), strict=True)),
        "states": state,
        "captions": caps,
    }


def assert_same(got: dict, want: dict) -> None:
    assert got["items"] == want["items"]
    for i, v in want["vectors"].items():
        np.testing.assert_allclose(got["vectors"][i], v, atol=1e-5, err_msg=i)
    assert got["states"].keys() == want["states"].keys()
    for i, s in want["states"].items():
        np.testing.assert_allclose(got["states"][i].astype(np.float32), s, atol=2e-3)
    assert got["captions"].keys() == want["captions"].keys()
    for c, (text, v) in want["captions"].items():
        assert got["captions"][c][0] == text
        np.testing.assert_allclose(got["captions"][c][1], v, atol=1e-5)


def like_a_fresh_build(out, folder, model_dir, tmp_path, **kw) -> dict:
    """Check the synced index against a build of the folder as it is now; returns what the
    synced one holds."""
    fresh = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
    build(fresh, folder, model_dir, **kw)
    got = seen(out)
    assert_same(got, seen(fresh))
    return got


@pytest.fixture
def encodes(monkeypatch) -> list[str]:
    """The paths every sync of this test runs through the encoder."""
    paths: list[str] = []
    real = sync_module.encode_readable

    def counted(model, source, keys, *args, **kw):
        paths.extend(keys)
        return real(model, source, keys, *args, **kw)

    monkeypatch.setattr(sync_module, "encode_readable", counted)
    return paths


def bump(path: Path, seconds: float = 100.0) -> None:
    st = path.stat()
    os.utime(path, (st.st_atime + seconds, st.st_mtime + seconds))


@pytest.mark.parametrize("states", [True, False], ids=["states", "no-states"])
def test_a_sync_adds_changes_removes_and_moves(photos, model_dir, tmp_path, encodes, states):
    out = tmp_path / "ix"
    build(out, photos, model_dir, states=states)
    before = seen(out)
    photo(photos / "new" / "n1.png", 100)  # added
    photo(photos / "n2.png", 101)
    photo(photos / "p1.png", 200)  # changed content
    bump(photos / "p1.png")
    (photos / "p2.png").unlink()  # removed
    (photos / "moved").mkdir()
    (photos / "p3.png").rename(photos / "moved" / "p3-renamed.png")  # moved
    bump(photos / "p4.png")  # touched: same bytes, a new mtime
    (photos / "broken.png").write_bytes(b"not an image")  # unreadable

    report = sync_images(out, photos)
    assert (report.added, report.changed, report.removed) == (2, 1, 1)
    assert (report.moved, report.touched, report.encoded) == (1, 1, 3)
    assert [p for p, _ in report.failed] == ["broken.png"]
    assert report.total == 9
    assert sorted(encodes) == ["broken.png", "n2.png", "new/n1.png", "p1.png"]  # not p3, p4
    got = like_a_fresh_build(out, photos, model_dir, tmp_path, states=states)
    moved = got["vectors"]["moved/p3-renamed.png"]
    assert np.array_equal(moved, before["vectors"]["p3.png"])  # kept, not encoded again
    if states:
        kept = got["states"]["moved/p3-renamed.png"]
        assert np.array_equal(kept, before["states"]["p3.png"])
    assert (
        got["items"]["p4.png"]["meta"]["mtime"] == before["items"]["p4.png"]["meta"]["mtime"] + 100
    )
    assert not (out / STAGING).exists()

    version = Manifest.read(out).version
    again = sync_images(out, photos)  # nothing to do: no commit
    assert (again.added, again.changed, again.removed, again.moved, again.touched) == (0,) * 5
    assert Manifest.read(out).version == version
    assert sorted(encodes) == ["broken.png", "broken.png", "n2.png", "new/n1.png", "p1.png"]


def test_a_sync_on_milvus_is_a_fresh_build(photos, model_dir, tmp_path, encodes):
    """The same changes on a folder whose vectors are in milvus-lite, against a FAISS build."""
    from lightningdot.index.engines import load_index
    from lightningdot.index.milvus import MilvusTarget

    out = tmp_path / "ix"
    build(out, photos, model_dir, states=False, milvus=MilvusTarget(str(tmp_path / "m.db")))
    moved_before = load_index(out).image_index.vectors(["p3.png"])
    photo(photos / "n1.png", 100)  # added
    photo(photos / "p1.png", 200)  # changed content
    bump(photos / "p1.png")
    (photos / "p2.png").unlink()  # removed
    (photos / "p3.png").rename(photos / "p3-renamed.png")  # moved

    report = sync_images(out, photos)
    assert (report.added, report.changed, report.removed, report.moved) == (1, 1, 1, 1)
    assert sorted(encodes) == ["n1.png", "p1.png"]
    fresh = tmp_path / "fresh"
    build(fresh, photos, model_dir, states=False)
    got, want = load_index(out).image_index, IndexFolder.load(fresh).image_index
    ids = sorted(it["id"] for it in want.iterate())
    assert sorted(it["id"] for it in got.iterate()) == ids
    assert [got.get(i) for i in ids] == [want.get(i) for i in ids]
    np.testing.assert_allclose(got.vectors(ids), want.vectors(ids), atol=1e-5)
    assert np.array_equal(got.vectors(["p3-renamed.png"]), moved_before)


def test_only_deletes_and_copies_and_swaps_encode_nothing(photos, model_dir, tmp_path, encodes):
    out = tmp_path / "ix"
    build(out, photos, model_dir)
    (photos / "p0.png").unlink()
    (photos / "p1.png").unlink()
    report = sync_images(out, photos)
    assert (report.removed, report.total) == (2, 6)
    like_a_fresh_build(out, photos, model_dir, tmp_path)
    shutil.copy2(photos / "p5.png", photos / "copy-of-p5.png")
    (photos / "p6.png").rename(photos / "tmp.png")
    (photos / "p7.png").rename(photos / "p6.png")
    (photos / "tmp.png").rename(photos / "p7.png")
    bump(photos / "p6.png")
    bump(photos / "p7.png")
    report = sync_images(out, photos)
    assert (report.added, report.changed, report.encoded) == (1, 2, 0)
    assert encodes == []
    like_a_fresh_build(out, photos, model_dir, tmp_path)


def test_an_interrupted_sync_resumes_from_what_it_staged(
    photos, model_dir, tmp_path, monkeypatch, encodes
):
    out = tmp_path / "ix"
    build(out, photos, model_dir)
    for n in range(6):
        photo(photos / f"new{n}.png", 300 + n)
    (photos / "p0.png").unlink()
    monkeypatch.setattr(sync_module, "STAGE_CHUNK", 2)
    real_write, written = sync_module.Staging.write, []

    def killed_after_two(self, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C halfway
        real_write(self, *args)
        written.append(args[0])

    version = Manifest.read(out).version
    monkeypatch.setattr(sync_module.Staging, "write", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sync_images(out, photos)
    assert Manifest.read(out).version == version  # nothing committed
    assert IndexFolder.load(out).image_index.count == 8
    assert len(list((out / STAGING).glob("*.npz"))) == 2
    monkeypatch.setattr(sync_module.Staging, "write", real_write)
    encodes.clear()
    report = sync_images(out, photos)
    assert len(encodes) == 2 and report.encoded == 2  # the other four were staged
    assert (report.added, report.removed) == (6, 1)
    assert not (out / STAGING).exists()
    like_a_fresh_build(out, photos, model_dir, tmp_path)


def test_staging_of_another_model_or_damaged_is_not_reused(photos, model_dir, tmp_path, encodes):
    out = tmp_path / "ix"
    build(out, photos, model_dir)
    photo(photos / "new.png", 77)
    staging = sync_module.Staging(out, "another-model", states=True)
    staging.write(["0" * 32], np.ones((1, 16), np.float32), None)
    (out / STAGING / ("f" * 32 + ".npz")).write_bytes(b"torn")
    digest = sync_module.file_hash(photos / "new.png")
    sync_module.Staging(out, Manifest.read(out).model_id, False).write(
        [digest], np.ones((1, 16), np.float32), None
    )  # without the states this folder keeps
    report = sync_images(out, photos)
    assert report.added == 1 and encodes == ["new.png"]
    like_a_fresh_build(out, photos, model_dir, tmp_path)


def test_a_vanished_or_empty_folder_is_refused(photos, model_dir, tmp_path):
    out = tmp_path / "ix"
    build(out, photos, model_dir)
    version = Manifest.read(out).version
    photos.rename(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="not found.*would remove its 8 indexed image"):
        sync_images(out, photos)
    photos.mkdir()
    with pytest.raises(DataError, match="no images.*would remove its 8"):
        sync_images(out, photos)
    (photos / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="nothing synced"):
        sync_images(out, photos)
    assert Manifest.read(out).version == version
    assert IndexFolder.load(out).image_index.count == 8


def test_a_folder_that_is_not_a_root_is_refused(photos, model_dir, tmp_path):
    out = tmp_path / "ix"
    build(out, photos, model_dir)
    other = tmp_path / "other"
    photo(other / "o.png", 1)
    with pytest.raises(DataError, match="not a folder of this index.*--add"):
        sync_images(out, other)


def test_a_second_root_syncs_alone(photos, model_dir, tmp_path):
    from lightningdot.index.build import add_images

    out = tmp_path / "ix"
    build(out, photos, model_dir)
    more = tmp_path / "more"
    for n in range(3):
        photo(more / f"m{n}.png", 50 + n)
    add_images(out, more)
    (more / "m0.png").unlink()
    (photos / "p0.png").unlink()  # not this sync's folder: stays in the index
    report = sync_images(out, more)
    assert report.removed == 1
    ids = {it["id"] for it in IndexFolder.load(out).image_index.iterate()}
    assert "p0.png" in ids and "more/m0.png" not in ids and "more/m1.png" in ids


def annotations(path: Path, captions: dict[str, list[str]]) -> Path:
    entries = [
        {"filename": name, "split": "train", "sentences": [{"raw": c} for c in caps]}
        for name, caps in captions.items()
    ]
    path.write_text(json.dumps({"images": entries}))
    return path


def test_captions_move_with_their_image_and_follow_annotations(photos, model_dir, tmp_path):
    names = sorted(p.name for p in photos.iterdir())
    given = {name: [f"photo {name}", f"another of {name}"] for name in names}
    out = tmp_path / "ix"
    build(out, photos, model_dir, annotations=annotations(tmp_path / "a.json", given))
    (photos / "p3.png").rename(photos / "p3-moved.png")
    sync_images(out, photos)  # no annotations: captions stay with their images
    got = seen(out)
    assert got["captions"]["p3-moved.png#1"][0] == "another of p3.png"
    assert "p3.png#0" not in got["captions"] and len(got["captions"]) == 16

    given["p3-moved.png"] = given.pop("p3.png")
    given["p5.png"] = ["a new caption"]  # an unchanged file given new captions
    photo(photos / "p9.png", 9)
    given["p9.png"] = ["the newest"]
    ann = annotations(tmp_path / "b.json", given)
    report = sync_images(out, photos, ann)
    assert (report.added, report.touched) == (1, 1)
    got = like_a_fresh_build(out, photos, model_dir, tmp_path, annotations=ann)
    assert got["captions"]["p5.png#0"][0] == "a new caption" and "p5.png#1" not in got["captions"]


def test_fields_from_a_file_reach_new_and_unchanged_images(photos, model_dir, tmp_path):
    out = tmp_path / "ix"
    build(out, photos, model_dir)
    photo(photos / "new.png", 40)
    fields = tmp_path / "fields.jsonl"
    fields.write_text('{"path": "new.png", "stock": 3}\n{"path": "p2.png", "stock": 1}\n')
    report = sync_images(out, photos, fields_file=fields)
    assert (report.added, report.touched) == (1, 1)
    like_a_fresh_build(out, photos, model_dir, tmp_path, fields_file=fields)
    version = Manifest.read(out).version
    sync_images(out, photos, fields_file=fields)
    assert Manifest.read(out).version == version


def test_the_cli_prints_the_summary_and_refuses_add(photos, model_dir, tmp_path):
    from lightningdot.cli import app

    runner, out = CliRunner(), tmp_path / "ix"
    build(out, photos, model_dir)
    photo(photos / "a.png", 60)
    photo(photos / "p0.png", 61)
    bump(photos / "p0.png")
    (photos / "p1.png").unlink()
    (photos / "p2.png").rename(photos / "p2b.png")
    (photos / "bad.png").write_bytes(b"broken")
    args = ["index", "--out", str(out), "--images", str(photos), "--sync"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "+1 added, 1 changed, 1 removed, 1 moved, 1 unreadable; 8 in" in r.output
    assert "skipped 1 image(s) that do not decode" in r.output and "bad.png" in r.output
    for extra in (["--add"], ["--no-states"]):
        bad = runner.invoke(app, [*args, *extra])
        assert bad.exit_code == 2 and "--sync takes no" in bad.output
    shutil.rmtree(photos)
    gone = runner.invoke(app, args)
    assert gone.exit_code == 2 and "image folder not found" in gone.output
    assert "Traceback" not in gone.output


def test_staging_is_the_projects_own_and_nothing_else(tmp_path):
    folder = tmp_path / "ix"
    sync_module.Staging(folder, "m", False).write(["a" * 32], np.ones((1, 4), np.float32), None)
    check_buildable(folder)  # what a sync left is no reason to refuse a build
    (folder / STAGING / "mine.txt").write_text("a user's file")
    with pytest.raises(DataError, match="not empty"):
        check_buildable(folder)
    remove_staging(folder)
    assert [p.name for p in (folder / STAGING).iterdir()] == ["mine.txt"]
