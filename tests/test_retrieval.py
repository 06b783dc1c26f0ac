"""The Retriever: text and image queries, re-ranking, and the CLI over it."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lightningdot.cli import app
from lightningdot.data import read_karpathy
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore
from lightningdot.index.build import build_index
from lightningdot.index.record import Manifest
from lightningdot.model.checkpoint import load_model
from lightningdot.retrieval import Retriever
from tests.helpers import index_of_saved_model

runner = CliRunner()


def test_text_search_matches_exact_scores(corpus_dir, store_dir, model_dir, tmp_path):
    model = load_model(model_dir)
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
    index_of_saved_model(model_dir, corpus, corpus_dir, tmp_path / "ix", store_dir)
    r = Retriever.open(tmp_path / "ix")
    qs = ["a green picture", "something white", "purple"]
    batched = [[x.id for x in a.results] for a in r.search_text(qs, 4)]
    single = [[x.id for x in r.search_text([q], 4)[0].results] for q in qs]
    assert batched == single


def test_image_query_finds_captions_and_itself(corpus_dir, model_dir, tmp_path):
    corpus = read_karpathy(corpus_dir / "captions.json", "train")
    index_of_saved_model(model_dir, corpus, corpus_dir, tmp_path / "ix")
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
    (ix / Manifest.read(ix).parts["images"] / "index.faiss").write_bytes(b"garbage")
    r = runner.invoke(app, ["search", str(ix), "a red picture"])
    assert r.exit_code == 2 and "damaged" in r.output and "Traceback" not in r.output


def test_rerank_reorders_the_dot_top_k_by_fused_scores(corpus_dir, model_dir, tmp_path):
    from lightningdot.config import RerankerConfig
    from lightningdot.features import create_backbone
    from lightningdot.features.extract import extract_images
    from lightningdot.model.checkpoint import save_reranker
    from lightningdot.model.reranker import Reranker

    model = load_model(model_dir)
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
    # From the states the folder keeps (float16): the answer of the regions, scores within
    # float16's rounding.
    assert r.index.states is not None
    assert [x.id for x in ranked.results] == want
    best = torch.sort(fused, descending=True).values[:2].tolist()
    assert [x.score for x in ranked.results] == pytest.approx(best, abs=1e-2)
    assert set(ranked.timing_ms) == {"encode", "search", "rerank", "total"}
    # Without states, from the feature store; without either, from the files (with a warning
    # naming the cost): the same answer.
    r.index._live = dataclasses.replace(r.index.live, states=None)
    assert [x.id for x in r.search_text([q], k=2, rerank=4)[0].results] == want
    r.regions.store = None
    with pytest.warns(RuntimeWarning, match="keeps no region states"):
        assert [x.id for x in r.search_text([q], k=2, rerank=4)[0].results] == want
    (caps,) = r.search_image([corpus_dir / "images" / "img03.png"], k=3, rerank=5)
    assert len(caps.results) == 3
    with pytest.raises(DataError, match="re-ranker"):
        Retriever.open(tmp_path / "ix").search_text([q], rerank=4)


def test_queries_of_unknown_characters_still_get_an_answer(
    corpus_dir, store_dir, model_dir, tmp_path
):
    corpus = read_karpathy(corpus_dir / "captions.json")
    index_of_saved_model(model_dir, corpus, corpus_dir, tmp_path / "ix", store_dir)
    r = Retriever.open(tmp_path / "ix")
    for q in ["☃☃☃ ∰", "😀", "שלום עולם", "a dog 🐕 and 猫"]:
        (a,) = r.search_text([q], k=3)
        assert len(a.results) == 3


@pytest.mark.parametrize(
    ("k", "rerank", "says"),
    [(0, 0, "k must be"), (5, -1, "rerank must be"), (5, 2, "at least k"), (3, 4, "re-ranker")],
)
def test_one_check_of_k_and_rerank_for_the_library_and_the_command_line(index_dir, k, rerank, says):
    reranker = None if says == "re-ranker" else str(index_dir.parent / "rr")
    with pytest.raises(DataError, match=says):
        Retriever.open(index_dir, reranker=reranker).search_text(["red"], k, rerank)
    args = ["search", str(index_dir), "red", "--k", str(k), "--rerank", str(rerank)]
    if reranker is not None:  # else the command line would try the shipped one, and refuse it
        r = CliRunner().invoke(app, [*args, "--reranker", reranker])
        assert r.exit_code == 2 and says in r.output, r.output


def test_timing_has_a_queue_only_when_the_arrival_is_known(index_dir):
    import time

    r = Retriever.open(index_dir)
    (plain,) = r.search_text(["red"], 3)
    assert list(plain.timing_ms) == ["encode", "search", "total"]
    assert plain.timing_ms["total"] == pytest.approx(sum(list(plain.timing_ms.values())[:-1]))
    arrived = time.perf_counter() - 0.05  # it waited 50 ms before the retriever saw it
    (queued,) = r.search_text(["red"], 3, received=[arrived])
    assert list(queued.timing_ms) == ["queue", "encode", "search", "total"]
    assert queued.timing_ms["queue"] >= 50 and queued.timing_ms["total"] >= 50
