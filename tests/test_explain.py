"""Why a result matched: region gates, their gradients, token shares, overlays, and the
retriever, server and command line that report them."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from lightningdot.cli import app
from lightningdot.data import read_karpathy
from lightningdot.errors import DataError
from lightningdot.explain import RegionWeights, region_gradients, token_weights
from lightningdot.features import FeatureStore, RegionBatch
from lightningdot.heatmap import heat, overlay_png
from lightningdot.index.build import build_index
from lightningdot.model.checkpoint import load_model
from lightningdot.model.pooling import join_views
from lightningdot.retrieval import Retriever
from tests.helpers import tiny_reranker


def random_regions(b: int = 3, r: int = 5, dim: int = 16, seed: int = 0) -> RegionBatch:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(b, r, 7, generator=g)
    mask = torch.ones(b, r, dtype=torch.bool)
    mask[0, -2:] = False  # one image with padding
    return RegionBatch(torch.randn(b, r, dim, generator=g) * mask[..., None], boxes, mask)


def dot_of(bi, regions: RegionBatch, queries: torch.Tensor) -> torch.Tensor:
    """The naive reference: encode the regions as they are, score each against its query."""
    return (bi.encode_image(regions) * queries).sum(-1)


def test_a_binary_gate_is_a_deletion():
    bi = tiny_reranker().bi
    regions = random_regions()
    gate = torch.ones(regions.mask.shape)
    gate[1, 2] = gate[2, 0] = 0
    deleted = dataclasses.replace(regions, mask=regions.mask & gate.bool())
    with torch.no_grad():
        gated = bi.image.gated_states(regions, gate)
        plain = bi.image(deleted)
        vectors = join_views(bi.image.views(gated, regions, gate))
    assert torch.allclose(gated[:, 0], plain[:, 0], atol=1e-5)
    assert torch.allclose(vectors, bi.encode_image(deleted), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(
            bi.image.gated_states(regions, torch.ones_like(gate)), bi.image(regions), atol=1e-5
        )


def finite_difference(score, gate: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """d score[b] / d gate[b, r] by a central difference at each real region (padding: 0)."""
    out = torch.zeros_like(gate)
    for b, r in torch.nonzero(gate > 0).tolist():
        up, down = gate.clone(), gate.clone()
        up[b, r] += eps
        down[b, r] -= eps
        out[b, r] = (score(up)[b] - score(down)[b]) / (2 * eps)
    return out


def test_region_gradients_match_finite_differences_of_the_dot_product():
    bi = tiny_reranker().bi
    regions = random_regions()
    queries = torch.nn.functional.normalize(torch.randn(3, bi.cfg.embed_dim), dim=-1)

    def score(gate):
        with torch.no_grad():
            states = bi.image.gated_states(regions, gate)
            return (join_views(bi.image.views(states, regions, gate)) * queries).sum(-1)

    grads = region_gradients(bi, regions, queries)
    reference = finite_difference(score, regions.mask.float())
    assert torch.allclose(grads, reference, atol=1e-3, rtol=0.02)
    assert grads.abs().sum() > 0 and (grads[0, -2:] == 0).all()  # padding has no say


def test_region_gradients_of_the_reranked_score_match_finite_differences():
    rr = tiny_reranker(fusion=0.5)
    regions = random_regions()
    text = rr.text_states(["a red picture"])
    queries = rr.bi.encode_text(["a red picture"]).expand(3, -1)
    pairs = torch.zeros(3, dtype=torch.long), torch.arange(3)

    def score(gate):
        with torch.no_grad():
            states = rr.bi.image.gated_states(regions, gate)
            dot = (join_views(rr.bi.image.views(states, regions, gate)) * queries).sum(-1)
            mask = torch.cat([torch.ones(3, 1), gate * regions.mask], 1)
            return rr.fused_score(rr.cross_scores(text, (states, mask), *pairs), dot)

    grads = region_gradients(rr.bi, regions, queries, rr, text)
    reference = finite_difference(score, regions.mask.float())
    assert torch.allclose(grads, reference, atol=1e-3, rtol=0.02)


def test_token_weights_add_up_to_the_dot_product():
    bi = tiny_reranker().bi
    captions = ["a red picture", "something blue and green"]
    images = bi.encode_image(random_regions(2, 4, seed=1))
    weights = token_weights(bi, captions, images)
    dots = (bi.encode_text(captions) * images).sum(-1)
    for w, dot in zip(weights, dots.tolist(), strict=True):
        assert w.tokens[0] == "[CLS]" and w.tokens[-1] == "[SEP]"
        assert sum(w.weights) + w.bias == pytest.approx(dot, abs=1e-5)


def test_the_heat_map_is_hottest_over_the_heaviest_region():
    weights = RegionWeights(
        [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1), (0.5, 0, 1, 0.5)], [0.2, 1.0, -3.0]
    )
    h = heat(weights, 8)
    assert h.max() == 1 and h[6, 6] == 1 and h[1, 1] == pytest.approx(0.2)
    assert h[1, 6] == 0  # a region that lowered the score shows nothing
    png = overlay_png(Image.new("RGB", (40, 30), "white"), weights)
    out = Image.open(io.BytesIO(png))
    assert out.format == "PNG" and out.size == (40, 30)
    assert out.getpixel((35, 25)) != (255, 255, 255) and out.getpixel((30, 5)) == (255, 255, 255)


def test_explanations_from_kept_states_and_from_a_feature_store(
    index_dir, corpus_dir, store_dir, tmp_path
):
    r = Retriever.open(index_dir)
    hits = r.search_text(["a red picture"], k=3, explain=True)[0].results
    assert all(h.regions.method == "state-similarity" and len(h.regions.boxes) == 4 for h in hits)
    assert r.search_text(["a red picture"], k=3)[0].results[0].regions is None
    # An index built from a feature store explains by the gradient, from the store's regions.
    model_dir = index_dir.parent / "model"
    corpus = read_karpathy(corpus_dir / "captions.json", "train")
    model = load_model(str(model_dir))
    ix2 = tmp_path / "ix2"
    build_index(
        model, str(model_dir), corpus, corpus_dir / "images", ix2, features=FeatureStore(store_dir)
    )
    r2 = Retriever.open(ix2, reranker=str(index_dir.parent / "rr"))
    hits = r2.search_text(["a red picture"], k=3, rerank=4, explain=True)[0].results
    assert all(h.regions.method == "deletion-gradient" for h in hits)
    w = r2.explain("a red picture", hits[0].id)
    regions = FeatureStore(store_dir).batch([hits[0].id])
    queries = r2.model.encode_text(["a red picture"])
    assert w.weights == pytest.approx(
        region_gradients(r2.model, regions, queries)[0].tolist(), abs=1e-6
    )
    with pytest.raises(DataError, match="no image 'nope.png' in the index"):
        r2.explain("a red picture", "nope.png")


def test_image_queries_explain_each_caption_by_its_tokens(index_dir, corpus_dir):
    r = Retriever.open(index_dir)
    image = corpus_dir / "images" / "img00.png"
    captions = r.search_image([image], k=3, explain=True)[0].results
    assert all(c.tokens is not None and c.tokens.tokens[0] == "[CLS]" for c in captions)
    assert r.search_image([image], k=3, target="images", explain=True)[0].results[0].regions is None


def test_the_server_explains_searches_and_draws_overlays(index_dir):
    from lightningdot.serve.app import create_app

    with TestClient(create_app(Retriever.open(index_dir))) as client:
        hits = client.get("/search", params={"q": "a red picture", "k": 2, "explain": 1}).json()[
            "results"
        ]
        assert all(len(h["regions"]["boxes"]) == len(h["regions"]["weights"]) == 4 for h in hits)
        assert (
            client.get("/search", params={"q": "red", "k": 2}).json()["results"][0]["regions"]
            is None
        )
        got = client.get(f"/images/{hits[0]['id']}/explain", params={"q": "a red picture"})
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(got.content)).size == (32, 24)
        missing = client.get("/images/nope.png/explain", params={"q": "red"})
        assert missing.status_code == 404 and "nope.png" in missing.json()["detail"]
        assert (
            client.get(
                f"/images/{hits[0]['id']}/explain", params={"q": "red", "rerank": 1}
            ).status_code
            == 400
        )


def test_the_command_line_writes_overlays_and_token_weights(index_dir, corpus_dir, tmp_path):
    out = tmp_path / "why"
    r = CliRunner().invoke(
        app, ["search", str(index_dir), "a red picture", "--k", "2", "--explain", str(out)]
    )
    assert r.exit_code == 0, r.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2 and pngs[0].startswith("q01-01-")
    image = corpus_dir / "images" / "img01.png"
    r = CliRunner().invoke(
        app, ["search", str(index_dir), "--image", str(image), "--k", "2", "--explain", str(out)]
    )
    assert r.exit_code == 0, r.output
    tokens = json.loads((out / "q01-captions.json").read_text())
    assert len(tokens) == 2 and set(tokens[0]) == {"id", "tokens", "weights", "bias"}
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(
        app, ["search", str(index_dir), "red", "--explain", str(tmp_path / "file")]
    )
    assert r.exit_code != 0 and "is a file" in r.output
