"""`ldot bench`: the three ways of answering a text query, timed."""

import json

import pytest

from lightningdot.model.checkpoint import save_model, save_reranker
from tests.helpers import tiny_reranker


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
