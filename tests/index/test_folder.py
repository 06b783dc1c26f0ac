"""Index folders: built, grown without a rebuild, grown by two openers at once, refused to
another model."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lightningdot.config import IndexConfig
from lightningdot.data import Corpus, ImageRecord, read_karpathy
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features import FeatureStore
from lightningdot.index.build import build_index
from lightningdot.index.folder import IndexFolder, Rows
from lightningdot.index.record import Manifest
from lightningdot.model.checkpoint import load_model, model_identity
from lightningdot.model.encoders import BiEncoder
from lightningdot.retrieval import Retriever
from tests.helpers import as_older_layout, index_of_saved_model, tiny_model_config


def index_of_the_first(n, corpus_dir, store_dir, model_dir, out):
    """An index of the tiny corpus's first `n` images, to grow; returns the whole corpus."""
    full = read_karpathy(corpus_dir / "captions.json")
    first = Corpus(full.images[:n])
    index_of_saved_model(model_dir, first, corpus_dir, out, store_dir)
    return full


def test_add_grows_the_index_like_a_rebuild(corpus_dir, store_dir, model_dir, tmp_path):
    model = load_model(model_dir)
    store = FeatureStore(store_dir)
    full = index_of_the_first(6, corpus_dir, store_dir, model_dir, tmp_path / "grown")
    r = Retriever.open(tmp_path / "grown", mmap=False)
    assert r.add_collection(full, corpus_dir / "images", store).added == 6
    assert r.add_collection(full, corpus_dir / "images", store).added == 0  # nothing new
    build_index(
        model, str(model_dir), full, corpus_dir / "images", tmp_path / "whole", features=store
    )
    grown, whole = Retriever.open(tmp_path / "grown"), Retriever.open(tmp_path / "whole")
    q = ["a yellow picture"]
    assert [x.id for x in grown.search_text(q, 12)[0].results] == [
        x.id for x in whole.search_text(q, 12)[0].results
    ]
    assert len(grown.caption_index) == len(whole.caption_index) == 24


@pytest.mark.parametrize("at_once", [False, True], ids=["one-after-the-other", "at-once"])
def test_adds_from_two_openers_of_one_folder_both_stay(
    corpus_dir, store_dir, model_dir, tmp_path, at_once
):
    """Two processes adding to one index (`ldot index --add` beside a server): neither add may
    overwrite the other's, whatever the order."""
    store = FeatureStore(store_dir)
    full = index_of_the_first(4, corpus_dir, store_dir, model_dir, tmp_path / "ix")
    first, second = Retriever.open(tmp_path / "ix"), Retriever.open(tmp_path / "ix")
    halves = Corpus(full.images[4:8]), Corpus(full.images[8:])

    def add(r, part):
        return r.add_collection(part, corpus_dir / "images", store).added

    if at_once:
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(add, (first, second), halves)) == [4, 4]
    else:
        assert add(first, halves[0]) == 4
        assert add(second, halves[1]) == 4  # opened before the first add, never reloaded
    reopened = Retriever.open(tmp_path / "ix")
    assert sorted(it["id"] for it in reopened.image_index.items) == sorted(full.keys())
    assert len(reopened.caption_index) == len(full.captions)
    # The opener that saved last had caught up with the other's rows before adding its own.
    assert max(len(first.image_index), len(second.image_index)) == len(full.images)
    # An id another opener added meanwhile for another image is refused, not duplicated.
    taken = {"id": full.keys()[-1], "root": "images", "path": "elsewhere.png"}
    with pytest.raises(DataError, match="taken by another image"):
        first.index.append(Rows(np.zeros((1, first.image_index.dim), np.float32), [taken]))


def test_index_from_another_model_is_refused(corpus_dir, store_dir, model_dir, tmp_path):
    corpus = read_karpathy(corpus_dir / "captions.json")
    index_of_saved_model(model_dir, corpus, corpus_dir, tmp_path / "ix", store_dir)
    other = BiEncoder(tiny_model_config())
    torch.manual_seed(123)
    other.init_pretrained()
    with torch.no_grad():
        other.text.proj.weight.add_(1.0)
    assert model_identity(other) != model_identity(load_model(model_dir))
    with pytest.raises(ConfigMismatchError, match="rebuild"):
        Retriever.open(tmp_path / "ix", model=other)


