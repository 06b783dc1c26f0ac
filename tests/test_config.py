"""Typed configs: recipes in the `[loop]` layout and in the flat one before it, defaults."""

import json

import pytest

from lightningdot.config import (
    AlignConfig,
    LoopConfig,
    RerankTrainConfig,
    TrainConfig,
    from_dict,
    load_config,
)
from lightningdot.errors import DataError
from lightningdot.model.shipped import shipped_dir


def test_a_flat_recipe_of_before_the_loop_table_reads_as_the_nested_one(tmp_path):
    flat = "text_lr = 1e-4\nepochs = 3\nlr = 2e-3\nbf16 = true\n[objectives]\ncmr = 1.0\n"
    nested = "text_lr = 1e-4\n[loop]\nepochs = 3\nlr = 2e-3\nbf16 = true\n[objectives]\ncmr = 1.0\n"
    (tmp_path / "flat.toml").write_text(flat)
    (tmp_path / "nested.toml").write_text(nested)
    a, b = (
        load_config(TrainConfig, tmp_path / "flat.toml"),
        load_config(TrainConfig, tmp_path / "nested.toml"),
    )
    assert a == b and a.loop.epochs == 3 and a.loop.bf16 and a.text_lr == 1e-4


@pytest.mark.parametrize(
    ("cls", "epochs", "batch_size", "lr"),
    [(TrainConfig, 10, 128, 5e-4), (RerankTrainConfig, 1, 32, 1e-4), (AlignConfig, 6, 128, 1e-4)],
)
def test_a_partial_loop_table_keeps_the_defaults_of_its_trainer(cls, epochs, batch_size, lr):
    data = {"loop": {"seed": 7}}
    if cls is AlignConfig:
        data["annotations"] = ["x.json"]
    cfg = from_dict(cls, data)
    assert cfg.loop == LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=7)


@pytest.mark.parametrize(
    ("folder", "key", "cls"),
    [
        (("model", "default"), "train", TrainConfig),
        (("reranker", "default"), "train", RerankTrainConfig),
    ],
)
def test_the_recipes_recorded_in_the_shipped_weights_still_read(folder, key, cls):
    saved = json.loads((shipped_dir(*folder) / "config.json").read_text())
    assert "loop" not in saved[key]  # written in the flat layout
    cfg = from_dict(cls, saved[key])
    assert cfg.loop.epochs == saved[key]["epochs"] and cfg.loop.lr == saved[key]["lr"]


def test_the_shipped_multilingual_recipe_reads_in_the_loop_layout():
    saved = json.loads((shipped_dir("model", "multilingual") / "config.json").read_text())
    cfg = from_dict(AlignConfig, saved["align"])
    assert cfg.loop.epochs == saved["align"]["loop"]["epochs"] and len(cfg.annotations) == 6


def test_loop_keys_in_both_places_are_refused_and_unknown_keys_are_named(tmp_path):
    with pytest.raises(DataError, match="both at the top and in"):
        from_dict(TrainConfig, {"epochs": 3, "loop": {"epochs": 5}})
    with pytest.raises(DataError, match="epoch"):
        from_dict(TrainConfig, {"loop": {"epoch": 3}})
    with pytest.raises(DataError, match="batch_size >= 2"):
        from_dict(TrainConfig, {"loop": {"batch_size": 1}})
