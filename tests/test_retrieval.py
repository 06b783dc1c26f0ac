import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lightningdot.cli import app
from lightningdot.config import IndexConfig
from lightningdot.data import Corpus, read_karpathy
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features import FeatureStore
from lightningdot.index.folder import build_index
from lightningdot.model.checkpoint import model_identity, save_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.retrieval import Retriever
from tests.helpers import tiny_model_config

runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path):
    m = BiEncoder(tiny_model_config())
    m.init_pretrained()
    save_model(tmp_path / "model", m.eval())
    return tmp_path / "model"


def open_model(model_dir):
    from lightningdot.model.checkpoint import load_model

    return load_model(model_dir)


def test_text_search_matches_exact_scores(corpus_dir, store_dir, model_dir, tmp_path):
    model = open_model(model_dir)
    corpus = read_karpathy(corpus_dir / "captions.json")
    store = FeatureStore(store_dir)
    build_index(
        model, str(model_dir), corpus, corpus_dir / "images", tmp_path / "ix", features=store
    )
    r = Retriever.open(tmp_path / "ix")
    queries = ["a red picture", "something blue"]
    answers = r.search_text(queries, k=5)
    with torch.no_grad():
        t = model.encode_text(queries)
        i = model.encode_image(store.batch(corpus.keys()))
    exact = (t @ i.T).numpy()
    for q, a in enumerate(answers):
        want = np.argsort(-exact[q])[:5]
        assert [x.id for x in a.results] == [corpus.images[j].key for j in want]
        assert np.allclose([x.score for x in a.results], exact[q, want], atol=1e-5)
        assert a.timing_ms["total"] >= a.timing_ms["search"]


def test_batched_queries_equal_one_by_one(corpus_dir, store_dir, model_dir, tmp_path):
    corpus = read_karpathy(corpus_dir / "captions.json")
    build_index(
        open_model(model_dir),
        str(model_dir),
        corpus,
        corpus_dir / "images",
        tmp_path / "ix",
        features=FeatureStore(store_dir),
    )
    r = Retriever.open(tmp_path / "ix")
    qs = ["a green picture", "something white", "purple"]
    batched = [[x.id for x in a.results] for a in r.search_text(qs, 4)]
    single = [[x.id for x in r.search_text([q], 4)[0].results] for q in qs]
    assert batched == single


def test_image_query_finds_captions_and_itself(corpus_dir, model_dir, tmp_path):
    corpus = read_karpathy(corpus_dir / "captions.json", "train")
    build_index(
        open_model(model_dir), str(model_dir), corpus, corpus_dir / "images", tmp_path / "ix"
    )
    r = Retriever.open(tmp_path / "ix")
    (caps,) = r.search_image([corpus_dir / "images" / "img02.png"], k=3)
    assert len(caps.results) == 3 and all(x.caption for x in caps.results)
    (sim,) = r.search_image([corpus_dir / "images" / "img02.png"], k=1, target="images")
    assert sim.results[0].id == "img02.png"  # features on the fly: the image finds itself
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"no")
    with pytest.raises(DataError, match="x.jpg"):
        r.search_image([bad])
    with pytest.raises(DataError, match="empty"):
        r.search_text([" "])


def index_of_the_first(n, corpus_dir, store_dir, model_dir, out):
    """An index of the tiny corpus's first `n` images, to grow; returns the whole corpus."""
    full = read_karpathy(corpus_dir / "captions.json")
    first = Corpus(full.images[:n])
    store = FeatureStore(store_dir)
    build_index(
        open_model(model_dir), str(model_dir), first, corpus_dir / "images", out, features=store
    )
    return full


def test_add_grows_the_index_like_a_rebuild(corpus_dir, store_dir, model_dir, tmp_path):
    model = open_model(model_dir)
    store = FeatureStore(store_dir)
    full = index_of_the_first(6, corpus_dir, store_dir, model_dir, tmp_path / "grown")
    r = Retriever.open(tmp_path / "grown", mmap=False)
    assert r.add_collection(full, corpus_dir / "images", store) == 6
    assert r.add_collection(full, corpus_dir / "images", store) == 0  # nothing new
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
        return r.add_collection(part, corpus_dir / "images", store)

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
    # An id another opener added meanwhile is refused, not duplicated.
    with pytest.raises(DataError, match="already in the index"):
        first.append(np.zeros((1, first.image_index.dim), np.float32), [{"id": full.keys()[-1]}])


