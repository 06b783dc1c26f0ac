"""Model and re-ranker folders: `config.json` + `model.safetensors` holding only what training
changed, `bank.safetensors` when a model has a query bank (`lightningdot.model.prior`), and
`concepts.safetensors` when it has a concept view (`lightningdot.model.concepts`).

The pretrained parts are rebuilt from their PyPI packages (checked by hash), so a shipped model
stores just its trained parameters. Names such as "default" resolve to folders inside the package
(`lightningdot.model.shipped`). A re-ranker folder records the identity of the bi-encoder it
was trained on, and loading it over any other is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lightningdot.config import ConceptConfig, ModelConfig, RerankerConfig, from_dict, to_dict
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.io import read_json, write_json, write_safetensors
from lightningdot.model.concepts import ConceptView, assemble_view, names_digest
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.prior import QueryBank
from lightningdot.model.reranker import Reranker
from lightningdot.model.shipped import WHAT, Kind, resolve

FORMAT = 1


def save_model(
    folder: str | os.PathLike[str],
    model: BiEncoder,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the model's config, trained parameters and query bank, each file atomically."""
    folder = Path(folder)
    _write_weights(folder, model, dtype)
    config = {"format": FORMAT, "model": to_dict(model.cfg), **(extra or {})}
    # A model with `image_from` uses that model's bank and concept view, like the rest of its
    # image side.
    own = not model.cfg.image_from
    bank = write_bank(folder, model.bank if own else None, dtype)
    concepts = write_concepts(folder, model.concepts if own else None, dtype)
    write_json(
        folder / "config.json",
        config | ({"bank": bank} if bank else {}) | ({"concepts": concepts} if concepts else {}),
    )


def _write_weights(folder: Path, module: BiEncoder | nn.Module, dtype: torch.dtype) -> None:
    """`model.safetensors`: the parameters the module stores (`stored_state()`), in `dtype`."""
    state = {k: v.to(dtype) for k, v in module.stored_state().items()}
    write_safetensors(folder / "model.safetensors", state, metadata={"format": str(FORMAT)})


def attach_bank(folder: str | os.PathLike[str], bank: QueryBank) -> None:
    """Give the model saved in `folder` a query bank (`ldot bank`), replacing any it had."""
    folder = Path(folder)
    saved = read_folder_config(folder, "model")
    saved["bank"] = write_bank(folder, bank, torch.float32)
    write_json(folder / "config.json", saved)


def write_bank(folder: Path, bank: QueryBank | None, dtype: torch.dtype) -> dict[str, Any] | None:
    """Write (or, for None, remove) a model folder's bank file; return its `config.json` entry.

    The file goes first: until `config.json` names it, a new bank file is ignored.
    """
    path = Path(folder) / "bank.safetensors"
    if bank is None:
        path.unlink(missing_ok=True)
        return None
    tensors = {"text": bank.text.to(dtype), "image": bank.image.to(dtype)}
    write_safetensors(path, tensors, metadata={"format": str(FORMAT)})
    return {"beta": bank.beta, **bank.source}


def load_bank(folder: Path, saved: dict[str, Any], dim: int) -> QueryBank | None:
    """The query bank of a model folder, or None when it has none."""
    if "bank" not in saved:
        return None
    path = folder / "bank.safetensors"
    try:
        with safe_open(path, framework="pt") as f:
            text, image = f.get_tensor("text").float(), f.get_tensor("image").float()
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise DataError(f"damaged or missing query bank {path}: {e}") from e
    if text.shape[1:] != (dim,) or image.shape[1:] != (dim,):
        raise ConfigMismatchError(f"{path} holds vectors of another size than the model's {dim}")
    source = {k: v for k, v in saved["bank"].items() if k != "beta"}
    return QueryBank(text, image, float(saved["bank"]["beta"]), source)


def attach_concepts(folder: str | os.PathLike[str], view: ConceptView) -> None:
    """Give the model saved in `folder` a concept view (`ldot concepts`), replacing any it had."""
    folder = Path(folder)
    saved = read_folder_config(folder, "model")
    saved["concepts"] = write_concepts(folder, view, torch.float32)
    write_json(folder / "config.json", saved)


def write_concepts(
    folder: Path, view: ConceptView | None, dtype: torch.dtype
) -> dict[str, Any] | None:
    """Write (or, for None, remove) a model folder's concept-view file; return its
    `config.json` entry. As for the bank, the file goes first. (In float16 the spreads the
    covariance gives move by about 1e-4 of themselves: small against what the gate weighs.)"""
    path = Path(folder) / "concepts.safetensors"
    if view is None:
        path.unlink(missing_ok=True)
        return None
    tensors = {k: getattr(view, k).to(dtype) for k in ("names", "mean", "cov")}
    write_safetensors(path, tensors, metadata={"format": str(FORMAT)})
    return {**to_dict(view.cfg), "names_sha256": names_digest()}