def test_approximate_index_reports_recall(corpus_dir, store_dir, model_dir, tmp_path):
    corpus = read_karpathy(corpus_dir / "captions.json")
    rep = build_index(
        load_model(model_dir),
        str(model_dir),
        corpus,
        corpus_dir / "images",
        tmp_path / "ix",
        IndexConfig("HNSW8"),
        FeatureStore(store_dir),
    )
    assert rep.recall_at_10 is not None and 0.0 <= rep.recall_at_10 <= 1.0


def test_images_added_from_another_folder_are_found_again(corpus_dir, model_dir, tmp_path):
    """`ldot index --images more_photos/ --out INDEX --add`: thumbnails and re-ranking read
    the added images from their own folder, not the collection's."""
    from PIL import Image

    from lightningdot.config import RerankerConfig
    from lightningdot.model.checkpoint import save_reranker
    from lightningdot.model.reranker import Reranker

    index_of_the_first(4, corpus_dir, None, model_dir, tmp_path / "ix")
    more = tmp_path / "more_photos"
    more.mkdir()
    Image.new("RGB", (30, 30), "teal").save(more / "teal.png")
    save_reranker(
        tmp_path / "rr", Reranker(load_model(model_dir), RerankerConfig()), str(model_dir)
    )
    r = Retriever.open(tmp_path / "ix", reranker=str(tmp_path / "rr"))
    assert r.add_collection(Corpus([ImageRecord("teal.png")]), more).added == 1
    row = r.image_index.row("more_photos/teal.png")
    assert r.image_file(r.image_index.items[row]) == more / "teal.png"
    hits = r.search_text(["a teal picture"], k=5, rerank=5)[0].results  # reads every file
    assert "more_photos/teal.png" in [h.id for h in hits]


def png_bytes(colour: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, "PNG")
    return buf.getvalue()


def test_a_folder_of_the_older_layout_opens_and_moves_to_versions(corpus_dir, model_dir, tmp_path):
    full = index_of_the_first(4, corpus_dir, None, model_dir, tmp_path / "ix")
    older = as_older_layout(tmp_path / "ix", tmp_path / "older", {"upload-1.png": png_bytes("red")})
    (older / "images").rename(older / "images.old")  # killed inside the older layout's swap
    r = Retriever.open(older)
    assert len(r.image_index) == 5 and (older / "images").is_dir()
    upload = r.image_index.items[r.image_index.row("upload-1.png")]
    assert r.image_file(upload) == older / "uploads" / "upload-1.png"
    assert r.add_collection(full, corpus_dir / "images").added == 8
    assert Manifest.read(older).version == 1
    assert not (older / "images").exists() and not (older / "captions").exists()
    moved = shutil.move(older, tmp_path / "moved")  # uploads are found under the new place
    r = Retriever.open(moved)
    assert r.image_file(r.image_index.items[r.image_index.row("upload-1.png")]).is_file()


def test_an_add_rerun_over_the_older_layouts_half_commit_duplicates_nothing(
    corpus_dir, model_dir, tmp_path
):
    """Earlier releases saved captions, then images: a kill in between left captions of images
    not indexed. The same add run again adds the images and no caption twice."""
    full = index_of_the_first(6, corpus_dir, None, model_dir, tmp_path / "ix")
    index_of_the_first(4, corpus_dir, None, model_dir, tmp_path / "four")
    older = as_older_layout(tmp_path / "ix", tmp_path / "older")
    four = Manifest.read(tmp_path / "four").parts["images"]
    shutil.rmtree(older / "images")
    shutil.copytree(tmp_path / "four" / four, older / "images")  # 4 images, 12 captions
    r = Retriever.open(older)
    assert (len(r.image_index), len(r.caption_index)) == (4, 12)
    assert r.add_collection(Corpus(full.images[:6]), corpus_dir / "images").added == 2
    ids = [it["id"] for it in Retriever.open(older).caption_index.items]
    assert len(ids) == len(set(ids)) == 12


def test_the_same_name_in_two_folders_gets_two_ids(corpus_dir, model_dir, tmp_path):
    from PIL import Image

    index_of_the_first(4, corpus_dir, None, model_dir, tmp_path / "ix")
    for name, colour in [("a", "teal"), ("b", "navy")]:
        (tmp_path / name / "images").mkdir(parents=True)
        Image.new("RGB", (20, 20), colour).save(tmp_path / name / "images" / "img00.png")
    r = Retriever.open(tmp_path / "ix")
    corpus = Corpus([ImageRecord("img00.png")])
    assert r.add_collection(corpus, tmp_path / "a" / "images").added == 1
    assert r.add_collection(corpus, tmp_path / "b" / "images").added == 1
    assert r.add_collection(corpus, tmp_path / "b" / "images").added == 0  # the same one again
    files = {it["id"]: r.image_file(it) for it in r.image_index.items}
    assert files["img00.png"] == corpus_dir / "images" / "img00.png"
    assert files["images-2/img00.png"] == tmp_path / "a" / "images" / "img00.png"
    assert files["images-3/img00.png"] == tmp_path / "b" / "images" / "img00.png"


