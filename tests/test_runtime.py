"""The faster runtimes against eager PyTorch, the reference: same vectors, a cache that is
reused, and eager with one warning whenever a runtime cannot run."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import lightningdot.runtime as runtime
from lightningdot.cli import app
from lightningdot.config import RuntimeConfig
from lightningdot.errors import DataError
from lightningdot.features.backbones import EfficientNetLiteGrid
from lightningdot.model.encoders import BiEncoder
from tests.helpers import tiny_model_config

pytest.importorskip("onnxruntime")

CAPTIONS = [
    "a dog",
    "a red picture of a small house by the sea",
    "two people walk on a beach at sunset with their dog",
    "x",
]
ONNX = RuntimeConfig("onnx", threads=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDOT_CACHE", str(tmp_path / "cache"))


def tiny_model() -> BiEncoder:
    torch.manual_seed(3)
    model = BiEncoder(tiny_model_config())
    model.init_pretrained()
    return model.eval()


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_onnx_text_vectors_match_eager(batch):
    model = tiny_model()
    with torch.inference_mode():
        eager = model.encode_text(CAPTIONS[:batch])
        runtime.accelerate(model, ONNX)
        assert model.fast_text is not None
        fast = model.encode_text(CAPTIONS[:batch])
    assert fast.shape == eager.shape
    assert cosines(fast, eager).min() >= 0.999


def test_int8_text_vectors_stay_close():
    model = tiny_model()
    with torch.inference_mode():
        eager = model.encode_text(CAPTIONS)
        runtime.accelerate(model, RuntimeConfig("onnx-int8", threads=1))
        fast = model.encode_text(CAPTIONS)
    assert model.fast_text is not None
    assert cosines(fast, eager).min() >= 0.9  # a tiny random model; recall is benchmarked


def test_export_is_cached_and_reused(tmp_path, monkeypatch):
    runtime.accelerate(tiny_model(), ONNX)
    (made,) = (tmp_path / "cache" / "onnx").iterdir()

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(runtime, "export_onnx", no_export)
    model = runtime.accelerate(tiny_model(), ONNX)  # same weights: the cached graph
    assert model.fast_text is not None
    other = tiny_model()
    other.text.proj.bias.data += 1.0  # other weights: another graph, never the cached one
    with pytest.warns(RuntimeWarning, match="eager PyTorch"):
        runtime.accelerate(other, ONNX)
    assert other.fast_text is None
    assert [p.name for p in (tmp_path / "cache" / "onnx").iterdir()] == [made.name]


def test_missing_runtime_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    model = tiny_model()
    with pytest.warns(RuntimeWarning, match="text encoder runs on eager PyTorch") as seen:
        runtime.accelerate(model, ONNX)
    assert len(seen) == 1 and model.fast_text is None
    with torch.inference_mode():
        assert model.encode_text(CAPTIONS).shape == (4, model.cfg.vector_dim)


def test_unwritable_cache_still_runs_fast(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LDOT_CACHE", str(blocker))
    model = tiny_model()
    with pytest.warns(UserWarning, match="cannot cache"):
        runtime.accelerate(model, ONNX)
    assert model.fast_text is not None


def test_training_goes_back_to_eager():
    model = runtime.accelerate(tiny_model(), ONNX)
    model.train()
    assert model.fast_text is None and model.runtime is None
    assert model.encode_text(CAPTIONS).requires_grad


def test_auto_follows_the_environment(monkeypatch):
    monkeypatch.setenv("LDOT_RUNTIME", "eager")
    assert runtime.resolve("auto") == "eager"
    monkeypatch.delenv("LDOT_RUNTIME")
    assert runtime.resolve("auto") == "onnx"
    monkeypatch.setenv("LDOT_RUNTIME", "tpu")
    with pytest.raises(DataError, match="runtime must be one of"):
        runtime.resolve("auto")


class TinyNet(nn.Module):
    """EfficientNet's two entry points, in miniature: a feature map and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1, groups=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self._fc = nn.Linear(8, 5)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.depthwise(torch.relu(self.conv(x))))


class TinyGrid(EfficientNetLiteGrid):
    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.name, self.image_size, self.graph = "tiny-grid", 16, None
        torch.manual_seed(1)
        self.net = TinyNet().eval()


