"""The cross-attention re-ranker: its scores, and its storage."""

import pytest
import torch

from lightningdot.config import BertSize, RerankerConfig
from lightningdot.errors import ConfigMismatchError
from lightningdot.features import FeatureStore
from lightningdot.model.checkpoint import load_model, load_reranker, save_model, save_reranker
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.reranker import (
    CrossEncoder,
    Reranker,
    caption_states,
    gallery_states,
    vectors_of_states,
)
from tests.helpers import tiny_model_config, tiny_reranker


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