def test_a_build_refuses_a_folder_it_would_clobber(corpus_dir, model_dir, tmp_path):
    full = read_karpathy(corpus_dir / "captions.json")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty and not an index folder"):
        index_of_saved_model(model_dir, full, corpus_dir, tmp_path / "mine")
    index_of_saved_model(model_dir, full, corpus_dir, tmp_path / "ix")
    index_of_saved_model(model_dir, full, corpus_dir, tmp_path / "ix")  # a rebuild replaces it
    assert Manifest.read(tmp_path / "ix").version == 2
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == [".lock", "retriever.json", "v2"]
    Retriever.open(tmp_path / "ix").add_uploads([("a.png", png_bytes("teal"))])
    with pytest.raises(DataError, match="1 uploaded image"):
        index_of_saved_model(model_dir, full, corpus_dir, tmp_path / "ix")


def test_an_index_skips_and_names_images_that_do_not_decode(corpus_dir, model_dir, tmp_path):
    from typer.testing import CliRunner

    from lightningdot.cli import app

    (corpus_dir / "images" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "ix"
    args = ["index", "--images", str(corpus_dir / "images"), "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--model", str(model_dir)])
    assert r.exit_code == 0, r.output
    assert "skipped 1 image" in r.output and "broken.png" in r.output
    assert len(Retriever.open(out).image_index) == 12
    r = CliRunner().invoke(app, [*args, "--add"])
    assert r.exit_code == 0 and "added 0 new image(s); 12" in r.output, r.output


def test_a_build_refuses_a_file_or_an_unknown_factory_before_encoding(
    corpus_dir, model_dir, tmp_path
):
    full = read_karpathy(corpus_dir / "captions.json")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        index_of_saved_model(model_dir, full, corpus_dir, tmp_path / "a-file")
    with pytest.raises(DataError, match="could not parse index string NOPE"):
        build_index(
            load_model(model_dir),
            "m",
            full,
            corpus_dir / "images",
            tmp_path / "x",
            IndexConfig("NOPE"),
        )


def test_an_error_after_the_commit_keeps_what_it_committed(
    corpus_dir, model_dir, tmp_path, monkeypatch
):
    """A failure in the sweep after the record is replaced (a folder a sync tool made in
    uploads/, a Ctrl-C) must not undo the commit."""
    import lightningdot.index.storage as storage

    index_of_the_first(4, corpus_dir, None, model_dir, tmp_path / "ix")
    r = Retriever.open(tmp_path / "ix")
    r.add_uploads([("a.png", png_bytes("teal"))])
    (tmp_path / "ix" / "uploads" / ".stfolder").mkdir()  # not ours: left alone
    r.add_uploads([("b.png", png_bytes("navy"))])
    assert (tmp_path / "ix" / "uploads" / ".stfolder").is_dir()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "sweep_uploads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        r.add_uploads([("c.png", png_bytes("olive"))])
    assert len(r.image_index) == 7  # what was committed is live
    monkeypatch.undo()
    assert len(Retriever.open(tmp_path / "ix").image_index) == 7


def test_what_is_not_provably_ours_is_never_swept(corpus_dir, model_dir, tmp_path):
    full = read_karpathy(corpus_dir / "captions.json")
    photos = tmp_path / "photos"
    (photos / "v1").mkdir(parents=True)
    (photos / "v1" / "beach.jpg").write_bytes(b"a photo")
    with pytest.raises(DataError, match="not empty and not an index folder"):
        index_of_saved_model(model_dir, full, corpus_dir, photos)
    assert sorted(p.name for p in photos.rglob("*")) == ["beach.jpg", "v1"]  # no lock file
    index_of_saved_model(model_dir, full, corpus_dir, tmp_path / "ix")
    (tmp_path / "ix" / "v7").mkdir()
    (tmp_path / "ix" / "v7" / "notes.txt").write_text("mine")
    (tmp_path / "ix" / "v8" / "images").mkdir(parents=True)  # a killed writer's: swept
    Retriever.open(tmp_path / "ix")
    assert (tmp_path / "ix" / "v7" / "notes.txt").is_file() and not (
        tmp_path / "ix" / "v8"
    ).exists()


