"""The two backends behind one interface: FAISS and Milvus (milvus-lite, in a temporary
folder) return what brute force over the same vectors returns, with and without a filter,
before and after deletes and upserts, and after a reopen."""

import json

import numpy as np
import pytest
import torch

from lightningdot.data import read_karpathy
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features import FeatureStore
from lightningdot.index.build import build_index
from lightningdot.index.engines import load_index, open_index
from lightningdot.index.filters import parse_filter
from lightningdot.index.folder import Rows
from lightningdot.index.metadata import MetadataColumns, item_fields
from lightningdot.index.record import Manifest
from lightningdot.model.checkpoint import index_identity, load_model
from lightningdot.model.prior import QueryBank, gallery_side, hub_prior

pytest.importorskip("milvus_lite")
from lightningdot.index.milvus import MilvusTarget, connect  # noqa: E402

BACKENDS = ["faiss", "milvus"]


def unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture
def model(model_dir):
    m = load_model(model_dir)
    d = m.cfg.embed_dim
    m.bank = QueryBank(unit(6, d, 1), unit(5, d, 2), beta=4.0)
    return m


def build(model, corpus_dir, store_dir, out, backend, collection=None):
    corpus = read_karpathy(corpus_dir / "captions.json")
    target = (
        MilvusTarget(str(out.parent / "milvus.db"), collection) if backend == "milvus" else None
    )
    store = FeatureStore(store_dir)
    images = corpus_dir / "images"
    build_index(model, "tiny", corpus, images, out, features=store, states=False, milvus=target)
    return open_index(out, model)


class BruteForce:
    """Exact ranking over the model's own vectors and priors, in plain torch."""

    def __init__(self, model, store_dir, keys):
        with torch.no_grad():
            self.images = model.encode_image(FeatureStore(store_dir).batch(keys))
        self.keys, self.model = list(keys), model
        bank = model.bank
        self.prior = hub_prior(self.images, bank.text, bank.beta)

    def text(self, query, allowed=lambda key: True):
        with torch.no_grad():
            q = self.model.encode_text([query])[0]
        scores = (gallery_side(self.images, self.prior) @ torch.cat([q, torch.ones(1)])).numpy()
        order = [j for j in np.argsort(-scores, kind="stable") if allowed(self.keys[j])]
        return [(self.keys[j], float(scores[j])) for j in order]


def ranked(index, query_vec, k, where=None, target="images", with_prior=True):
    (hits,) = index.live.search(target, query_vec[None], k, where, with_prior)
    return [(h.item["id"], h.score) for h in hits]


def assert_same(got, want):
    """The same scores, and each id with its own score (ties in either order)."""
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)
    score_of = dict(want + [w for w in want])
    assert len({g[0] for g in got}) == len(got)
    for item_id, score in got:
        assert item_id in score_of and abs(score_of[item_id] - score) < 1e-5, item_id


