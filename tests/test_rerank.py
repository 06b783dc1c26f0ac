"""The cross-attention re-ranker: scores, re-ranked recall, storage and training."""

import json

import pytest
import torch
from conftest import tiny_model_config

import lightningdot.train
from lightningdot.checkpoint import load_model, save_model
from lightningdot.config import BertSize, DataConfig, RerankerConfig, RerankTrainConfig
from lightningdot.data import read_karpathy
from lightningdot.encoders import BiEncoder
from lightningdot.errors import ConfigMismatchError
from lightningdot.evaluate import (
    encode_region_batches,
    encode_texts,
    i2t_ranks,
    recall_metrics,
    reranked_metrics,
    t2i_ranks,
)
from lightningdot.features import FeatureStore
from lightningdot.prior import QueryBank, hub_prior, make_bank
from lightningdot.rerank import (
    CrossEncoder,
    Reranker,
    caption_states,
    evaluate_reranked,
    gallery_states,
    load_reranker,
    save_reranker,
    vectors_of_states,
)
from lightningdot.train import load_split
from lightningdot.train_reranker import drop_region_states, mine, train_reranker


def tiny_reranker(seed: int = 0, fusion: float = 1.0) -> Reranker:
    torch.manual_seed(seed)
    bi = BiEncoder(tiny_model_config())
    bi.init_pretrained()
    r = Reranker(bi.eval(), RerankerConfig(num_layers=1, fusion=fusion))
    r.init_pretrained()
    return r.eval()


def naive_reranked(text, image, caption_image, k, cross_t2i, cross_i2t):
    """Reference: for each query, sort the whole gallery, re-sort its top k by the new score."""
    s = text @ image.T
    t2i_dot, i2t_dot = t2i_ranks(text, image, caption_image), i2t_ranks(text, image, caption_image)
    t2i, i2t = [], []
    for q in range(len(text)):
        top = sorted(range(len(image)), key=lambda g: -s[q, g])[:k]
        new = sorted(top, key=lambda g: -(cross_t2i[q, g] + s[q, g]))
        own = [p for p, g in enumerate(new) if g == caption_image[q]]
        t2i.append(own[0] if own else max(k, int(t2i_dot[q])))
    for g in range(len(image)):
        top = sorted(range(len(text)), key=lambda q: -s[q, g])[:k]
        new = sorted(top, key=lambda q: -(cross_i2t[g, q] + s[q, g]))
        own = [p for p, q in enumerate(new) if caption_image[q] == g]
        i2t.append(own[0] if own else max(k, int(i2t_dot[g])))
    return t2i, i2t


@pytest.mark.parametrize("k", [1, 3, 12])
def test_reranked_ranks_match_naive_reference(k):
    g = torch.Generator().manual_seed(k)
    image = torch.randn(6, 8, generator=g)
    text = torch.randn(12, 8, generator=g)
    caption_image = torch.arange(6).repeat_interleave(2)
    cross_t2i, cross_i2t = torch.randn(12, 6, generator=g), torch.randn(6, 12, generator=g)
    got = reranked_metrics(
        text,
        image,
        caption_image,
        k,
        lambda q, c, dot: cross_t2i[q[:, None], c] + dot,
        lambda q, c, dot: cross_i2t[q[:, None], c] + dot,
        with_ranks=True,
    )
    t2i, i2t = naive_reranked(text, image, caption_image, k, cross_t2i, cross_i2t)
    assert got["ranks"]["t2i"].tolist() == t2i
    assert got["ranks"]["i2t"].tolist() == i2t
    for key in ("r1", "r5", "r10"):
        kk = int(key[1:])
        assert got["t2i"][key] == pytest.approx(100 * sum(r < kk for r in t2i) / len(t2i))
        assert got["i2t"][key] == pytest.approx(100 * sum(r < kk for r in i2t) / len(i2t))


def test_rescoring_by_the_dot_product_changes_nothing():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 8, generator=g), torch.randn(10, 8, generator=g)
    caption_image = torch.arange(5).repeat_interleave(2)
    same = reranked_metrics(
        text, image, caption_image, 4, lambda q, c, dot: dot, lambda q, c, dot: dot
    )
    assert same == recall_metrics(text, image, caption_image)
    bank = QueryBank(torch.randn(7, 8, generator=g), torch.randn(4, 8, generator=g), beta=3.0)
    same = reranked_metrics(
        text, image, caption_image, 4, lambda q, c, dot: dot, lambda q, c, dot: dot, bank
    )
    assert same == recall_metrics(text, image, caption_image, bank)


