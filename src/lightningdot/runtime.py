"""Inference runtimes: the text encoder and the image backbone on ONNX Runtime.

Eager PyTorch is the reference, and what training runs. For answering queries and indexing
images, the same forward passes exported to ONNX run two to seven times faster on a small CPU
(`benchmarks/runtimes.py`; depthwise convolutions are where eager PyTorch is weakest):

    kind         what runs                                         vectors against eager's
    "eager"      PyTorch, as trained                               the same
    "onnx"       ONNX Runtime, float32 export                      cosine >= 0.999 (tested)
    "onnx-int8"  ONNX Runtime, the text encoder's dynamic int8     recall measured, not matched
                 quantisation (the backbone stays float32)
    "auto"       $LDOT_RUNTIME when set, else "onnx"

A module is exported once per weights (and torch version) into the cache folder ($LDOT_CACHE,
else $XDG_CACHE_HOME/lightningdot, else ~/.cache/lightningdot), named by a hash of its weights,
and reused by every later process. A runtime that is not installed, or a module that does not
export, falls back to eager with one warning: never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightningdot.config import RuntimeConfig
from lightningdot.features.backbones import Backbone
from lightningdot.io import atomic_path
from lightningdot.model.encoders import BiEncoder, text_vectors

EXPORT_VERSION = 2  # bump when what is exported changes, so older cached graphs are not reused
# Two captions of different lengths: the traced graph must see padding to keep the mask.
EXAMPLE_CAPTIONS = ["a dog runs across the green grass", "two people"]


def resolve(kind: str) -> str:
    """The runtime `kind` names ("auto": $LDOT_RUNTIME, else "onnx")."""
    if kind == "auto":
        kind = os.environ.get("LDOT_RUNTIME", "onnx")
        RuntimeConfig(kind if kind != "auto" else "onnx")  # a bad value: a clear error
    return "onnx" if kind == "auto" else kind


def cache_dir() -> Path:
    if os.environ.get("LDOT_CACHE"):
        return Path(os.environ["LDOT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightningdot"


class TextGraph(nn.Module):
    """`BiEncoder.encode_text` from token tensors: (B, T) ids and mask -> (B, D) vectors."""

    def __init__(self, model: BiEncoder) -> None:
        super().__init__()
        self.text, self.concepts = model.text, model.concepts
        # What the graph does beyond its weights (the pooling, say), for its cache name.
        concepts = asdict(model.concepts.cfg) if model.concepts is not None else None
        self.config = json.dumps([asdict(model.cfg.text), concepts], sort_keys=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return text_vectors(self.text, self.concepts, input_ids, attention_mask)


class GridGraph(nn.Module):
    """A grid backbone's feature map: (B, 3, S, S) pixels -> (B, C, h, w)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.net = backbone.net
        self.config = f"{backbone.name} {backbone.image_size}"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels)


