import json

import pytest
import torch
from safetensors import safe_open

from lightningdot.config import ImageConfig, ModelConfig, TextConfig
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_model, save_model
from lightningdot.model.encoders import BiEncoder
from tests.helpers import tiny_model_config


def trained_model(pooled_dim: int = 0) -> BiEncoder:
    m = BiEncoder(tiny_model_config(pooled_dim=pooled_dim))
    m.init_pretrained()
    with torch.no_grad():
        for p in m.stored_state().values():
            p.add_(0.01 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("pooled_dim", [0, 8])
def test_round_trip_reproduces_embeddings(tmp_path, store_dir, pooled_dim):
    m = trained_model(pooled_dim)
    save_model(tmp_path / "m", m)
    loaded = load_model(tmp_path / "m")
    regions = FeatureStore(store_dir).batch(["img00.png", "img01.png"])
    with torch.no_grad():
        assert torch.allclose(
            m.encode_text(["a red cat"]), loaded.encode_text(["a red cat"]), atol=1e-6
        )
        assert torch.allclose(m.encode_image(regions), loaded.encode_image(regions), atol=1e-6)


def test_packaged_weights_are_not_stored_and_fp16_round_trips(tmp_path):
    # The real packaged MiniLM: frozen layers come back from the package, not from the file.
    cfg = ModelConfig(
        text=TextConfig(trainable_layers=1),
        image=ImageConfig(feature_dim=16, num_classes=10, num_layers=1),
        embed_dim=16,
    )
    m = BiEncoder(cfg)
    m.init_pretrained()
    m.eval()
    save_model(tmp_path / "m", m, torch.float16)
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    assert not any(
        k.startswith(("text.bert.embeddings", "text.bert.encoder.layer.0.")) for k in keys
    )
    assert any(k.startswith("text.bert.encoder.layer.5.") for k in keys)
    loaded = load_model(tmp_path / "m")
    with torch.no_grad():
        a, b = m.encode_text(["a dog runs"]), loaded.encode_text(["a dog runs"])
    assert torch.allclose(a, b, atol=5e-3)  # fp16 storage


def test_checkpoint_of_another_config_names_the_mismatch(tmp_path):
    save_model(tmp_path / "m", trained_model())
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["model"]["embed_dim"] = 8
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigMismatchError, match="shape"):
        load_model(tmp_path / "m")


def test_missing_and_damaged_models(tmp_path):
    with pytest.raises(DataError, match="no model"):
        load_model(tmp_path / "nothing")
    save_model(tmp_path / "m", trained_model())
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(DataError, match="damaged"):
        load_model(tmp_path / "m")


def test_atomic_writes_leave_files_readable_like_any_other(tmp_path):
    import os

    from lightningdot.io import write_json

    m = trained_model()
    save_model(tmp_path / "m", m)
    write_json(tmp_path / "x.json", {})
    umask = os.umask(0)
    os.umask(umask)
    for f in [
        tmp_path / "m" / "model.safetensors",
        tmp_path / "m" / "config.json",
        tmp_path / "x.json",
    ]:
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~umask, f
