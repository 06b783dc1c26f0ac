import pytest
import torch

from lightningdot.errors import DataError
from lightningdot.features import FeatureStore
from lightningdot.model.encoders import BiEncoder
from tests.helpers import tiny_model_config


@pytest.fixture(params=[0, 8], ids=["transformer-view", "with-pooled-view"])
def model(request):
    m = BiEncoder(tiny_model_config(pooled_dim=request.param))
    m.init_pretrained()
    return m.eval()


def test_batched_text_encoding_equals_one_by_one(model):
    texts = ["a red picture", "something much longer than the first caption", "blue"]
    with torch.no_grad():
        batched = model.encode_text(texts)
        single = torch.cat([model.encode_text([t]) for t in texts])
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3))


def test_batched_image_encoding_equals_one_by_one(model, store_dir):
    store = FeatureStore(store_dir)
    keys = store.keys()[:5]
    with torch.no_grad():
        batched = model.encode_image(store.batch(keys))
        single = torch.cat([model.encode_image(store.batch([k])) for k in keys])
    assert torch.allclose(batched, single, atol=1e-5)


def test_padding_regions_do_not_change_the_image_vector(model, store_dir):
    store = FeatureStore(store_dir)
    b = store.batch(["img00.png"])
    padded = type(b)(
        torch.cat([b.features, torch.randn(1, 3, b.features.shape[-1])], 1),
        torch.cat([b.boxes, torch.rand(1, 3, 7)], 1),
        torch.cat([b.mask, torch.zeros(1, 3, dtype=torch.bool)], 1),
    )
    with torch.no_grad():
        assert torch.allclose(model.encode_image(b), model.encode_image(padded), atol=1e-5)


def test_pooled_view_joins_two_unit_views_whose_cosines_the_score_averages(store_dir):
    from lightningdot.model.pooling import join_views

    m = BiEncoder(tiny_model_config(pooled_dim=8)).eval()
    regions = FeatureStore(store_dir).batch(["img00.png", "img01.png", "img02.png"])
    regions = regions.to(torch.device("cpu"))  # fp16 storage -> fp32, as encode_image does
    tokens = m.tokenize(["a red picture", "green", "a blue thing", "black"])
    with torch.no_grad():
        t_views = m.text.views(m.text(**tokens), tokens["attention_mask"])
        i_views = m.image.views(m.image(regions), regions)
        t, i = m.encode_text(tokens), m.encode_image(regions)
    assert [v.shape[1] for v in t_views] == [v.shape[1] for v in i_views] == [16, 8]
    assert t.shape == (4, m.cfg.vector_dim) and i.shape == (3, 24)
    assert torch.allclose(t, join_views(t_views)) and torch.allclose(i, join_views(i_views))
    assert torch.allclose(t.norm(dim=-1), torch.ones(4))
    by_view = [tv @ iv.T for tv, iv in zip(t_views, i_views, strict=True)]
    assert torch.allclose(m.score(t, i), (by_view[0] + by_view[1]) / 2, atol=1e-6)
    # The pooled image view is a linear map of the mean region feature and nothing else.
    mean = regions.features.mean(1)
    want = torch.nn.functional.normalize(m.image.pooled(mean), dim=-1)
    assert torch.allclose(i_views[1], want, atol=1e-6)


def test_score_is_the_dot_product(model):
    t, i = torch.randn(2, 16), torch.randn(3, 16)
    assert torch.allclose(model.score(t, i), t @ i.T)


def test_empty_caption_is_refused(model):
    with pytest.raises(DataError, match="empty"):
        model.encode_text(["fine", "  "])


def test_long_caption_is_truncated_with_one_warning(model):
    long = "word " * 100
    with pytest.warns(UserWarning, match="truncated"):
        out = model.tokenize([long])
    assert out["input_ids"].shape[1] == model.cfg.text.max_length


def test_freezing_keeps_lower_layers_and_embeddings_fixed():
    cfg = tiny_model_config()
    cfg.text.trainable_layers = 1
    m = BiEncoder(cfg)
    m.init_pretrained()
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text.bert.embeddings") for n in names)
    assert not any(n.startswith("text.bert.encoder.layer.0.") for n in names)
    assert any(n.startswith("text.bert.encoder.layer.1.") for n in names)
    assert "logit_scale" in names and "text.proj.weight" in names
    # Without packaged weights the frozen parts are random, so a checkpoint must hold them.
    assert "text.bert.embeddings.word_embeddings.weight" in m.stored_state()


def test_image_transformer_starts_from_text_layers():
    m = BiEncoder(tiny_model_config())
    m.init_pretrained()
    a = m.image.bert.encoder.layer[0].state_dict()
    b = m.text.bert.encoder.layer[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prefix_is_put_before_every_text():
    from dataclasses import replace

    cfg = tiny_model_config()
    model = BiEncoder(replace(cfg, text=replace(cfg.text, prefix="query: ")))
    got = model.tokenize(["a red picture"])["input_ids"][0].tolist()
    want = model.tokenizer("query: a red picture")["input_ids"]
    assert got == want


def test_inference_groups_captions_by_length_and_gives_the_padded_batchs_vectors():
    from lightningdot.model.encoders import by_length

    model = BiEncoder(tiny_model_config())
    model.init_pretrained()
    model.eval()
    texts = [("word " * n).strip() for n in (9, 1, 5, 12, 2, 2, 7, 3)]
    batch = model.tokenize(texts)
    with torch.no_grad():
        padded = model.text.vectors(batch["input_ids"], batch["attention_mask"])  # one batch
        widths = []

        def encode(ids, mask):
            assert mask[:, -1].any()  # cut to its longest: no column of padding only
            widths.append(ids.shape[1])
            return model.text.vectors(ids, mask)

        grouped = by_length(encode, batch["input_ids"], batch["attention_mask"], group=3)
        assert torch.allclose(model.encode_text(texts), padded, atol=1e-5)
    assert torch.allclose(grouped, padded, atol=1e-5)
    assert len(widths) == 3 and widths == sorted(widths) and widths[0] < widths[-1]