@pytest.mark.parametrize("kind", ["onnx", "onnx-int8"])  # int8 quantises the text side only
def test_onnx_backbone_regions_match_eager(kind):
    backbone = TinyGrid()
    pixels = torch.randn(3, 3, 16, 16)
    eager = backbone(pixels)
    runtime.accelerate_backbone(backbone, RuntimeConfig(kind, threads=1))
    assert backbone.graph is not None
    fast = backbone(pixels)
    for e, f in zip(eager, fast, strict=True):
        assert torch.allclose(e.features, f.features, atol=1e-5)
        assert torch.equal(e.boxes, f.boxes)
        assert torch.allclose(e.soft_labels, f.soft_labels, atol=1e-5)
    assert all(r.soft_labels is None for r in backbone(pixels, soft_labels=False))


@pytest.mark.slow
def test_shipped_backbone_on_onnx_matches_eager():
    from lightningdot.features import create_backbone

    backbone = create_backbone("efficientnet-lite2")
    pixels = torch.rand(2, 3, 260, 260) * 2 - 1
    eager = backbone(pixels, soft_labels=False)
    runtime.accelerate_backbone(backbone, ONNX)
    fast = backbone(pixels, soft_labels=False)
    for e, f in zip(eager, fast, strict=True):
        assert cosines(e.features, f.features).min() >= 0.999


def test_cli_index_and_search_on_onnx_agree_with_eager(corpus_dir, model_dir, tmp_path):
    runner = CliRunner()
    common = ["--images", str(corpus_dir / "images"), "--model", str(model_dir)]
    for kind in ("eager", "onnx"):
        out = tmp_path / kind
        r = runner.invoke(app, ["index", "--out", str(out), *common, "--runtime", kind])
        assert r.exit_code == 0, r.output
    results = {}
    for kind in ("eager", "onnx"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            r = runner.invoke(
                app, ["search", str(tmp_path / kind), "a red picture", "--json", "--runtime", kind]
            )
        assert r.exit_code == 0, r.output
        results[kind] = json.loads(r.stdout)["results"]
    eager, fast = results["eager"], results["onnx"]
    assert [x["id"] for x in eager] == [x["id"] for x in fast]
    assert [x["score"] for x in fast] == pytest.approx([x["score"] for x in eager], abs=1e-4)


def test_cli_refuses_an_unknown_runtime(index_dir):
    r = CliRunner().invoke(app, ["search", str(index_dir), "red", "--runtime", "gpu"])
    assert r.exit_code == 2 and "runtime must be one of" in r.output


def test_a_damaged_cached_graph_is_made_again(tmp_path):
    runtime.accelerate(tiny_model(), ONNX)
    (cached,) = (tmp_path / "cache" / "onnx").iterdir()
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        model = runtime.accelerate(tiny_model(), ONNX)
    assert model.fast_text is not None and cached.stat().st_size > 1000


def test_the_cache_tells_configs_apart_not_only_weights():
    import dataclasses

    cls_model = tiny_model()
    cfg = tiny_model_config()
    cfg.text = dataclasses.replace(cfg.text, pooling="mean")
    mean_model = BiEncoder(cfg).eval()
    mean_model.load_state_dict(cls_model.state_dict())  # the same weights, another pooling
    for model in (cls_model, mean_model):
        with torch.inference_mode():
            eager = model.encode_text(CAPTIONS)
            runtime.accelerate(model, ONNX)
            assert cosines(model.encode_text(CAPTIONS), eager).min() >= 0.999


def test_eager_takes_a_model_off_the_fast_path():
    model = runtime.accelerate(tiny_model(), ONNX)
    runtime.accelerate(model, RuntimeConfig("eager"))
    assert model.fast_text is None and model.runtime is None


def test_states_flag_is_for_builds(index_dir, corpus_dir):
    r = CliRunner().invoke(
        app,
        [
            "index",
            "--out",
            str(index_dir),
            "--images",
            str(corpus_dir / "images"),
            "--add",
            "--no-states",
        ],
    )
    assert r.exit_code == 2 and "an add keeps the index's own" in r.output