def test_mined_negatives_are_the_top_wrong_answers_as_the_index_ranks_them(corpus_dir, store_dir):
    bi = BiEncoder(tiny_model_config()).eval()
    data = DataConfig(str(corpus_dir / "captions.json"), str(store_dir))
    train = load_split(data, "train", FeatureStore(store_dir), soft_labels=False)
    bi.bank = make_bank(bi, data.annotations, store_dir, "train", size=5, beta=4.0)
    with torch.no_grad():
        text = encode_texts(bi, train.corpus.captions)
        image = encode_region_batches(bi, train.regions.chunks(4))
    mined = mine(bi, train, 3, text, image)
    owner = train.corpus.caption_image
    t2i = mined.text @ mined.image.T + hub_prior(mined.image, bi.bank.text, 4.0)
    i2t = mined.image @ mined.text.T + hub_prior(mined.text, bi.bank.image, 4.0)
    for c in range(len(owner)):  # one query at a time, own answers left out by hand
        wrong = sorted(
            (g for g in range(len(mined.image)) if g != owner[c]), key=lambda g: -t2i[c, g]
        )
        assert mined.hard_images[c].tolist() == wrong[:3]
        assert torch.allclose(
            mined.dot_t2i(torch.tensor([c]), mined.hard_images[c : c + 1]),
            t2i[c, wrong[:3]],
            atol=1e-6,
        )
    for g in range(len(mined.image)):
        wrong = sorted((c for c in range(len(owner)) if owner[c] != g), key=lambda c: -i2t[g, c])
        assert mined.hard_captions[g].tolist() == wrong[:3]
        assert torch.allclose(
            mined.dot_i2t(torch.tensor([g]), mined.hard_captions[g : g + 1]),
            i2t[g, wrong[:3]],
            atol=1e-6,
        )


def test_batched_cross_scores_equal_one_by_one(store_dir):
    r = tiny_reranker()
    store = FeatureStore(store_dir)
    regions = store.batch(store.keys()[:4])
    texts = ["a red picture", "something much longer than the other captions here", "blue", "a"]
    with torch.no_grad():
        batched = r.cross_scores(r.text_states(texts), r.image_states(regions), chunk=3)
        single = torch.cat(
            [
                r.cross_scores(r.text_states([t]), r.image_states(regions.select(slice(i, i + 1))))
                for i, t in enumerate(texts)
            ]
        )
    assert torch.allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_cross_encoder_equals_a_transformer_run_over_each_pair(num_layers):
    """The fast path (keys and values once per caption and image, first-token query in the
    last layer) against BertModel's own layers run over each concatenated pair, with the image
    rows put back after every layer, as the fusion reads image states without updating them."""
    torch.manual_seed(num_layers)
    h = 32
    cross = CrossEncoder(RerankerConfig(num_layers=num_layers), BertSize(h, 3, 4, 64, 64, 2))
    cross.eval()
    ts, is_ = torch.randn(3, 6, h), torch.randn(4, 5, h)
    tm = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    im = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] * 4 + [0]])
    t_idx, i_idx = torch.tensor([0, 2, 1, 1, 2, 0]), torch.tensor([3, 0, 1, 2, 2, 1])
    with torch.no_grad():
        got = cross(ts, tm, is_, im, t_idx, i_idx)
        want = []
        for t, i in zip(t_idx.tolist(), i_idx.tolist(), strict=True):
            text, image = cross.embed(ts[t : t + 1], 0), cross.embed(is_[i : i + 1], 1)
            mask = torch.cat([tm[t : t + 1], im[i : i + 1]], 1)
            additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            for layer in cross.bert.encoder.layer:
                out = layer(torch.cat([text, image], 1), attention_mask=additive)
                out = out[0] if isinstance(out, tuple) else out
                text = out[:, : text.shape[1]]
            want.append(cross.head(text[:, 0]).squeeze(-1))
    assert torch.allclose(got, torch.cat(want), atol=1e-5)


def test_rerank_images_fuses_cross_and_dot_scores(store_dir):
    r = tiny_reranker(fusion=0.5)
    store = FeatureStore(store_dir)
    regions = store.batch(store.keys()[:3])
    dot = torch.tensor([0.3, -0.1, 0.2])
    with torch.no_grad():
        cross = r.cross_scores(
            (
                r.text_states(["a cat"])[0].expand(3, -1, -1),
                r.text_states(["a cat"])[1].expand(3, -1),
            ),
            r.image_states(regions),
        )
    got = r.rerank_images("a cat", regions, dot)
    assert torch.allclose(got, cross + 0.5 * dot * r.bi.logit_scale.exp(), atol=1e-5)


