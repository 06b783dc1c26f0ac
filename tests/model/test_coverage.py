"""Warnings beside the answer to a query the model can hardly read."""

import pytest

from lightningdot.config import TextConfig
from lightningdot.model.coverage import latin_share, query_warnings, unknown_share
from lightningdot.model.multilingual import NAME as MULTILINGUAL
from lightningdot.model.pretrained import DEFAULT_TOKENIZER, load_tokenizer

OL_CHIKI = "ᱚᱞ ᱪᱤᱠᱤ ᱥᱟᱱᱛᱟᱲᱤ"  # a script outside MiniLM's (and XLM-R's) vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_TOKENIZER)


def test_unknown_share_counts_characters_of_unknown_tokens(tokenizer):
    assert unknown_share(tokenizer, "a dog runs") == 0
    assert unknown_share(tokenizer, OL_CHIKI) == 1
    # 3 unknown words of 5 letters each beside 2 known ones of 1 and 3.
    mixed = "a ᱚᱞᱪᱤᱠ dog ᱚᱞᱪᱤᱠ ᱚᱞᱪᱤᱠ"
    assert unknown_share(tokenizer, mixed) == pytest.approx(15 / 19)


def test_latin_share_counts_letters_only():
    assert latin_share("a dog, 2 cats!") == 1
    assert latin_share("狗 dog") == pytest.approx(3 / 4)
    assert latin_share("123 ?!") == 1


def test_warnings_name_an_unread_script_and_another_language_for_an_english_model(tokenizer):
    english, many = TextConfig(pretrained=None), TextConfig(pretrained=MULTILINGUAL)
    assert query_warnings(tokenizer, english, "a dog runs on the beach") == []
    assert query_warnings(tokenizer, many, "a dog 在海滩上 runs") == []
    (other,) = query_warnings(tokenizer, english, "собака бежит по пляжу")  # Russian
    assert "reads English" in other and "--model multilingual" in other
    assert query_warnings(tokenizer, many, "собака бежит по пляжу") == []
    unread = query_warnings(tokenizer, many, OL_CHIKI)
    assert len(unread) == 1 and "100% of the query's characters" in unread[0]


def test_search_answers_a_query_it_cannot_read_with_a_warning(index_dir):
    from lightningdot.retrieval import Retriever

    r = Retriever.open(index_dir)
    plain, unread, mixed = r.search_text(["a red picture", OL_CHIKI, "a red 图片 🙂"], k=3)
    assert plain.warnings == [] and mixed.warnings == []
    assert len(unread.results) == 3 and any("vocabulary" in w for w in unread.warnings)
