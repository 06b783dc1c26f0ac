"""Index folders: built, grown without a rebuild, grown by two openers at once, refused to
another model."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lightningdot.config import IndexConfig
from lightningdot.data import Corpus, ImageRecord, read_karpathy
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features import FeatureStore
from lightningdot.index.folder import build_index
from lightningdot.model.checkpoint import load_model, model_identity
from lightningdot.model.encoders import BiEncoder
from lightningdot.retrieval import Retriever
from tests.helpers import index_of_saved_model, tiny_model_config


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
    assert r.add_collection(Corpus([ImageRecord("teal.png")]), more) == 1
    row = r.image_index.row("teal.png")
    assert r.image_file(r.image_index.items[row]["path"]) == (more / "teal.png").resolve()
    hits = r.search_text(["a teal picture"], k=5, rerank=5)[0].results  # reads every file
    assert "teal.png" in [h.id for h in hits]