def query_vector(model, text):
    with torch.no_grad():
        return model.encode_text([text]).numpy()[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_is_brute_force_with_filters_deletes_upserts_and_a_reopen(
    backend, model, corpus_dir, store_dir, tmp_path, monkeypatch
):
    import lightningdot.index.milvus as milvus

    monkeypatch.setattr(milvus, "BATCH", 5)  # rows inserted and read a few at a time
    index = build(model, corpus_dir, store_dir, tmp_path / "ix", backend)
    keys = sorted(p.name for p in (corpus_dir / "images").iterdir())
    exact = BruteForce(model, store_dir, keys)
    q = query_vector(model, "a red picture")
    assert_same(ranked(index, q, 5), exact.text("a red picture")[:5])
    where = parse_filter(
        {"path": {"in": ["img01.png", "img04.png", "img09.png"]}}, index.live.images.kinds
    )
    allowed = {"img01.png", "img04.png", "img09.png"}
    assert_same(ranked(index, q, 10, where), exact.text("a red picture", allowed.__contains__))

    index.delete(["img04.png", "img07.png"])
    gone = {"img04.png", "img07.png"}
    assert index.live.images.count == len(keys) - 2
    assert index.live.images.get("img04.png") is None
    assert_same(ranked(index, q, 20), exact.text("a red picture", lambda k: k not in gone))
    assert_same(
        ranked(index, q, 10, where), exact.text("a red picture", lambda k: k in allowed - gone)
    )
    caption_images = {h[0].split("#")[0] for h in ranked(index, q, 50, target="captions")}
    assert caption_images.isdisjoint(gone)

    # An upsert: img01.png takes img02.png's vector, its captions replaced.
    moved = exact.images[keys.index("img02.png")].numpy()[None]
    item = {**index.live.images.get("img01.png"), "meta": {"colour": "blue"}}
    captions = (
        query_vector(model, "a new caption")[None],
        [{"id": "img01.png#0", "image": "img01.png", "caption": "a new caption"}],
    )
    index.append(Rows(moved, [item], captions), replace=True)
    exact.images[keys.index("img01.png")] = exact.images[keys.index("img02.png")]
    exact.prior = hub_prior(exact.images, model.bank.text, model.bank.beta)
    assert_same(ranked(index, q, 20), exact.text("a red picture", lambda k: k not in gone))
    assert index.live.images.get("img01.png")["meta"] == {"colour": "blue"}
    assert index.live.captions.get("img01.png#1") is None
    blue = parse_filter({"colour": "blue"}, index.live.images.kinds)
    assert [h[0] for h in ranked(index, q, 10, blue)] == ["img01.png"]
    assert [h[0] for h in ranked(index, q, 10, blue, "captions")] == ["img01.png#0"]

    index.update_fields("img03.png", {"colour": "green"})
    reopened = load_index(tmp_path / "ix", index_identity(model))
    assert_same(ranked(reopened, q, 20), exact.text("a red picture", lambda k: k not in gone))
    green = parse_filter({"colour": {"ne": "blue"}}, reopened.live.images.kinds)
    assert [h[0] for h in ranked(reopened, q, 10, green)] == ["img03.png"]
    ids = sorted(it["id"] for it in reopened.live.images.iterate())
    assert ids == sorted(set(keys) - gone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_queries_rank_captions_with_their_prior_and_images_without(
    backend, model, corpus_dir, store_dir, tmp_path
):
    index = build(model, corpus_dir, store_dir, tmp_path / "ix", backend)
    image = BruteForce(model, store_dir, ["img02.png"]).images[0].numpy()
    corpus = read_karpathy(corpus_dir / "captions.json")
    with torch.no_grad():
        text = model.encode_text(corpus.captions)
    prior = hub_prior(text, model.bank.image, model.bank.beta)
    scores = (text @ torch.from_numpy(image) + prior).numpy()
    want = np.argsort(-scores, kind="stable")[:5]
    got = ranked(index, image, 5, target="captions")
    np.testing.assert_allclose([s for _, s in got], scores[want], atol=1e-5)
    plain = ranked(index, image, 1, target="images", with_prior=False)
    assert plain[0][0] == "img02.png" and abs(plain[0][1] - float(image @ image)) < 1e-5


def random_items(n, seed):
    rng = np.random.default_rng(seed)
    folders = ["", "a/", "a/b/", "ab/", "b%_/"]
    items = []
    for i in range(n):
        meta = {}
        if rng.random() < 0.8:
            meta["size"] = int(rng.integers(0, 50))
        if rng.random() < 0.7:
            meta["taken"] = float(rng.integers(0, 10)) * 86400.0
        if rng.random() < 0.7:
            meta["camera"] = str(rng.choice(["X100V", "EOS", "é-cam", 'say "cheese"']))
        path = f"{folders[i % len(folders)]}img{i}.png"
        items.append({"id": path, "path": path, "meta": meta})
    return items


CONDITIONS = [
    {"camera": "EOS"},
    {"camera": {"ne": "EOS"}},
    {"camera": {"in": ["X100V", 'say "cheese"', "é-cam"]}},
    {"size": {"gt": 20}},
    {"size": {"gte": 20, "lt": 30}},
    {"size": {"lte": 3}},
    {"size": {"in": [1, 2, 3]}},
    {"size": 7},
    {"size": {"ne": 7}},
    {"taken": {"gte": "1970-01-03", "lt": "1970-01-06T00:00:00"}},
    {"folder": {"prefix": "a/"}},
    {"folder": {"prefix": "b%_"}},
    {"path": {"prefix": ""}},
    {"folder": ""},
]


@pytest.mark.parametrize("typed", [True, False], ids=["typed column", "json key"])
@pytest.mark.parametrize("spec", CONDITIONS, ids=json.dumps)
def test_milvus_expressions_select_what_the_masks_select(spec, typed, tmp_path):
    """Each operator's Milvus expression, on a field's typed column and on its JSON key,
    against `Filter.mask` over random metadata."""
    from lightningdot.config import IndexConfig
    from lightningdot.index.milvus import (
        MilvusItems,
        assign_slots,
        collection_rows,
        create_collection,
    )

    items = random_items(200, 0)
    columns = MetadataColumns(items)
    where = parse_filter(spec, columns.kinds)
    slots = assign_slots(columns.kinds, {})["slots"] if typed else {}
    client = connect(str(tmp_path / "f.db"))
    create_collection(client, "t", 4, IndexConfig(), "m", tmp_path)
    vectors = np.ones((len(items), 4), np.float32)
    fields = [item_fields(it) for it in items]
    client.insert("t", collection_rows(vectors, items, fields, 1, None, slots))
    view = MilvusItems(client, "t", 1, "m", columns.kinds, None, slots)
    got = {it["id"] for it in view.iterate(where.expression(slots))}
    want = {it["id"] for it, keep in zip(items, where.mask(columns), strict=True) if keep}
    assert got == want


def test_slots_follow_the_kinds_of_fields_and_are_never_reused():
    from lightningdot.index.milvus import SLOTS, assign_slots

    backend = assign_slots({"size": "number", "camera": "text", "stock": "number"}, {})
    assert backend["slots"] == {"size": "n0", "camera": "t0", "stock": "n1"}
    turned = assign_slots({"stock": "text", "price": "number"}, backend)
    assert turned["slots"]["stock"] == "t1" and turned["spent"] == ["n1"]
    assert turned["slots"]["price"] == "n2"  # n1 holds stock's old numbers: never reused
    many = assign_slots({f"f{i}": "number" for i in range(40)}, {})
    assert len(many["slots"]) == SLOTS["n"]  # the rest are filtered on their JSON keys


def test_a_milvus_uri_that_cannot_be_reached_is_refused_and_nothing_is_made(
    model, corpus_dir, store_dir, tmp_path
):
    corpus = read_karpathy(corpus_dir / "captions.json")
    for uri, why in [
        ("http://127.0.0.1:1", "cannot reach Milvus at http://127.0.0.1:1"),
        (str(tmp_path / "nowhere" / "m.db"), "its folder does not exist"),
        (str(tmp_path / "m.sqlite"), "ends in .db"),
    ]:
        with pytest.raises(DataError, match=why):
            build_index(
                model,
                "tiny",
                corpus,
                corpus_dir / "images",
                tmp_path / "ix",
                milvus=MilvusTarget(uri),
            )
        assert not (tmp_path / "ix").exists()


def test_collections_of_another_model_or_taken_names_are_refused(
    model, model_dir, corpus_dir, store_dir, tmp_path
):
    index = build(model, corpus_dir, store_dir, tmp_path / "ix", "milvus", "shared")
    names = index.manifest.backend["collections"]
    with pytest.raises(DataError, match="shared_images_v1 exists already"):
        build(model, corpus_dir, store_dir, tmp_path / "other", "milvus", "shared")
    assert not (tmp_path / "other" / "retriever.json").exists()
    assert index.live.images.count == 12
    with pytest.raises(ConfigMismatchError, match="made by model"):
        load_index(tmp_path / "ix", "another-model")
    client = connect(str(tmp_path / "milvus.db"))
    assert set(client.list_collections()) == set(names.values())


def test_a_rebuild_replaces_the_collections_and_drops_the_old_ones(
    model, corpus_dir, store_dir, tmp_path
):
    first = build(model, corpus_dir, store_dir, tmp_path / "ix", "milvus")
    old = set(first.manifest.backend["collections"].values())
    second = build(model, corpus_dir, store_dir, tmp_path / "ix", "milvus")
    new = set(second.manifest.backend["collections"].values())
    client = connect(str(tmp_path / "milvus.db"))
    assert old.isdisjoint(new) and set(client.list_collections()) == new
    # And back to FAISS: the Milvus collections go with the rebuild.
    build(model, corpus_dir, store_dir, tmp_path / "ix", "faiss")
    assert client.list_collections() == []
    assert Manifest.read(tmp_path / "ix").backend is None


def test_a_writer_killed_before_its_commit_leaves_the_old_version(
    model, corpus_dir, store_dir, tmp_path, monkeypatch
):
    """What a killed writer left in Milvus (rows inserted, rows marked gone) is invisible to
    searches and undone by the next writer."""
    import lightningdot.index.milvus as milvus

    index = build(model, corpus_dir, store_dir, tmp_path / "ix", "milvus")
    q = query_vector(model, "a red picture")
    before = ranked(index, q, 20)

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(milvus, "commit", killed)
    monkeypatch.setattr(milvus.MilvusFolder, "_recover", lambda self: None)  # no time to undo
    with pytest.raises(Killed):
        index.delete(["img00.png", "img03.png"])
    item = {**index.live.images.get("img05.png"), "meta": {"x": 1}}
    with pytest.raises(Killed):
        index.append(Rows(np.zeros((1, model.cfg.embed_dim), np.float32), [item]), replace=True)
    assert_same(ranked(index, q, 20), before)
    monkeypatch.undo()
    reopened = load_index(tmp_path / "ix", index_identity(model))
    assert_same(ranked(reopened, q, 20), before)
    client = connect(str(tmp_path / "milvus.db"))
    name = reopened.manifest.backend["collections"]["images"]
    assert client.query(name, filter="batch > 1 or gone > 0", output_fields=["pk"]) == []
    reopened.delete(["img00.png"])
    assert reopened.live.images.count == 11


def test_the_cli_builds_searches_and_deletes_on_milvus(model_dir, corpus_dir, store_dir, tmp_path):
    from typer.testing import CliRunner

    from lightningdot.cli import app

    runner, out, db = CliRunner(), str(tmp_path / "ix"), str(tmp_path / "m.db")
    common = ["--images", str(corpus_dir / "images"), "--model", str(model_dir)]
    common += ["--features", str(store_dir)]
    r = runner.invoke(app, ["index", "--out", out, *common, "--backend", "milvus", "--uri", db])
    assert r.exit_code == 0, r.output
    assert "12 images" in r.output
    found = runner.invoke(
        app, ["search", out, "red", "--json", "--filter", '{"path": {"prefix": "img1"}}']
    )
    assert found.exit_code == 0, found.output
    ids = [x["id"] for x in json.loads(found.stdout)["results"]]
    assert sorted(ids) == ["img10.png", "img11.png"]
    gone = runner.invoke(app, ["delete", out, "img10.png"])
    assert gone.exit_code == 0 and "11 left" in gone.output
    for args, says in [
        (["--backend", "milvus"], "needs --uri"),
        (["--uri", db], "go with --backend milvus"),
        (["--backend", "chroma"], "faiss or milvus"),
        (["--backend", "milvus", "--uri", db, "--factory", "HNSW32"], "'Flat' or 'IVF<n>,Flat'"),
    ]:
        bad = runner.invoke(app, ["index", "--out", str(tmp_path / "new"), *common, *args])
        assert bad.exit_code == 2 and says in bad.output, bad.output


def test_a_milvus_collection_built_before_the_concept_view_is_searched_by_the_main_vectors(
    model, corpus_dir, store_dir, tmp_path
):
    from tests.helpers import concept_view

    index = build(model, corpus_dir, store_dir, tmp_path / "ix", "milvus", "before_view")
    with torch.no_grad():
        query = model.encode_text(["a red picture"])[0]
    before = ranked(index, query, 4)
    model.concepts = concept_view()
    assert model.vector_dim > index.image_index.dim
    with pytest.warns(UserWarning, match="without the model's concept view"):
        reopened = open_index(tmp_path / "ix", model)
    assert model.concepts is None and reopened.image_index.dim == model.vector_dim
    assert_same(ranked(reopened, query, 4), before)