def test_evaluate_reranked_over_the_whole_gallery_ranks_by_fused_scores(corpus_dir, store_dir):
    r = tiny_reranker()
    corpus = read_karpathy(corpus_dir / "captions.json", "val")
    regions = FeatureStore(store_dir).batch(corpus.keys())
    got = evaluate_reranked(
        r, corpus.captions, corpus.caption_image, regions, k=len(corpus.keys()) * 2
    )
    # Reference: the fused score of every (caption, image) pair, computed pair by pair.
    with torch.no_grad():
        fused = torch.zeros(len(corpus.captions), len(corpus.keys()))
        t = r.bi.encode_text(corpus.captions)
        v = r.bi.encode_image(regions)
        for q, cap in enumerate(corpus.captions):
            for g in range(len(corpus.keys())):
                one = regions.select(slice(g, g + 1))
                fused[q, g] = r.rerank_images(cap, one, t[q : q + 1] @ v[g : g + 1].T)[0]
    want = recall_metrics(torch.eye(1), torch.eye(1), [0])  # layout only
    ranks_t2i = [
        int((fused[q] >= fused[q, corpus.caption_image[q]]).sum()) - 1 for q in range(len(t))
    ]
    want["t2i"] = {
        f"r{k}": 100 * sum(x < k for x in ranks_t2i) / len(ranks_t2i) for k in (1, 5, 10)
    }
    assert got["t2i"] == pytest.approx(want["t2i"])


def test_fusion_sweep_equals_one_evaluation_per_weight(corpus_dir, store_dir):
    r = tiny_reranker()
    corpus = read_karpathy(corpus_dir / "captions.json", "val")
    regions = FeatureStore(store_dir).batch(corpus.keys())
    args = (corpus.captions, corpus.caption_image, regions, 3)
    sweep = evaluate_reranked(r, *args, fusions=[0.0, 0.5, 2.0])
    for w, metrics in sweep.items():
        r.cfg.fusion = w
        assert metrics == evaluate_reranked(r, *args)


def test_save_load_round_trip_and_refusal(tmp_path):
    r = tiny_reranker(seed=1)
    save_model(tmp_path / "bi", r.bi)
    bi = load_model(tmp_path / "bi")
    save_reranker(tmp_path / "rr", r, str(tmp_path / "bi"))
    back = load_reranker(tmp_path / "rr")  # its own bi-encoder, by the recorded name
    for (n, a), (_, b) in zip(
        r.cross.named_parameters(), back.cross.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), n
    other = BiEncoder(tiny_model_config())
    other.init_pretrained()
    with pytest.raises(ConfigMismatchError, match="train-reranker"):
        load_reranker(tmp_path / "rr", bi=other)
    assert load_reranker(tmp_path / "rr", bi=bi).cfg == r.cfg


@pytest.mark.parametrize(
    ("region_keep", "num_layers", "bf16", "native"),
    [(1.0, 1, False, True), (0.5, 2, True, True), (1.0, 1, True, False)],
    ids=["one-layer", "two-layers-half-regions-bf16", "bf16-emulated-falls-back"],
)
def test_train_reranker_writes_checkpoints_and_a_log(
    corpus_dir, store_dir, tmp_path, monkeypatch, region_keep, num_layers, bf16, native
):
    # Whatever this machine's CPU: bf16 runs where it is native, float32 where emulated.
    monkeypatch.setattr(lightningdot.train, "native_bf16", lambda device: native)
    r = tiny_reranker()
    save_model(tmp_path / "bi", r.bi)
    cfg = RerankTrainConfig(
        reranker=RerankerConfig(num_layers=num_layers),
        data=DataConfig(str(corpus_dir / "captions.json"), str(store_dir)),
        bi_encoder=str(tmp_path / "bi"),
        epochs=2,
        batch_size=4,
        negatives=2,
        mine_from=3,
        region_keep=region_keep,
        bf16=bf16,
    )
    best = train_reranker(cfg, tmp_path / "run", log=lambda m: None, val_k=3)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(x["loss"]["loss"])) for x in log)
    assert best["ar"] == max(x["val"]["ar"] for x in log)
    loaded = load_reranker(tmp_path / "run" / "best")
    assert loaded.cfg.num_layers == num_layers
    # The recipe saved with the run says in which precision it really trained.
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert saved["train"]["bf16"] is (bf16 and native)


def test_train_reranker_chooses_the_fusion_weight_on_val(corpus_dir, store_dir, tmp_path):
    r = tiny_reranker()
    save_model(tmp_path / "bi", r.bi)
    cfg = RerankTrainConfig(
        reranker=RerankerConfig(num_layers=1, fusion=1.0),
        data=DataConfig(str(corpus_dir / "captions.json"), str(store_dir)),
        bi_encoder=str(tmp_path / "bi"),
        epochs=1,
        batch_size=4,
        negatives=2,
        mine_from=3,
        train_fusion=0.0,
        fusion_grid=[0.0, 0.5, 3.0],
    )
    best = train_reranker(cfg, tmp_path / "run", log=lambda m: None, val_k=3)
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    sweep = {float(w): ar for w, ar in record["val_fusion_ar"].items()}
    chosen = max(sweep, key=sweep.get)
    assert record["fusion"] == chosen and best["ar"] == pytest.approx(sweep[chosen], abs=1e-3)
    assert load_reranker(tmp_path / "run" / "best").cfg.fusion == chosen
    assert cfg.reranker.fusion == 1.0  # the recipe itself is left as written