def load_concepts(folder: Path, saved: dict[str, Any], model: BiEncoder) -> ConceptView | None:
    """The concept view of a model folder, its classifier and text branch rebuilt from their
    packages; None when it has none.

    Raises:
        ConfigMismatchError: the names were embedded from another class-name file than the
            one installed, or do not fit the backbone's classifier.
    """
    if "concepts" not in saved:
        return None
    entry = dict(saved["concepts"])
    if entry.pop("names_sha256", None) != names_digest():
        raise ConfigMismatchError(
            f"{folder}'s concept view embedded another class-name file than the installed "
            "one; run `ldot concepts` on it again"
        )
    path = folder / "concepts.safetensors"
    try:
        with safe_open(path, framework="pt") as f:
            names, mean, cov = (f.get_tensor(k).float() for k in ("names", "mean", "cov"))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise DataError(f"damaged or missing concept view {path}: {e}") from e
    return assemble_view(model.cfg, from_dict(ConceptConfig, entry), names, mean, cov)


def read_folder_config(folder: Path, kind: Kind) -> dict[str, Any]:
    """The `config.json` of a model or re-ranker folder, checked for format and kind."""
    what = WHAT[kind]
    path = Path(folder) / "config.json"
    saved = read_json(
        path, f"{what} config", missing=f"not a {what} folder (no config.json): {folder}"
    )
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or kind not in saved:
        raise DataError(f"{path} is not a lightningdot {what} config (format {FORMAT})")
    return saved


def read_model_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    saved = read_folder_config(folder, "model")
    return from_dict(ModelConfig, saved["model"]), saved


def load_state_into(model: nn.Module, weights: Path) -> None:
    """Load trained parameters into a module that names them in `stored_state()`, refusing a
    file whose names or shapes do not fit it."""
    if not weights.is_file():
        raise DataError(f"weights not found: {weights}")
    try:
        with safe_open(weights, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise DataError(f"damaged weights {weights}: {e}") from e
    expected = model.stored_state()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ConfigMismatchError(
            f"{weights} does not fit the config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConfigMismatchError(
                f"{weights}: {name} has shape {tuple(tensor.shape)}, "
                f"the config makes {tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name].to(param.dtype))


def model_identity(model: BiEncoder) -> str:
    """A fingerprint of the config and every stored parameter: indexes record who made them.

    `image_from` says where part of the model is loaded from, not what the model computes
    (`shares_index_with` pins that part), so it is left out.
    """
    cfg = to_dict(model.cfg)
    cfg.pop("image_from")
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name, tensor in sorted(model.stored_state().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()


def index_identity(model: BiEncoder) -> str:
    """The identity an index records and checks: the model's own, or that of the model whose
    embedding space and image encoder it shares (`ModelConfig.shares_index_with`)."""
    return model.cfg.shares_index_with or model_identity(model)


def load_model(name_or_path: str | os.PathLike[str] | None = "default") -> BiEncoder:
    """Build a BiEncoder from a shipped name or a model folder, in eval mode, on the CPU."""
    folder = resolve("model", name_or_path)
    cfg, saved = read_model_config(folder)
    model = BiEncoder(cfg)
    model.init_pretrained()
    if cfg.image_from:
        base = load_model(cfg.image_from)
        if index_identity(base) != cfg.shares_index_with:
            raise ConfigMismatchError(
                f"{folder} was trained against another {cfg.image_from!r} than the one found "
                "(its weights changed since); train it again against this one"
            )
        model.adopt_image_side(base)
    load_state_into(model, folder / "model.safetensors")
    if not cfg.image_from:
        model.concepts = load_concepts(folder, saved, model)
        model.bank = load_bank(folder, saved, model.cfg.vector_dim)
    return model.eval()


def save_reranker(
    folder: str | os.PathLike[str],
    reranker: Reranker,
    bi_name: str,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the re-ranker's config, the identity of its bi-encoder and its own parameters."""
    folder = Path(folder)
    _write_weights(folder, reranker.cross, dtype)
    config = {
        "format": FORMAT,
        "reranker": to_dict(reranker.cfg),
        "bi_encoder": bi_name,
        "bi_encoder_id": model_identity(reranker.bi),
        **(extra or {}),
    }
    write_json(folder / "config.json", config)


def load_reranker(
    name_or_path: str | os.PathLike[str] = "default", bi: BiEncoder | None = None
) -> Reranker:
    """A shipped re-ranker name or folder -> Reranker over `bi` (default: its own bi-encoder).

    Raises:
        ConfigMismatchError: `bi` is not the bi-encoder the re-ranker was trained on.
    """
    folder = resolve("reranker", name_or_path)
    saved = read_folder_config(folder, "reranker")
    cfg = from_dict(RerankerConfig, saved["reranker"])
    bi = bi if bi is not None else load_model(saved["bi_encoder"])
    if model_identity(bi) != saved["bi_encoder_id"]:
        raise ConfigMismatchError(
            f"re-ranker {folder} was trained on bi-encoder {saved['bi_encoder_id'][:12]}, "
            f"not on the loaded model {model_identity(bi)[:12]}; train one for this model with "
            "`ldot train-reranker`"
        )
    reranker = Reranker(bi, cfg)
    load_state_into(reranker.cross, folder / "model.safetensors")
    return reranker.eval()
