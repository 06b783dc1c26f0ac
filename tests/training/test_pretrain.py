import json
from pathlib import Path

import pytest
import torch

import lightningdot.precision
from lightningdot.config import DataConfig, LoopConfig, ObjectiveWeights, TrainConfig, load_config
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.precision import effective_bf16
from lightningdot.training.objectives import cmr_loss
from lightningdot.training.pretrain import PretrainingModel, train, weighted_loss
from tests.helpers import tiny_model_config


def recipe(corpus_dir, store_dir, epochs=2, lr=1e-3, **kw) -> TrainConfig:
    base = dict(
        model=tiny_model_config(),
        data=DataConfig(str(corpus_dir / "captions.json"), str(store_dir)),
        loop=LoopConfig(epochs=epochs, batch_size=4, lr=lr),
        text_lr=1e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_pretraining_step_returns_every_named_term_and_reaches_all_heads(store_dir):
    cfg = TrainConfig(model=tiny_model_config(), objectives=ObjectiveWeights(1, 1, 1))
    m = BiEncoder(cfg.model)
    m.init_pretrained()
    module = PretrainingModel(m, cfg)
    regions = FeatureStore(store_dir).batch(["img00.png", "img01.png", "img02.png"])
    tokens = m.tokenize(["a red picture", "green", "a blue thing"])
    losses = module(tokens, regions, torch.Generator().manual_seed(0))
    assert set(losses) == {"cmr_t2i", "cmr_i2t", "vmlm", "smrm_mrfr", "smrm_kl"}
    weighted_loss(losses, cfg.objectives).backward()
    for head in (module.heads.mlm, module.heads.region_features, module.heads.region_classes):
        assert all(p.grad is not None for p in head.parameters())
    assert m.image.feature_embed[0].weight.grad is not None


def test_each_view_has_its_own_cmr_loss_and_temperature(store_dir):
    cfg = TrainConfig(model=tiny_model_config(pooled_dim=8))
    m = BiEncoder(cfg.model)
    m.init_pretrained()
    m.eval()  # no dropout, so the views below are the ones the losses saw
    regions = FeatureStore(store_dir).batch(["img00.png", "img01.png", "img02.png"])
    regions = regions.to(torch.device("cpu"))
    tokens = m.tokenize(["a red picture", "green", "a blue thing"])
    losses = PretrainingModel(m, cfg)(tokens, regions, torch.Generator().manual_seed(0))
    assert set(losses) == {"cmr_t2i", "cmr_i2t", "cmr_pooled_t2i", "cmr_pooled_i2t"}
    with torch.no_grad():
        t_views = m.text.views(m.text(**tokens), tokens["attention_mask"])
        i_views = m.image.views(m.image(regions), regions)
    pooled = cmr_loss(t_views[1], i_views[1], m.pooled_logit_scale)
    assert torch.allclose(losses["cmr_pooled_t2i"], pooled["cmr_t2i"])
    want = sum(losses[k] for k in losses) / 2
    assert torch.allclose(weighted_loss(losses, cfg.objectives), want)
    weighted_loss(losses, cfg.objectives).backward()
    assert m.pooled_logit_scale.grad is not None and m.logit_scale.grad is not None
    assert m.image.pooled[1].weight.grad is not None and m.text.pooled_proj.weight.grad is not None


@pytest.mark.parametrize("pooled_dim", [0, 8])
def test_finetune_learns_and_checkpoints(corpus_dir, store_dir, tmp_path, pooled_dim):
    cfg = recipe(corpus_dir, store_dir, epochs=6, model=tiny_model_config(pooled_dim=pooled_dim))
    best = train(cfg, tmp_path / "run", log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6
    assert log[-1]["loss"]["loss"] < log[0]["loss"]["loss"]
    assert best["ar"] == max(r["val"]["ar"] for r in log)
    model = load_model(tmp_path / "run" / "best")
    assert model.cfg == cfg.model


def test_resume_continues_where_it_stopped(corpus_dir, store_dir, tmp_path):
    full = train(recipe(corpus_dir, store_dir, epochs=3), tmp_path / "a", log=lambda m: None)
    train(recipe(corpus_dir, store_dir, epochs=3), tmp_path / "b", log=lambda m: None)
    # Simulate an interruption after epoch 1 of 3 by running 3 epochs in two goes.
    first = recipe(corpus_dir, store_dir, epochs=3)
    train(first, tmp_path / "c", log=lambda m: None)
    messages = []
    again = train(first, tmp_path / "c", log=messages.append)
    assert "nothing to do" in messages[0]
    a = load_model(tmp_path / "a" / "last")
    b = load_model(tmp_path / "b" / "last")
    with torch.no_grad():  # seeded: two runs of one recipe agree
        assert torch.allclose(a.encode_text(["red"]), b.encode_text(["red"]), atol=1e-5)
    assert again["ar"] == full["ar"]


def test_resume_refuses_a_changed_recipe(corpus_dir, store_dir, tmp_path):
    train(recipe(corpus_dir, store_dir, epochs=1), tmp_path / "r", log=lambda m: None)
    with pytest.raises(ConfigMismatchError, match="lr"):
        train(recipe(corpus_dir, store_dir, epochs=1, lr=0.5), tmp_path / "r", log=lambda m: None)


def test_pretrain_then_finetune_with_hard_negatives(corpus_dir, store_dir, tmp_path):
    pre = recipe(corpus_dir, store_dir, objectives=ObjectiveWeights(1, 1, 1), epochs=1)
    train(pre, tmp_path / "pre", log=lambda m: None)
    fine = recipe(corpus_dir, store_dir, init_from=str(tmp_path / "pre" / "last"), hard_negatives=2)
    best = train(fine, tmp_path / "fine", log=lambda m: None)
    assert 0 <= best["ar"] <= 100


def test_missing_features_are_a_clear_error(corpus_dir, tmp_path):
    from tests.helpers import write_store

    write_store(tmp_path / "partial", ["img00.png"])
    with pytest.raises(DataError, match="ldot extract"):
        train(recipe(corpus_dir, tmp_path / "partial"), tmp_path / "r", log=lambda m: None)


def test_recipe_toml_with_unknown_key(tmp_path):
    (tmp_path / "r.toml").write_text("epochs = 2\n[model]\nembed_dimension = 3\n")
    with pytest.raises(DataError, match="embed_dimension"):
        load_config(TrainConfig, tmp_path / "r.toml")


@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in (Path(__file__).parents[2] / "recipes").rglob("*.toml"))
)
def test_every_shipped_recipe_parses(recipe):
    from lightningdot.config import AlignConfig, RerankTrainConfig

    path = next((Path(__file__).parents[2] / "recipes").rglob(recipe))
    kinds = {"reranker": RerankTrainConfig, "multilingual": AlignConfig}
    cls = next((c for prefix, c in kinds.items() if recipe.startswith(prefix)), TrainConfig)
    load_config(cls, path)


@pytest.mark.parametrize(
    ("requested", "native", "expected", "says"),
    [(True, True, True, False), (True, False, False, True), (False, False, False, False)],
)
def test_bf16_falls_back_to_float32_where_it_is_only_emulated(
    monkeypatch, requested, native, expected, says
):
    monkeypatch.setattr(lightningdot.precision, "native_bf16", lambda device: native)
    said: list[str] = []
    assert effective_bf16(requested, "cpu", said.append) is expected
    assert bool(said) is says and all("float32" in m for m in said)


def test_native_bf16_answers_for_this_cpu():
    assert isinstance(lightningdot.precision.native_bf16("cpu"), bool)
