import json

import torch
from typer.testing import CliRunner

from lightningdot.cli import app
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import save_model
from lightningdot.model.encoders import BiEncoder
from tests.helpers import tiny_model_config

runner = CliRunner()


def test_extract_command_reports_skips_and_resumes(corpus_dir, tmp_path):
    (corpus_dir / "images" / "img03.png").write_bytes(b"broken")
    args = [
        "extract",
        "--images",
        str(corpus_dir / "images"),
        "--out",
        str(tmp_path / "s"),
        "--annotations",
        str(corpus_dir / "captions.json"),
        "--backbone",
        "test-colour",
        "--runtime",  # a backbone without a grid network stays eager on any runtime
        "onnx",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "11 extracted" in r.output and "1 failed" in r.output and "img03.png" in r.output
    assert len(FeatureStore(tmp_path / "s")) == 11
    r = runner.invoke(app, args)
    assert "11 already done" in r.output


def test_user_errors_exit_2_without_traceback(tmp_path):
    r = runner.invoke(
        app, ["extract", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]
    )
    assert r.exit_code == 2
    assert "image folder not found" in r.output and "Traceback" not in r.output


def test_evaluate_json_layout(corpus_dir, store_dir, tmp_path):
    model = BiEncoder(tiny_model_config())
    model.init_pretrained()
    save_model(tmp_path / "model", model)
    out = tmp_path / "m.json"
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--annotations",
            str(corpus_dir / "captions.json"),
            "--images",
            str(corpus_dir / "images"),
            "--split",
            "val",
            "--model",
            str(tmp_path / "model"),
            "--features",
            str(store_dir),
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert set(m) == {"t2i", "i2t", "ar", "n_images", "n_captions"}
    assert set(m["t2i"]) == set(m["i2t"]) == {"r1", "r5", "r10"}
    assert (m["n_images"], m["n_captions"]) == (4, 8)
    # Same numbers as computing the metrics directly.
    from lightningdot.data import read_karpathy
    from lightningdot.encode import encode_texts
    from lightningdot.evaluation.metrics import recall_metrics

    val = read_karpathy(corpus_dir / "captions.json", "val")
    with torch.no_grad():
        img = model.eval().encode_image(FeatureStore(store_dir).batch(val.keys()))
    direct = recall_metrics(encode_texts(model, val.captions), img, val.caption_image)
    assert m["ar"] == direct["ar"]


def test_evaluate_unknown_split_is_a_clear_error(corpus_dir):
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--annotations",
            str(corpus_dir / "captions.json"),
            "--images",
            str(corpus_dir / "images"),
            "--split",
            "test",
        ],
    )
    assert r.exit_code == 2 and "no split 'test'" in r.output


def test_finetune_refuses_pretraining_objectives(tmp_path):
    (tmp_path / "r.toml").write_text("[objectives]\nvmlm = 1.0\n")
    r = runner.invoke(app, ["finetune", str(tmp_path / "r.toml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "CMR alone" in r.output