def fingerprint(module: nn.Module, kind: str) -> str:
    """A name for `module`'s export: its class and config, its weights, and the versions of
    the exporter and of the runtime that will read it."""
    import onnxruntime

    versions = f"{EXPORT_VERSION} {torch.__version__} {onnxruntime.__version__}"
    config = getattr(module, "config", "")
    h = hashlib.sha256(f"{type(module).__name__} {config} {kind} {versions}".encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        h.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class OnnxFunction:
    """An ONNX Runtime session called like the module it was exported from."""

    def __init__(self, graph: str | bytes, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle threads that spin steal the cores the event loop and the decoders need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        feed = {name: t.numpy() for name, t in zip(self.inputs, tensors, strict=True)}
        return torch.from_numpy(np.ascontiguousarray(self.session.run(None, feed)[0]))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's notes (printed, warned and logged) are for its own developers."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)


def export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], dims, path):
    """`module` to ONNX at `path`, with the dynamic axes `dims` ({input: {axis: Dim}})."""
    with _quiet_exporter():
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=names,
            output_names=["out"],
            dynamic_shapes=dims,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def quantize_onnx(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of the graph at `src`, written to `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def _session(module, example, names, dims, kind: str, threads: int) -> OnnxFunction:
    """A session over `module`'s graph: the cached one, else one made now (and cached). A
    cached file that does not load (damaged, or of a runtime that cannot read it) is made
    again, not left to fail every later process."""
    name = f"{type(module).__name__.lower()}-{fingerprint(module, kind)}.onnx"
    path = cache_dir() / "onnx" / name
    if path.is_file():
        try:
            return OnnxFunction(str(path), threads)
        except Exception:  # noqa: BLE001 - whatever is wrong with it, a new export replaces it
            path.unlink(missing_ok=True)
    return OnnxFunction(_made(module, example, names, dims, kind, path), threads)


def _made(module, example, names, dims, kind: str, path: Path) -> str | bytes:
    """The exported (and, for "onnx-int8", quantised) graph of `module`, cached at `path`; its
    bytes when the cache cannot be written."""
    with tempfile.TemporaryDirectory() as tmp:
        made = Path(tmp) / "plain.onnx"
        export_onnx(module, example, names, dims, made)
        if kind == "onnx-int8":
            quantize_onnx(made, Path(tmp) / "int8.onnx")
            made = Path(tmp) / "int8.onnx"
        data = made.read_bytes()
    try:
        with atomic_path(path) as out:
            out.write_bytes(data)
    except OSError as e:
        warnings.warn(
            f"cannot cache an exported graph ({e}): it is made again next time", stacklevel=3
        )
        return data
    return str(path)


def compile_module(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    names: list[str],
    dims: dict,
    cfg: RuntimeConfig,
    what: str,
    quantize: bool = True,
) -> Callable[..., torch.Tensor] | None:
    """`module` on the runtime `cfg` names, called with tensors like `example`; None for eager,
    or (with one warning naming `what`) when that runtime is missing or the export fails.
    `quantize=False`: float32 under "onnx-int8" too."""
    kind = resolve(cfg.kind)
    if kind == "onnx-int8" and not quantize:
        kind = "onnx"
    if kind == "eager":
        return None
    threads = cfg.threads or torch.get_num_threads()
    try:
        import onnxruntime  # noqa: F401

        return _session(module.eval(), example, names, dims, kind, threads)
    except ImportError as e:
        why = f"{e.name or e} is not installed: pip install onnxruntime onnx onnxscript"
    except Exception as e:  # noqa: BLE001 - any failure here leaves the eager path, which works
        why = f"{type(e).__name__}: {str(e)[:200]}"
    warnings.warn(
        f"{what} runs on eager PyTorch: ONNX Runtime could not run it ({why})",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def accelerate(model: BiEncoder, cfg: RuntimeConfig) -> BiEncoder:
    """Run `model`'s text encoder, and the backbone of every `RegionSource` made for it, on
    `cfg`'s runtime at inference (training goes back to eager: `BiEncoder.train`)."""
    if resolve(cfg.kind) == "eager":
        model.fast_text, model.runtime = None, None
        return model
    if model.runtime != cfg:
        accelerate_text(model, cfg)
        model.runtime = cfg
    return model


def accelerate_text(model: BiEncoder, cfg: RuntimeConfig) -> BiEncoder:
    """Make `model.encode_text` run on `cfg`'s runtime at inference."""
    from torch.export import Dim

    batch = model.tokenize(EXAMPLE_CAPTIONS)
    example = (batch["input_ids"], batch["attention_mask"])
    seq = {0: Dim("batch", min=1, max=4096), 1: Dim("seq", min=2, max=model.cfg.text.max_length)}
    dims = {"input_ids": seq, "attention_mask": seq}
    model.fast_text = compile_module(
        TextGraph(model), example, list(dims), dims, cfg, "the text encoder"
    )
    return model


def accelerate_backbone(backbone: Backbone, cfg: RuntimeConfig) -> Backbone:
    """Make a grid backbone's feature map run on `cfg`'s runtime (others stay eager)."""
    if not hasattr(backbone, "net") or not hasattr(backbone.net, "extract_features"):
        return backbone
    from torch.export import Dim

    size = backbone.image_size
    example = (torch.zeros(2, 3, size, size),)
    dims = {"pixels": {0: Dim("batch", min=1, max=4096)}}
    # Float32 under "onnx-int8" as well: ONNX Runtime's int8 convolutions made indexing
    # slower than float here (benchmarks/fast_path.py), and the image side sets every index.
    what = f"the {backbone.name} backbone"
    backbone.graph = compile_module(
        GridGraph(backbone), example, ["pixels"], dims, cfg, what, quantize=False
    )
    return backbone
