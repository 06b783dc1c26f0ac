"""Re-ranked evaluation: recalls after re-scoring each query's top K, against references."""

import json

import pytest
import torch

from lightningdot.data import read_karpathy
from lightningdot.evaluation.evaluate import evaluate_reranked
from lightningdot.evaluation.metrics import i2t_ranks, recall_metrics, reranked_metrics, t2i_ranks
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import save_model, save_reranker
from lightningdot.model.prior import QueryBank
from tests.helpers import tiny_reranker


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


@pytest.mark.parametrize("with_store", [True, False], ids=["feature-store", "image-folder"])
def test_a_language_file_naming_images_that_are_not_there_fails_with_a_count(
    corpus_dir, store_dir, model_dir, tmp_path, with_store
):
    """As a caption file in another language, made for a larger collection, would."""
    from typer.testing import CliRunner

    from lightningdot.cli import app

    data = json.loads((corpus_dir / "captions.json").read_text())
    for n in range(3):
        data["images"].append(dict(data["images"][-1], filename=f"gone{n}.png"))
    path = tmp_path / "captions_xx.json"
    path.write_text(json.dumps(data))
    args = ["evaluate", "--annotations", str(path), "--images", str(corpus_dir / "images")]
    args += ["--split", "val", "--model", str(model_dir)]
    args += ["--features", str(store_dir)] if with_store else []
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    want = "3 image(s) missing from" if with_store else "(3 of the 7 files are missing)"
    assert "gone0.png" in res.output and want in res.output, res.output