def test_uploads_of_the_older_layout_stay_where_their_paths_went_elsewhere(
    corpus_dir, model_dir, tmp_path
):
    """An older release recorded an upload by the path its uploads/ resolved to (a link to a
    bigger disk, say): found by its name in uploads/, and never swept."""
    index_of_the_first(4, corpus_dir, None, model_dir, tmp_path / "ix")
    older = as_older_layout(tmp_path / "ix", tmp_path / "older", {"upload-1.png": png_bytes("red")})
    items = json.loads((older / "images" / "items.json").read_text())
    items[-1]["path"] = "/elsewhere/disk/upload-1.png"
    (older / "images" / "items.json").write_text(json.dumps(items))
    r = Retriever.open(older)
    upload = r.image_index.items[r.image_index.row("upload-1.png")]
    assert r.image_file(upload) == older / "uploads" / "upload-1.png"
    assert (older / "uploads" / "upload-1.png").is_file()


def test_a_folder_is_not_held_while_an_add_encodes(corpus_dir, model_dir, tmp_path, monkeypatch):
    """A long `ldot index --add` must not block a server's uploads meanwhile."""
    from filelock import FileLock

    import lightningdot.index.build as build

    full = index_of_the_first(4, corpus_dir, None, model_dir, tmp_path / "ix")
    real = build.encode_readable

    def encode_and_check(*args, **kwargs):
        FileLock(tmp_path / "ix" / ".lock").acquire(timeout=0).lock.release()  # free
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "encode_readable", encode_and_check)
    assert Retriever.open(tmp_path / "ix").add_collection(full, corpus_dir / "images").added == 8


def test_an_image_is_indexed_once_whatever_folder_names_it(corpus_dir, model_dir, tmp_path):
    from PIL import Image

    index_of_the_first(4, corpus_dir, None, model_dir, tmp_path / "ix")
    r = Retriever.open(tmp_path / "ix")
    parent = Corpus([ImageRecord(f"images/img0{i}.png") for i in range(4)])
    assert r.add_collection(parent, corpus_dir).added == 0  # the collection's parent folder
    # A folder named like a subfolder of the collection gets a root name no id starts with.
    (corpus_dir / "images" / "more").mkdir()
    Image.new("RGB", (9, 9), "teal").save(corpus_dir / "images" / "more" / "a.png")
    r.add_collection(Corpus([ImageRecord("more/a.png")]), corpus_dir / "images")
    (tmp_path / "more").mkdir()
    Image.new("RGB", (9, 9), "navy").save(tmp_path / "more" / "a.png")
    assert r.add_collection(Corpus([ImageRecord("a.png")]), tmp_path / "more").added == 1
    assert r.image_index.row("more-2/a.png") is not None


@pytest.mark.parametrize(
    "record",
    [
        {"format": 2, "model": "m", "model_id": "x", "parts": {"images": "../../etc"}},
        {"format": 2, "model": "m", "model_id": "x", "parts": {"images": "/etc"}},
        {"format": 2, "model": "m", "model_id": "x", "parts": {}, "features": 5},
        {"format": 2, "model": "m", "model_id": "x", "parts": {"images": "v1/images"}, "x": 1},
        {"format": 2, "model": 5, "model_id": "x"},
        {"model": "m", "model_id": "x", "images": ["a"]},
        [1, 2],
    ],
)
def test_a_damaged_record_is_refused_by_name(tmp_path, record):
    (tmp_path / "retriever.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="damaged index folder record|not an index folder"):
        IndexFolder.load(tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta, items: meta.pop("dim"),
        lambda meta, items: items[0].pop("id"),
        lambda meta, items: items[0].update(path=5),
        lambda meta, items: meta.update(config={"nope": 1}),
    ],
)
def test_damaged_index_metadata_is_refused_by_name(corpus_dir, model_dir, tmp_path, damage):
    index_of_the_first(2, corpus_dir, None, model_dir, tmp_path / "ix")
    part = tmp_path / "ix" / Manifest.read(tmp_path / "ix").parts["images"]
    meta, items = (json.loads((part / f).read_text()) for f in ("index.json", "items.json"))
    damage(meta, items)
    (part / "index.json").write_text(json.dumps(meta))
    (part / "items.json").write_text(json.dumps(items))
    with pytest.raises(DataError, match="damaged"):
        IndexFolder.load(tmp_path / "ix")
