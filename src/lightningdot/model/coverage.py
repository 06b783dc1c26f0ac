"""How much of a text query a model can read, said as warnings beside its answer.

A query is still answered whatever it holds (mixed languages, code-switching, emoji). Two
cases get a warning, since their results mean little and nothing else would tell the user:

- most of its characters fall in the tokenizer's unknown token: a script the vocabulary
  hardly covers (WordPiece gives [UNK] per unknown word, SentencePiece one <unk> per run of
  unknown characters, so the share is counted in characters, not tokens);
- a model trained on English captions alone gets a query mostly in another script.
"""

from __future__ import annotations

import unicodedata

from transformers import PreTrainedTokenizerBase

from lightningdot.config import TextConfig
from lightningdot.model.multilingual import NAME as MULTILINGUAL

UNKNOWN_SHARE = 0.5  # warn when more of the query's characters than this are unknown


def reads_many_languages(text: TextConfig) -> bool:
    """Whether a text encoder was made for many languages (else it reads English)."""
    return text.pretrained == MULTILINGUAL


def unknown_share(tokenizer: PreTrainedTokenizerBase, text: str) -> float:
    """The share of the text's non-space characters that the tokenizer maps to its unknown
    token."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    unk = tokenizer.unk_token_id
    unknown = sum(
        _visible(text[a:b])
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        if tok == unk
    )
    return unknown / max(1, _visible(text))


def latin_share(text: str) -> float:
    """The share of the text's letters that are Latin (1.0 for a text without letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    return sum("LATIN" in unicodedata.name(c, "") for c in letters) / len(letters)


def query_warnings(
    tokenizer: PreTrainedTokenizerBase, text_cfg: TextConfig, query: str
) -> list[str]:
    """What a user should know about how the model reads `query` (empty when nothing)."""
    out = []
    share = unknown_share(tokenizer, query)
    if share > UNKNOWN_SHARE:
        out.append(
            f"{share:.0%} of the query's characters are outside the text encoder's vocabulary "
            "(a script it hardly covers): its results mean little"
        )
    if not reads_many_languages(text_cfg) and latin_share(query) < 0.5:
        out.append(
            "this model reads English; for a query in another language use the "
            "multilingual model (--model multilingual)"
        )
    return out


def _visible(text: str) -> int:
    return sum(not c.isspace() for c in text)
