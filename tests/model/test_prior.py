import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lightningdot.cli import app
from lightningdot.config import BankConfig, IndexConfig
from lightningdot.data import read_karpathy
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.evaluation.metrics import metrics_from_ranks, recall_metrics
from lightningdot.features import FeatureStore, load_image
from lightningdot.index.build import build_index
from lightningdot.index.vector import IndexPrior, VectorIndex
from lightningdot.model.checkpoint import load_model, save_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.prior import QueryBank, gallery_side, hub_prior, query_side
from lightningdot.retrieval import Retriever
from lightningdot.training.bank import make_bank
from tests.helpers import tiny_model_config


def unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1)


def test_hub_prior_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gallery = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    beta = 2.0
    want = [
        -math.log((math.exp(2 * 0.6) + math.exp(2 * 0.8)) / 2) / 2,
        -math.log((math.e**2 + 1) / 2) / 2,
    ]
    assert torch.allclose(hub_prior(gallery, bank, beta), torch.tensor(want))
    # Blockwise equals all at once.
    g, b = unit(50, 8, 0), unit(30, 8, 1)
    assert torch.allclose(hub_prior(g, b, 10.0, block=7), hub_prior(g, b, 10.0), atol=1e-6)


def test_the_extra_coordinate_adds_the_prior_to_every_dot_product():
    q, g = unit(4, 8, 0), unit(6, 8, 1)
    prior = torch.randn(6)
    assert torch.allclose(query_side(q) @ gallery_side(g, prior).T, q @ g.T + prior, atol=1e-6)


def test_a_hub_is_demoted():
    # Item 0 sits between every query direction and beats each query's own item slightly;
    # the bank (queries like them) reveals it as a hub and the prior puts the own items first.
    own = torch.eye(4)
    hub = torch.nn.functional.normalize(torch.ones(1, 4), dim=-1)
    queries = torch.nn.functional.normalize(own + 1.2 * hub, dim=-1)
    gallery = torch.cat([hub, own])  # rows 1..4 are the queries' own items
    assert (queries @ gallery.T).argmax(1).tolist() == [0, 0, 0, 0]
    prior = hub_prior(gallery, queries, beta=10.0)
    assert (query_side(queries) @ gallery_side(gallery, prior).T).argmax(1).tolist() == [1, 2, 3, 4]


def test_recall_with_a_bank_equals_ranking_the_full_adjusted_score_matrix():
    text, image = unit(40, 8, 0), unit(8, 8, 1)
    caption_image = torch.arange(40) // 5
    bank = QueryBank(unit(20, 8, 2), unit(10, 8, 3), beta=5.0)
    got = recall_metrics(text, image, caption_image, bank)
    # Naive reference: whole score matrices, own rank counted by hand.
    t2i = text @ image.T + hub_prior(image, bank.text, 5.0)
    i2t = image @ text.T + hub_prior(text, bank.image, 5.0)
    t_rank = torch.tensor([(t2i[c] > t2i[c, caption_image[c]]).sum() for c in range(40)])
    i_rank = []
    for i in range(8):
        own = caption_image == i
        best = i2t[i][own].max()
        i_rank.append(((i2t[i] > best) & ~own).sum())
    assert got == metrics_from_ranks(t_rank, torch.tensor(i_rank))
    assert got != recall_metrics(text, image, caption_image)  # the prior did change something