def test_index_from_another_model_is_refused(corpus_dir, store_dir, model_dir, tmp_path):
    corpus = read_karpathy(corpus_dir / "captions.json")
    build_index(
        open_model(model_dir),
        str(model_dir),
        corpus,
        corpus_dir / "images",
        tmp_path / "ix",
        features=FeatureStore(store_dir),
    )
    other = BiEncoder(tiny_model_config())
    torch.manual_seed(123)
    other.init_pretrained()
    with torch.no_grad():
        other.text.proj.weight.add_(1.0)
    assert model_identity(other) != model_identity(open_model(model_dir))
    with pytest.raises(ConfigMismatchError, match="rebuild"):
        Retriever.open(tmp_path / "ix", model=other)


def test_approximate_index_reports_recall(corpus_dir, store_dir, model_dir, tmp_path):
    corpus = read_karpathy(corpus_dir / "captions.json")
    rep = build_index(
        open_model(model_dir),
        str(model_dir),
        corpus,
        corpus_dir / "images",
        tmp_path / "ix",
        IndexConfig("HNSW8"),
        FeatureStore(store_dir),
    )
    assert rep.recall_at_10 is not None and 0.0 <= rep.recall_at_10 <= 1.0


def test_cli_index_and_search(corpus_dir, store_dir, model_dir, tmp_path):
    ix = tmp_path / "ix"
    r = runner.invoke(
        app,
        [
            "index",
            "--out",
            str(ix),
            "--images",
            str(corpus_dir / "images"),
            "--annotations",
            str(corpus_dir / "captions.json"),
            "--model",
            str(model_dir),
            "--features",
            str(store_dir),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", str(ix), "a red picture", "--k", "3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["query"] == "a red picture" and len(out["results"]) == 3
    assert set(out["timing_ms"]) == {"encode", "search", "total"}
    r = runner.invoke(app, ["search", str(ix), "--image", str(corpus_dir / "images" / "img01.png")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", str(ix), ""])
    assert r.exit_code == 2 and "empty" in r.output
    (ix / "images" / "index.faiss").write_bytes(b"garbage")
    r = runner.invoke(app, ["search", str(ix), "a red picture"])
    assert r.exit_code == 2 and "damaged" in r.output and "Traceback" not in r.output


def test_rerank_reorders_the_dot_top_k_by_fused_scores(corpus_dir, model_dir, tmp_path):
    from lightningdot.config import RerankerConfig
    from lightningdot.features import create_backbone
    from lightningdot.features.extract import extract_images
    from lightningdot.model.checkpoint import save_reranker
    from lightningdot.model.reranker import Reranker

    model = open_model(model_dir)
    corpus = read_karpathy(corpus_dir / "captions.json", "train")  # 8 distinct colours: no ties
    # The backbone's own regions, so that a re-rank from the files must give the same answer.
    items = [(k, corpus_dir / "images" / k) for k in corpus.keys()]
    extract_images(items, tmp_path / "store", create_backbone("test-colour"))
    store = FeatureStore(tmp_path / "store")
    build_index(
        model, str(model_dir), corpus, corpus_dir / "images", tmp_path / "ix", features=store
    )
    torch.manual_seed(5)
    rr = Reranker(model, RerankerConfig(num_layers=1))
    save_reranker(tmp_path / "rr", rr, str(model_dir))
    r = Retriever.open(tmp_path / "ix", reranker=str(tmp_path / "rr"))
    q = "a blue picture"
    (plain,) = r.search_text([q], k=4)
    (ranked,) = r.search_text([q], k=2, rerank=4)
    top = plain.results
    fused = rr.rerank_images(
        q, store.batch([x.id for x in top]), torch.tensor([x.score for x in top])
    )
    want = [top[j].id for j in torch.argsort(fused, descending=True).tolist()[:2]]
    assert [x.id for x in ranked.results] == want
    assert set(ranked.timing_ms) == {"encode", "search", "rerank", "total"}
    # Without a feature store the candidates' regions come from their files: the same answer.
    r.regions.store = None
    assert [x.id for x in r.search_text([q], k=2, rerank=4)[0].results] == want
    (caps,) = r.search_image([corpus_dir / "images" / "img03.png"], k=3, rerank=5)
    assert len(caps.results) == 3
    with pytest.raises(DataError, match="re-ranker"):
        Retriever.open(tmp_path / "ix").search_text([q], rerank=4)


def test_queries_of_unknown_characters_still_get_an_answer(
    corpus_dir, store_dir, model_dir, tmp_path
):
    corpus = read_karpathy(corpus_dir / "captions.json")
    build_index(
        open_model(model_dir),
        str(model_dir),
        corpus,
        corpus_dir / "images",
        tmp_path / "ix",
        features=FeatureStore(store_dir),
    )
    r = Retriever.open(tmp_path / "ix")
    for q in ["☃☃☃ ∰", "😀", "שלום עולם", "a dog 🐕 and 猫"]:
        (a,) = r.search_text([q], k=3)
        assert len(a.results) == 3
