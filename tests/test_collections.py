"""Collections that change: deletes, metadata filters, pages of results, through the Retriever."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lightningdot.data import read_karpathy
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore
from lightningdot.index.filters import FilterError
from lightningdot.index.record import Manifest
from lightningdot.model.checkpoint import load_model
from lightningdot.retrieval import Page, Retriever
from tests.helpers import index_of_saved_model


@pytest.fixture(params=["faiss", "milvus"])
def opened(request, corpus_dir, store_dir, model_dir, tmp_path):
    """An index folder of the corpus, opened, on each backend."""
    corpus = read_karpathy(corpus_dir / "captions.json")
    milvus = None
    if request.param == "milvus":
        from lightningdot.index.milvus import MilvusTarget

        milvus = MilvusTarget(str(tmp_path / "milvus.db"))
    index_of_saved_model(model_dir, corpus, corpus_dir, tmp_path / "ix", store_dir, milvus)
    model = load_model(model_dir)
    with torch.no_grad():
        image = model.encode_image(FeatureStore(store_dir).batch(corpus.keys()))
    return Retriever.open(tmp_path / "ix"), corpus, model, image


def exact_ids(model, image, keys, query, allowed):
    with torch.no_grad():
        scores = (model.encode_text([query]) @ image.T)[0].numpy()
    order = [j for j in np.argsort(-scores, kind="stable") if allowed(keys[j])]
    return [keys[j] for j in order], scores


def test_a_filtered_page_is_brute_force_over_the_items_that_pass(opened):
    r, corpus, model, image = opened
    keys = corpus.keys()
    want, scores = exact_ids(model, image, keys, "a red picture", lambda k: k.startswith("img0"))
    page = Page(filter='{"path": {"prefix": "img0"}}')
    got = r.search_text(["a red picture"], k=5, page=page)[0].results
    assert [x.id for x in got] == want[:5]
    second = r.search_text(["a red picture"], k=3, page=Page(page.filter, offset=3))[0].results
    assert [x.id for x in second] == want[3:6]
    floor = float(np.sort(scores)[-4])
    high = r.search_text(["a red picture"], k=10, page=Page(min_score=floor))[0].results
    assert len(high) == 4 and all(x.score >= floor for x in high)


def test_the_built_in_fields_are_recorded_at_index_time(opened):
    r, *_ = opened
    item = r.image_index.get("img00.png")
    assert item["meta"]["width"] == 32 and item["meta"]["height"] == 24
    assert item["meta"]["size"] > 0 and item["meta"]["mtime"] > 0
    found = r.search_text(["red"], k=20, page=Page(filter={"width": {"gte": 33}}))[0]
    assert found.results == []


def test_bad_filters_and_offsets_are_refused(opened):
    r, *_ = opened
    with pytest.raises(FilterError, match="'colour'"):
        r.search_text(["red"], page=Page(filter={"colour": "red"}))
    with pytest.raises(DataError, match="offset"):
        r.search_text(["red"], page=Page(offset=-1))
    r.reranker = object()  # any re-ranker: the page is refused before it is used
    with pytest.raises(DataError, match=r"offset \+ k \(12\) must be at most rerank \(10\)"):
        r.search_text(["red"], k=4, rerank=10, page=Page(offset=8))


def test_an_image_query_filters_captions_by_their_image(opened, corpus_dir):
    r, *_ = opened
    page = Page(filter={"path": {"in": ["img03.png", "img05.png"]}})
    (answer,) = r.search_image_all([corpus_dir / "images" / "img02.png"], k=10, page=page)
    assert {x.id.split("#")[0] for x in answer.captions} == {"img03.png", "img05.png"}
    assert {x.id for x in answer.images} == {"img03.png", "img05.png"}


def faiss_file(r: Retriever):
    return r.folder / Manifest.read(r.folder).parts["images"] / "index.faiss"


def test_deleted_images_and_their_captions_are_gone_for_good(opened, corpus_dir):
    r, corpus, *_ = opened
    on_faiss = r.index.manifest.backend is None
    before = faiss_file(r).stat().st_ino if on_faiss else None
    r.delete(["img01.png", "img02.png"])
    if on_faiss:  # linked into the new version, not rewritten
        assert faiss_file(r).stat().st_ino == before
    assert r.image_index.count == len(corpus.images) - 2
    for index in (r, Retriever.open(r.folder)):
        hits = index.search_text(["a green picture"], k=20)[0].results
        assert {"img01.png", "img02.png"}.isdisjoint(x.id for x in hits)
        assert len(hits) == len(corpus.images) - 2
        (caps,) = index.search_image([corpus_dir / "images" / "img01.png"], k=30)
        assert {x.id.split("#")[0] for x in caps.results}.isdisjoint({"img01.png", "img02.png"})
    with pytest.raises(DataError, match="not in the index"):
        r.delete(["img01.png"])
    with pytest.raises(DataError, match="not in the index"):
        r.delete(["img03.png", "nope.png"])
    assert r.image_index.get("img03.png") is not None  # all or none


def answers(r: Retriever, corpus_dir) -> list:
    texts = r.search_text(["a green picture", "something red"], k=20)
    (images,) = r.search_image([corpus_dir / "images" / "img02.png"], k=30)
    return [[(x.id, round(x.score, 5)) for x in a.results] for a in [*texts, images]]


def test_a_compaction_drops_deleted_rows_and_changes_no_answer(opened, corpus_dir):
    r, corpus, *_ = opened
    r.delete(["img01.png", "img05.png"])
    before = answers(r, corpus_dir)
    assert r.index.compact() == 6  # 2 images and their 2 captions each
    assert r.index.compact() == 0
    for index in (r, Retriever.open(r.folder)):
        assert answers(index, corpus_dir) == before
        assert index.image_index.count == len(corpus.images) - 2
    if r.index.manifest.backend is None:  # FAISS: the rows are gone from the files
        assert len(r.image_index) == r.image_index.count and r.image_index.deleted is None
        assert len(r.index.states) == r.image_index.count
    else:  # Milvus: no retired row is left to purge
        name = r.index.manifest.backend["collections"]["images"]
        rows = r.index.client.query(name, filter="gone != 0", output_fields=["count(*)"])
        assert rows[0]["count(*)"] == 0
    r.delete(["img02.png"])  # and it goes on changing
    assert r.image_index.count == len(corpus.images) - 3


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    return buf.getvalue()


def test_deleting_an_upload_removes_its_file_and_it_can_come_back(opened):
    r, *_ = opened
    ((upload, added),) = r.add_uploads([("x.png", png("orange"))]).images
    assert added and (r.folder / "uploads" / upload).is_file()
    assert r.image_index.get(upload)["meta"]["width"] == 16
    r.delete([upload])
    assert not (r.folder / "uploads" / upload).exists()
    ((again, added),) = r.add_uploads([("x.png", png("orange"))]).images
    assert again == upload and added and (r.folder / "uploads" / upload).is_file()


def test_the_cli_filters_pages_and_deletes(opened):
    from typer.testing import CliRunner

    from lightningdot.cli import app

    r, corpus, model, image = opened
    runner, folder = CliRunner(), str(r.folder)
    want, _ = exact_ids(model, image, corpus.keys(), "red", lambda k: k.startswith("img0"))
    args = ["search", folder, "red", "--k", "3", "--json", "--offset", "1"]
    out = runner.invoke(app, [*args, "--filter", '{"path": {"prefix": "img0"}}'])
    assert out.exit_code == 0, out.output
    assert [x["id"] for x in json.loads(out.stdout)["results"]] == want[1:4]
    bad = runner.invoke(app, [*args, "--filter", '{"colour": "red"}'])
    assert bad.exit_code == 2 and "unknown filter field 'colour'" in bad.output
    gone = runner.invoke(app, ["delete", folder, "img00.png", "img01.png"])
    assert gone.exit_code == 0 and "deleted 2 image(s); 10 left" in gone.output
    again = runner.invoke(app, ["delete", folder, "img01.png"])
    assert again.exit_code == 2 and "not in the index" in again.output
    compacted = runner.invoke(app, ["compact", folder])
    assert compacted.exit_code == 0 and "dropped 6 deleted row(s); 10 image(s)" in compacted.output
    assert Retriever.open(folder).image_index.count == 10


def test_updated_fields_are_filtered_on_and_kept(opened):
    r, *_ = opened
    assert r.update_fields("img03.png", {"stock": 4, "label": "sale"})["stock"] == 4
    r.update_fields("img05.png", {"stock": 1})
    page = Page(filter={"stock": {"gte": 2}})
    assert [x.id for x in r.search_text(["red"], k=20, page=page)[0].results] == ["img03.png"]
    fields = r.update_fields("img03.png", {"label": None})
    assert "label" not in fields and fields["stock"] == 4 and fields["width"] == 32
    reopened = Retriever.open(r.folder)
    hits = reopened.search_text(["red"], k=20, page=Page(filter={"stock": {"lt": 2}}))[0]
    assert [x.id for x in hits.results] == ["img05.png"]


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"path": "x.jpg"}, "follows the image's file"),
        ({"bad name": 1}, "plain identifier"),
        ({"tags": ["a", "b"]}, "not text, a finite number or null"),
        ({"ok": True}, "not text"),
        ([1, 2], "JSON object"),
    ],
)
def test_fields_that_cannot_be_set_are_refused_and_nothing_changes(opened, fields, says):
    r, *_ = opened
    version = Manifest.read(r.folder).version
    with pytest.raises(DataError, match=says):
        r.update_fields("img03.png", fields)
    with pytest.raises(DataError, match="no image"):
        r.update_fields("nope.png", {"stock": 1})
    assert Manifest.read(r.folder).version == version


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_fields_from_a_file_at_index_time_with_bad_rows_named(
    corpus_dir, store_dir, model_dir, tmp_path, kind
):
    from typer.testing import CliRunner

    from lightningdot.cli import app

    if kind == "jsonl":
        lines = [
            '{"path": "img01.png", "stock": 3, "label": "sale"}',
            '{"path": "img02.png", "stock": 0}',
            "{broken",
            '{"path": "img03.png", "tags": ["a"]}',
            '{"path": "missing.png", "stock": 1}',
        ]
    else:
        lines = [
            "path,stock,label",
            "img01.png,3,sale",
            "img02.png,0,",
            "img03.png,1,x,extra",
            "missing.png,1,",
            ",5,sale",
        ]
    fields = tmp_path / f"fields.{kind}"
    fields.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ix"
    args = ["index", "--out", str(out), "--images", str(corpus_dir / "images"), "--model"]
    args += [str(model_dir), "--features", str(store_dir), "--metadata", str(fields)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "skipped 3 metadata row(s)" in r.output and "missing.png" in r.output
    assert "line 4" in r.output
    index = Retriever.open(out)
    page = Page(filter={"stock": {"gte": 1}, "label": "sale"})
    assert [x.id for x in index.search_text(["red"], k=20, page=page)[0].results] == ["img01.png"]
    meta = index.image_index.get("img02.png")["meta"]
    assert meta["stock"] == 0 and "label" not in meta and meta["width"] == 32


def test_a_delete_and_an_add_from_two_openers_both_stay(opened, corpus_dir, store_dir):
    from lightningdot.data import Corpus

    r, corpus, *_ = opened
    first, second = Retriever.open(r.folder), Retriever.open(r.folder)
    first.delete(["img00.png", "img01.png"])
    # The second opened before the delete and never reloaded: it catches up before it writes.
    with pytest.raises(DataError, match="not in the index"):
        second.delete(["img05.png", "img01.png"])
    more = Corpus(read_karpathy(corpus_dir / "captions.json").images[:2])
    assert second.add_collection(more, corpus_dir / "images", FeatureStore(store_dir)).added == 2
    reopened = Retriever.open(r.folder)
    assert reopened.image_index.count == len(corpus.images)
    assert reopened.image_index.get("img00.png") is not None  # added again, after its delete


def test_an_upsert_replaces_an_image_and_its_captions_in_one_commit(opened, corpus_dir):
    from lightningdot.index.build import caption_items
    from lightningdot.index.folder import Rows

    r, corpus, model, _ = opened
    folder, root = r.index, r.index.manifest.primary_root
    vectors, states = r._rows_of([corpus_dir / "images" / "img05.png"])  # img03 takes its look
    item = {"id": "img03.png", "root": root, "path": "img03.png", "captions": ["a new caption"]}
    with torch.no_grad():
        text = model.encode_text(["a new caption"]).numpy()
    where = (root, str(folder.root_folder(root)))
    rows = Rows(vectors, [item], (text, caption_items([item])), where, states=states)
    assert folder.append(rows, replace=True) == [True]
    for index in (r, Retriever.open(r.folder)):
        assert index.image_index.count == len(corpus.images)
        (similar,) = index.search_image([corpus_dir / "images" / "img05.png"], 2, "images")
        top = similar.results[0]  # the query's own vector now: a dot product of 1
        assert top.id == "img03.png" and top.score == pytest.approx(1.0, abs=1e-4)
        captions = index.caption_index
        assert captions.get("img03.png#1") is None
        assert captions.get("img03.png#0")["caption"] == "a new caption"
        assert captions.count == len(corpus.captions) - 1


def test_a_first_delete_in_a_folder_of_the_older_layout_keeps_its_uploads(opened, tmp_path):
    from lightningdot.index.folder import IndexFolder
    from tests.helpers import as_older_layout

    r, *_ = opened
    if r.index.manifest.backend is not None:
        pytest.skip("the older layout is a FAISS folder's")
    older = as_older_layout(r.folder, tmp_path / "older", {"upload-1.png": png("red")})
    IndexFolder.load(older).delete(["img04.png"])
    reopened = Retriever.open(older)  # opening sweeps uploads no item holds
    item = reopened.image_index.get("upload-1.png")
    assert item["root"] == "uploads" and (older / "uploads" / "upload-1.png").is_file()
    assert reopened.image_index.get("img04.png") is None


def test_an_image_query_pages_and_explains_the_same_captions(opened, corpus_dir):
    r, *_ = opened
    query = [corpus_dir / "images" / "img02.png"]
    everything = r.search_image(query, k=8)[0].results
    (page,) = r.search_image(query, k=3, explain=True, page=Page(offset=4))
    assert [x.id for x in page.results] == [x.id for x in everything[4:7]]
    assert all(x.tokens is not None for x in page.results)