def test_index_with_a_prior_searches_adjusted_scores_and_gives_added_rows_theirs(tmp_path):
    x, q, bank = unit(300, 16, 0).numpy(), unit(7, 16, 1).numpy(), unit(50, 16, 2).numpy()
    prior = IndexPrior(bank, 10.0)
    items = [{"id": f"i{n}"} for n in range(300)]
    idx = VectorIndex.build(x[:200], items[:200], "m", prior=prior)
    idx.add(x[200:], items[200:])
    assert idx.dim == 16
    ref = q @ x.T + hub_prior(torch.from_numpy(x), torch.from_numpy(bank), 10.0).numpy()
    scores, ids = idx.search(q, 5)
    assert np.array_equal(ids, np.argsort(-ref, axis=1)[:, :5])
    assert np.allclose(scores, np.take_along_axis(ref, ids, 1), atol=1e-5)

    plain = q @ x.T  # a query of another kind than the bank's: the dot product alone
    scores, ids_plain = idx.search(q, 5, with_prior=False)
    assert np.array_equal(ids_plain, np.argsort(-plain, axis=1)[:, :5])
    assert np.allclose(scores, np.take_along_axis(plain, ids_plain, 1), atol=1e-5)

    idx.save(tmp_path / "ix")
    loaded = VectorIndex.load(tmp_path / "ix", "m")
    assert np.array_equal(loaded.search(q, 5)[1], ids) and loaded.prior.beta == 10.0
    hnsw = VectorIndex.build(x, items, "m", IndexConfig(factory="HNSW16"), prior)
    assert np.array_equal(hnsw.search(q, 1)[1], ids[:, :1])

    (tmp_path / "ix" / "bank.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(DataError, match="bank"):
        VectorIndex.load(tmp_path / "ix", "m")


def test_bank_round_trips_with_the_model_and_a_wrong_size_is_refused(tmp_path):
    m = BiEncoder(tiny_model_config(pooled_dim=8)).eval()
    m.bank = QueryBank(unit(5, 24, 0), unit(3, 24, 1), 7.0, {"split": "train"})
    save_model(tmp_path / "m", m)
    loaded = load_model(tmp_path / "m")
    assert torch.equal(loaded.bank.text, m.bank.text) and loaded.bank.beta == 7.0
    assert loaded.bank.source == {"split": "train"}
    save_model(tmp_path / "m2", loaded, torch.float16)  # what `ldot export` does
    assert load_model(tmp_path / "m2").bank.image.shape == (3, 24)

    m.bank = QueryBank(unit(5, 16, 0), unit(3, 16, 1), 7.0)
    save_model(tmp_path / "bad", m)
    with pytest.raises(ConfigMismatchError, match="size"):
        load_model(tmp_path / "bad")
    (tmp_path / "m" / "bank.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bank"):
        load_model(tmp_path / "m")


def test_index_of_a_model_with_a_bank_ranks_as_evaluation_does(corpus_dir, store_dir, tmp_path):
    m = BiEncoder(tiny_model_config()).eval()
    annotations = corpus_dir / "captions.json"
    m.bank = make_bank(m, annotations, store_dir, BankConfig(size=6, beta=10.0))
    assert m.bank.text.shape == (6, 16) and m.bank.image.shape == (6, 16)
    save_model(tmp_path / "model", m)
    corpus = read_karpathy(annotations, "val")
    store = FeatureStore(store_dir)
    build_index(
        m, str(tmp_path / "model"), corpus, corpus_dir / "images", tmp_path / "ix", features=store
    )
    r = Retriever.open(tmp_path / "ix")
    (answer,) = r.search_text(["a red picture"], k=4)
    with torch.no_grad():
        q = m.encode_text(["a red picture"])
        images = m.encode_image(store.batch(corpus.keys()))
    want = (q @ images.T)[0] + hub_prior(images, m.bank.text, 10.0)
    assert [x.score for x in answer.results] == pytest.approx(
        sorted(want.tolist(), reverse=True), abs=1e-5
    )
    # Image -> similar images: the bank held text queries, so the dot product alone ranks.
    photo = corpus_dir / "images" / corpus.keys()[0]
    (similar,) = r.search_image([photo], k=4, target="images")
    with torch.no_grad():
        plain = (r.encode_images([load_image(photo)]) @ images.T)[0]
    assert [x.score for x in similar.results] == pytest.approx(
        sorted(plain.tolist(), reverse=True), abs=1e-5
    )
    # An added image gets its prior as it is added.
    train = read_karpathy(annotations, "train")
    r.add_collection(type(train)(train.images[:1]), corpus_dir / "images", store)
    (answer,) = r.search_text(["a red picture"], k=5)
    with torch.no_grad():
        added = m.encode_image(store.batch([train.images[0].key]))
    got = {x.id: x.score for x in answer.results}[train.images[0].key]
    want = (q @ added.T)[0, 0] + hub_prior(added, m.bank.text, 10.0)[0]
    assert got == pytest.approx(float(want), abs=1e-5)


def test_bank_command_and_evaluate_with_and_without_the_prior(corpus_dir, store_dir, tmp_path):
    m = BiEncoder(tiny_model_config()).eval()
    save_model(tmp_path / "model", m)
    runner = CliRunner()
    common = ["--annotations", str(corpus_dir / "captions.json")]
    r = runner.invoke(
        app, ["bank", str(tmp_path / "model"), *common, "--features", str(store_dir), "--size", "4"]
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["bank"] == {
        "beta": 10.0,
        "annotations": "captions.json",
        "split": "train",
        "size": 4,
        "seed": 0,
    }
    out = {}
    for flag in ("--prior", "--no-prior"):
        path = tmp_path / f"{flag}.json"
        args = ["evaluate", *common, "--images", str(corpus_dir / "images"), "--split", "val"]
        args += [
            "--model",
            str(tmp_path / "model"),
            "--features",
            str(store_dir),
            "--json",
            str(path),
            flag,
        ]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        out[flag] = json.loads(path.read_text())
    loaded = load_model(tmp_path / "model")
    corpus = read_karpathy(corpus_dir / "captions.json", "val")
    with torch.no_grad():
        text = loaded.encode_text(corpus.captions)
        images = loaded.encode_image(FeatureStore(store_dir).batch(corpus.keys()))
    assert out["--prior"]["ar"] == pytest.approx(
        recall_metrics(text, images, corpus.caption_image, loaded.bank)["ar"]
    )
    assert out["--no-prior"]["ar"] == pytest.approx(
        recall_metrics(text, images, corpus.caption_image)["ar"]
    )
    r = runner.invoke(app, ["bank", str(tmp_path / "nope"), *common, "--features", str(store_dir)])
    assert r.exit_code == 2 and "not a model folder" in r.output
    args = ["bank", str(tmp_path / "model"), *common, "--features", str(store_dir), "--beta", "0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--beta positive" in r.output and "Traceback" not in r.output


def test_the_prior_reads_the_main_coordinates_of_items_with_a_concept_view():
    g = torch.Generator().manual_seed(5)
    main, concepts = torch.randn(7, 6, generator=g), torch.randn(7, 4, generator=g)
    bank = torch.randn(9, 6, generator=g)
    with_view = hub_prior(torch.cat([main, concepts], dim=1), bank, beta=3.0)
    torch.testing.assert_close(with_view, hub_prior(main, bank, beta=3.0))