def test_cli_bench_reports_the_three_methods(corpus_dir, store_dir, tmp_path):
    from typer.testing import CliRunner

    from lightningdot.cli import app

    r = tiny_reranker()
    save_model(tmp_path / "bi", r.bi)
    save_reranker(tmp_path / "rr", r, str(tmp_path / "bi"))
    out = tmp_path / "bench.json"
    args = ["bench", "--annotations", str(corpus_dir / "captions.json"), "--images"]
    args += [str(corpus_dir / "images"), "--split", "val", "--model", str(tmp_path / "bi")]
    args += ["--reranker", str(tmp_path / "rr"), "--features", str(store_dir), "--rerank", "2"]
    args += ["--queries", "3", "--full-queries", "2", "--json", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["gallery"] == 4 and rep["rerank_k"] == 2
    ms = rep["ms_per_query"]
    assert set(ms) == {"dot", "dot_rerank", "cross_full"} and all(v > 0 for v in ms.values())
    assert rep["speedup"]["dot"] == pytest.approx(ms["cross_full"] / ms["dot"], rel=0.01, abs=0.1)
    assert set(rep["recall"]) == {"dot", "dot_rerank"}
    assert set(rep["recall"]["dot_rerank"]) == set(rep["recall"]["dot"])


def test_cli_evaluate_and_search_with_rerank(corpus_dir, store_dir, tmp_path):
    from typer.testing import CliRunner

    from lightningdot.cli import app

    r = tiny_reranker()
    save_model(tmp_path / "bi", r.bi)
    save_reranker(tmp_path / "rr", r, str(tmp_path / "bi"))
    runner = CliRunner()
    common = ["--annotations", str(corpus_dir / "captions.json"), "--images"]
    common += [str(corpus_dir / "images"), "--model", str(tmp_path / "bi")]
    out = tmp_path / "m.json"
    args = ["evaluate", *common, "--split", "val", "--features", str(store_dir)]
    res = runner.invoke(
        app, [*args, "--rerank", "3", "--reranker", str(tmp_path / "rr")] + ["--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert set(m) == {"t2i", "i2t", "ar", "n_images", "n_captions"}  # the layout without --rerank
    assert m["n_images"] == 4 and m["n_captions"] == 8
    res = runner.invoke(
        app, ["index", *common, "--features", str(store_dir), "--out", str(tmp_path / "ix")]
    )
    assert res.exit_code == 0, res.output
    search = ["search", str(tmp_path / "ix"), "a red picture", "--k", "2", "--json"]
    res = runner.invoke(app, [*search, "--rerank", "4", "--reranker", str(tmp_path / "rr")])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert len(got["results"]) == 2 and "rerank" in got["timing_ms"]
    res = runner.invoke(app, [*search, "--rerank", "4", "--reranker", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "nowhere" in res.output and "Traceback" not in res.output


def test_drop_region_states_hides_regions_only():
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    gen = torch.Generator().manual_seed(0)
    dropped = drop_region_states(mask, 0.5, gen)
    assert dropped[:, 0].tolist() == [1, 1]  # [IMG] is always seen
    assert (dropped <= mask).all()  # padding stays padding
    assert dropped.sum() < mask.sum()
    assert torch.equal(drop_region_states(mask, 1.0, gen), mask)


def test_reranker_recipe_rejects_a_region_keep_outside_0_1():
    with pytest.raises(ValueError, match="region_keep"):
        RerankTrainConfig(region_keep=0)


@pytest.mark.parametrize("pooled_dim", [0, 8])
def test_vectors_of_states_equal_the_bi_encoders_own(store_dir, pooled_dim):
    torch.manual_seed(0)
    bi = BiEncoder(tiny_model_config(pooled_dim=pooled_dim))
    bi.init_pretrained()
    r = Reranker(bi.eval(), RerankerConfig(num_layers=1)).eval()
    regions = FeatureStore(store_dir).batch(FeatureStore(store_dir).keys()[:3])
    regions.features = regions.features.half()  # as `ldot extract` stores them
    captions = ["a red picture", "blue", "something longer than the other two captions"]
    text, image = vectors_of_states(
        r.bi, caption_states(r, captions), gallery_states(r, regions), regions, batch=2
    )
    with torch.no_grad():
        assert torch.allclose(text, r.bi.encode_text(captions), atol=1e-5)
        assert torch.allclose(image, r.bi.encode_image(regions), atol=1e-5)
