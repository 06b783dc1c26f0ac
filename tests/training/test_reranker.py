"""Training of the re-ranker: mined negatives, checkpoints, the log and the fusion weight."""

import json

import pytest
import torch

import lightningdot.precision
from lightningdot.config import (
    BankConfig,
    DataConfig,
    LoopConfig,
    RerankerConfig,
    RerankTrainConfig,
)
from lightningdot.encode import encode_regions, encode_texts
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_reranker, save_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.prior import hub_prior
from lightningdot.training.bank import make_bank
from lightningdot.training.data import load_split
from lightningdot.training.reranker import drop_region_states, mine_negatives, train_reranker
from tests.helpers import tiny_model_config, tiny_reranker


def test_mined_negatives_are_the_top_wrong_answers_as_the_index_ranks_them(corpus_dir, store_dir):
    bi = BiEncoder(tiny_model_config()).eval()
    data = DataConfig(str(corpus_dir / "captions.json"), str(store_dir))
    train = load_split(data, "train", FeatureStore(store_dir), soft_labels=False)
    bi.bank = make_bank(bi, data.annotations, store_dir, BankConfig(size=5, beta=4.0))
    with torch.no_grad():
        text = encode_texts(bi, train.corpus.captions)
        image = encode_regions(bi, train.regions.chunks(4))
    mined = mine_negatives(bi, train, 3, text, image)
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


@pytest.mark.parametrize(
    ("region_keep", "num_layers", "bf16", "native"),
    [(1.0, 1, False, True), (0.5, 2, True, True), (1.0, 1, True, False)],
    ids=["one-layer", "two-layers-half-regions-bf16", "bf16-emulated-falls-back"],
)
def test_train_reranker_writes_checkpoints_and_a_log(
    corpus_dir, store_dir, tmp_path, monkeypatch, region_keep, num_layers, bf16, native
):
    # Whatever this machine's CPU: bf16 runs where it is native, float32 where emulated.
    monkeypatch.setattr(lightningdot.precision, "native_bf16", lambda device: native)
    r = tiny_reranker()
    save_model(tmp_path / "bi", r.bi)
    cfg = RerankTrainConfig(
        reranker=RerankerConfig(num_layers=num_layers),
        data=DataConfig(str(corpus_dir / "captions.json"), str(store_dir)),
        bi_encoder=str(tmp_path / "bi"),
        loop=LoopConfig(epochs=2, batch_size=4, lr=1e-4, bf16=bf16),
        negatives=2,
        mine_from=3,
        region_keep=region_keep,
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
    assert saved["train"]["loop"]["bf16"] is (bf16 and native)


def test_train_reranker_chooses_the_fusion_weight_on_val(corpus_dir, store_dir, tmp_path):
    r = tiny_reranker()
    save_model(tmp_path / "bi", r.bi)
    cfg = RerankTrainConfig(
        reranker=RerankerConfig(num_layers=1, fusion=1.0),
        data=DataConfig(str(corpus_dir / "captions.json"), str(store_dir)),
        bi_encoder=str(tmp_path / "bi"),
        loop=LoopConfig(epochs=1, batch_size=4, lr=1e-4),
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
