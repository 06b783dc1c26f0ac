"""Typed configuration: the model, training, indexes, serving, and their (de)serialisation.

Configs are dataclasses validated in `__post_init__`. They travel as JSON beside every
checkpoint and as TOML in `recipes/`; unknown keys are an error, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.io import read_json

T = TypeVar("T")


@dataclass
class BertSize:
    """Shape of a BERT-style transformer (the text encoder; the image encoder shares its width)."""

    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    vocab_size: int = 30522
    max_positions: int = 512

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")


@dataclass
class TextConfig:
    # Packaged pretrained weights to start from (see `lightningdot.model.pretrained`); None builds a
    # randomly initialised BERT of `size`, as the tests do.
    pretrained: str | None = "all-minilm-l6-v2"
    size: BertSize = field(default_factory=BertSize)
    # Only the top layers are fine-tuned; the embeddings and the layers below stay as pretrained.
    # That keeps training affordable on a CPU and the shipped weights small.
    trainable_layers: int = 6
    max_length: int = 40  # tokens, [CLS] and [SEP] included; longer captions are truncated
    pooling: str = "cls"  # "cls": the [CLS] output is the global vector, as in the paper; or "mean"
    # Put before every caption and query, e.g. e5's "query: ", which it was trained with.
    prefix: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.trainable_layers <= self.size.num_layers:
            raise ValueError(f"trainable_layers must be in [0, {self.size.num_layers}]")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', not {self.pooling!r}")
        if self.max_length < 3:
            raise ValueError("max_length must leave room for [CLS], a token and [SEP]")


@dataclass
class ImageConfig:
    feature_dim: int = 1280  # size of a region feature from the backbone
    num_classes: int = 1000  # size of the region class distribution (SMRM's KL target)
    num_layers: int = 2  # transformer layers over [IMG] + regions
    # Start the image transformer from the text encoder's bottom layers, as the paper starts
    # both encoders from UNITER/BERT.
    init_from_text: bool = True
    # The [IMG] token's input is a learned vector plus the mean of the region tokens, so the
    # global vector starts out as a mean pool that attention then refines (faster to train).
    img_token_adds_mean: bool = True

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("the image encoder needs at least one layer")


@dataclass
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    embed_dim: int = 256  # size of the transformer view of each global vector
    # Size of a second, pooled view appended to each global vector: a linear map of the mean
    # region feature (image side) and of the pooled text state (text side), trained by its own
    # CMR loss. It is a shallow model that errs differently from the transformer view, so the
    # two together rank better than either (see README); 0 = off.
    pooled_dim: int = 0
    backbone: str = "efficientnet-lite2"  # makes image regions from pixels at query time
    dropout: float = 0.1
    # Identity of the model whose image encoder (copied, frozen) and embedding space this one
    # was trained into, as `ldot align` does: indexes made by either model serve both.
    shares_index_with: str = ""
    # Name or folder of that model, when this one's checkpoint stores only its text side: the
    # image encoder, CMR temperatures and query bank are loaded from there, and its identity
    # must still be `shares_index_with`.
    image_from: str = ""

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError("embed_dim must be positive")
        if self.pooled_dim < 0:
            raise ValueError("pooled_dim must be 0 (off) or positive")
        if self.image.num_layers > self.text.size.num_layers and self.image.init_from_text:
            raise ValueError("init_from_text needs image.num_layers <= text layers")
        if self.image_from and not self.shares_index_with:
            raise ValueError("image_from needs shares_index_with, the identity it must have")

    @property
    def vector_dim(self) -> int:
        """Size of a global vector: the index dimension."""
        return self.embed_dim + self.pooled_dim


@dataclass
class ObjectiveWeights:
    """Weight of each objective in the summed loss; 0 turns an objective off."""

    vmlm: float = 0.0
    smrm: float = 0.0
    cmr: float = 1.0

    def __post_init__(self) -> None:
        if min(self.vmlm, self.smrm, self.cmr) < 0 or self.vmlm + self.smrm + self.cmr == 0:
            raise ValueError("objective weights must be >= 0 and not all zero")


@dataclass
class DataConfig:
    annotations: str = ""  # Karpathy-format file
    features: str = ""  # feature store of the images it names (`ldot extract`)
    train_split: str = "train"
    val_split: str = "val"  # "" for no validation


@dataclass
class LoopConfig:
    """What every trainer's loop shares (`lightningdot.training.loop`): the `[loop]` table of a
    recipe."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4  # the base learning rate; a recipe may give some parts another
    weight_decay: float = 0.01  # not applied to biases, LayerNorms and temperatures
    warmup: float = 0.05  # fraction of all steps with a linear warm-up, then a cosine decay
    grad_clip: float = 1.0  # largest gradient norm; 0 leaves gradients as they are
    # Mixed precision: the models' matrix products in bfloat16 (weights, optimiser and loss
    # terms stay float32), in training steps and in the per-epoch validation that picks `best`.
    # Faster on a CPU with AVX512-BF16 (or AMX) or a GPU. A CPU without them only emulates
    # bfloat16, several times slower than float32: there training says so and runs in float32,
    # and the recipe saved with the run records float32.
    bf16: bool = False
    seed: int = 0
    threads: int = 0  # torch threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("need epochs >= 1 and batch_size >= 1")
        if not 0 <= self.warmup < 1 or self.grad_clip < 0 or self.threads < 0:
            raise ValueError("need 0 <= warmup < 1, grad_clip >= 0 and threads >= 0")


def _loop_default(**overrides: Any) -> Any:
    """A `loop` field whose defaults suit one trainer."""
    return field(default_factory=lambda: LoopConfig(**overrides))


def _lift_loop_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Recipes and saved runs written before the `[loop]` table kept its keys at the top."""
    names = {f.name for f in dataclasses.fields(LoopConfig)}
    flat = {k: v for k, v in data.items() if k in names}
    if not flat:
        return data
    twice = sorted(set(flat) & set(data.get("loop", {})))
    if twice:
        raise DataError(f"{twice} given both at the top and in [loop]; keep one")
    rest = {k: v for k, v in data.items() if k not in names}
    return rest | {"loop": flat | dict(data.get("loop", {}))}


def _need_negatives(loop: LoopConfig) -> None:
    if loop.batch_size < 2:
        raise ValueError("need batch_size >= 2 (CMR uses in-batch negatives)")


@dataclass
class TrainConfig:
    """`ldot finetune` and `ldot pretrain`: the bi-encoder trained with its objectives."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    loop: LoopConfig = _loop_default()  # `lr` is that of the new parts: image encoder, heads
    init_from: str = ""  # a checkpoint folder to start from (fine-tuning after pre-training)
    text_lr: float = 5e-5  # the pretrained text layers
    mask_prob: float = 0.15  # VMLM tokens and SMRM regions
    # Initial softmax temperature of CMR, learned unless `learn_temperature` is off.
    temperature: float = 0.05
    learn_temperature: bool = True
    # Fraction of each image's regions a training step sees (the rest are dropped, as FLIP drops
    # patches): a regulariser against memorising 6,000 images, and a cheaper step.
    region_keep: float = 1.0
    hard_negatives: int = 0  # images per caption mined each epoch by the model itself; 0 = off

    upgrade = staticmethod(_lift_loop_keys)

    def __post_init__(self) -> None:
        _need_negatives(self.loop)
        if not 0 < self.mask_prob < 1:
            raise ValueError("mask_prob must be in (0, 1)")
        if not 0 < self.region_keep <= 1:
            raise ValueError("region_keep must be in (0, 1]")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")


@dataclass
class RerankerConfig:
    """The cross-attention re-ranker: a single-stream transformer over the bi-encoder's caption
    token states and [IMG] + region states, with an image-text matching head on the first token.
    """

    num_layers: int = 1  # fusion layers, started from the top layers of the text encoder
    dropout: float = 0.1
    # Re-ranked score = cross logit + fusion x the bi-encoder's logit (dot / temperature);
    # 0 ranks by the cross-attention model alone.
    fusion: float = 1.0

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("the re-ranker needs at least one layer")
        if self.fusion < 0:
            raise ValueError("fusion must be >= 0")


@dataclass
class RerankTrainConfig:
    """`ldot train-reranker`: the re-ranker trained on negatives its bi-encoder confuses."""

    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # `batch_size` counts captions per step; each gives a text->image and an image->text query.
    loop: LoopConfig = _loop_default(epochs=1, batch_size=32, lr=1e-4)
    bi_encoder: str = "default"  # model name or folder whose states the re-ranker reads
    negatives: int = 3  # per query, drawn from the bi-encoder's top `mine_from` wrong answers
    mine_from: int = 16
    # The training loss scores candidates by cross logit + train_fusion x the bi-encoder's
    # logit; 0 makes the cross-attention model learn to rank on its own.
    train_fusion: float = 1.0
    # Fusion weights tried on val after each epoch: the best becomes `reranker.fusion`, the
    # weight used at query time. Empty keeps `reranker.fusion` as given.
    fusion_grid: list[float] = field(default_factory=list)
    # Fraction of each image's region states a training pair sees ([IMG] always stays): an
    # augmentation, since the states are fixed and the cross-encoder soon learns them by heart.
    region_keep: float = 1.0

    upgrade = staticmethod(_lift_loop_keys)

    def __post_init__(self) -> None:
        if not 1 <= self.negatives <= self.mine_from:
            raise ValueError("need 1 <= negatives <= mine_from")
        if self.train_fusion < 0 or any(w < 0 for w in self.fusion_grid):
            raise ValueError("fusion weights must be >= 0")
        if not 0 < self.region_keep <= 1:
            raise ValueError("region_keep must be in (0, 1]")


@dataclass
class AlignConfig:
    """`ldot align`: train a text encoder (e.g. a multilingual one) into an existing model's
    embedding space. The image encoder is that model's, copied and frozen, so every index the
    teacher made serves the new model, and image vectors are computed once for all training."""

    teacher: str = "default"  # model name or folder whose space and image encoder are kept
    text: TextConfig = field(default_factory=TextConfig)
    # Karpathy files with captions of the same images, one language each. The first is in the
    # teacher's language: on it the student also learns to reproduce the teacher's text
    # vectors (distillation), which keeps that language as good as the teacher's.
    annotations: list[str] = field(default_factory=list)
    features: str = ""  # feature store of the images (`ldot extract`)
    train_split: str = "train"
    val_split: str = "val"
    # `batch_size` counts images per step, each with one caption in every language; `lr` is
    # that of the pretrained text layers.
    loop: LoopConfig = _loop_default(epochs=6, batch_size=128, lr=1e-4)
    head_lr: float = 1e-3  # the new projections (one per view)
    distill: float = 1.0  # weight of the distillation term against the contrastive ones
    # Weight of pulling each caption in the other languages toward the teacher's unit mean
    # vector of its image's first-language captions: a cross-lingual target that does not need
    # translations, only captions of the same images. 0 turns it off.
    cross_distill: float = 0.0
    # A student made by an earlier run (folder or shipped name), against the same teacher and
    # with the same text config, to continue from: e.g. to teach it more languages.
    init_from: str = ""
    # 0: train every text layer the config stores; N: only the top N of them (the others stay
    # as the student starts: cheaper steps when continuing from `init_from`).
    train_layers: int = 0
    # The image encoder trains too, on every language's captions. The student then has an image
    # side of its own: its own index identity (indexes must be rebuilt with it), and no query
    # bank or concept view until `ldot bank` / `ldot concepts` make them.
    train_image: bool = False

    upgrade = staticmethod(_lift_loop_keys)

    def __post_init__(self) -> None:
        if not self.annotations:
            raise ValueError("annotations must name at least one caption file")
        if not 0 <= self.train_layers <= self.text.trainable_layers:
            raise ValueError(f"train_layers must be in [0, {self.text.trainable_layers}]")
        _need_negatives(self.loop)
        if self.distill < 0 or self.cross_distill < 0:
            raise ValueError("distill and cross_distill must be >= 0")


@dataclass
class BankConfig:
    """`ldot bank`: how a model's query bank is drawn (`lightningdot.training.bank`)."""

    split: str = "train"  # a split the model trained on, never one it is evaluated on
    size: int = 2000  # captions, and images, in the bank
    beta: float = 10.0  # inverse temperature of the inverted softmax
    seed: int = 0  # of the draw

    def __post_init__(self) -> None:
        if self.size < 1 or self.beta <= 0:
            raise ValueError("--size must be at least 1 and --beta positive")


@dataclass
class ConceptConfig:
    """`ldot concepts`: the backbone's ImageNet classes as a view of a model's vectors
    (`lightningdot.model.concepts`), and how much a query weighs it."""

    split: str = "train"  # images the view's mean and covariance are estimated on
    top: int = 10  # classes an image's concept vector mixes
    temperature: float = 2.0  # of the softmax over the class logits (> 1 flattens it)
    # A text query weighs its concept score by text_weight * sigmoid(slope * (c - shift)), c its
    # cosine with its best-matching class name: object queries ("a tiger") match a name closely,
    # scene captions hardly do. The defaults are what `benchmarks/concept_view.py` chose on data
    # the shipped model never trained on: no gate (slope 0), so a fixed text weight of
    # text_weight / 2 = 0.04, the image weight's; a gate gained out of domain and lost in it.
    text_weight: float = 0.08
    gate_slope: float = 0.0
    gate_shift: float = 0.0
    image_weight: float = 0.04  # an image query's weight on its concept score of a caption
    text_model: str = "all-minilm-l6-v2"  # the packaged sentence encoder the names live in

    def __post_init__(self) -> None:
        if self.top < 1 or self.temperature <= 0:
            raise ValueError("top must be at least 1 and temperature positive")
        if min(self.text_weight, self.image_weight) < 0:
            raise ValueError("concept weights must be >= 0")


@dataclass
class IndexConfig:
    """How an index searches (`ldot index --factory`), saved in its `index.json`."""

    # FAISS index_factory string: "Flat" is exact; e.g. "HNSW32", "IVF1024,Flat", "IVF1024,PQ32".
    factory: str = "Flat"
    nprobe: int = 16  # IVF: inverted lists visited per query (recall vs speed)
    ef_search: int = 128  # HNSW: candidate list size per query (recall vs speed)

    def __post_init__(self) -> None:
        if self.nprobe < 1 or self.ef_search < 1:
            raise ValueError("nprobe and ef_search must be positive")


RUNTIMES = ("auto", "onnx", "onnx-int8", "eager")


@dataclass(frozen=True)
class RuntimeConfig:
    """What runs the encoders' forward passes at inference (`lightningdot.runtime`)."""

    # "onnx": ONNX Runtime on a float32 export; "onnx-int8": the text encoder on its dynamic
    # int8 quantisation (the backbone in float32);
    # "eager": PyTorch as trained; "auto": $LDOT_RUNTIME when set, else "onnx".
    kind: str = "auto"
    threads: int = 0  # intra-op threads of a runtime session (0: torch's thread count)

    def __post_init__(self) -> None:
        if self.kind not in RUNTIMES:
            raise DataError(f"runtime must be one of {', '.join(RUNTIMES)}, not {self.kind!r}")
        if self.threads < 0:
            raise DataError("runtime threads must be >= 0")


AUTO_RUNTIME = RuntimeConfig()  # the default: ONNX Runtime unless $LDOT_RUNTIME says otherwise


@dataclass
class ServeConfig:
    """Limits of the HTTP service (`ldot serve`); requests beyond them get a 4xx."""

    max_k: int = 100  # results per query
    max_rerank: int = 64  # candidates the cross-attention model may re-score per query
    max_query_chars: int = 1000
    max_upload_mb: float = 10.0  # per request, all files together
    max_files: int = 32  # images per POST /images
    # Text queries that arrive while the model is busy are encoded together, up to this many.
    max_batch: int = 32
    max_offset: int = 1000  # results a page may start past (GET /search?offset=)

    def __post_init__(self) -> None:
        if self.max_offset < 0:
            raise ValueError("max_offset must be >= 0")
        if min(self.max_k, self.max_query_chars, self.max_files, self.max_batch) < 1:
            raise ValueError("max_k, max_query_chars, max_files and max_batch must be >= 1")
        if self.max_rerank < 0 or self.max_upload_mb <= 0:
            raise ValueError("need max_rerank >= 0 and max_upload_mb > 0")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build a (nested) config dataclass from plain data, rejecting unknown keys.

    A class's `upgrade(data)` first brings an older layout up to date. A nested table fills in
    what it leaves out from its field's default, so `[loop]` with only `epochs` keeps the
    other defaults of the trainer it belongs to.
    """
    name = where or cls.__name__
    if not isinstance(data, dict):
        raise DataError(f"config {name}: expected a table, got {data!r}")
    data = getattr(cls, "upgrade", lambda d: d)(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise DataError(f"config {name}: unknown key(s) {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, types.UnionType):  # "X | None": build X when a table is given
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(
                hint, _defaults(fields[key]) | value, f"{where}.{key}" if where else key
            )
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise DataError(f"config {name}: {e}") from e


def _defaults(f: dataclasses.Field) -> dict[str, Any]:
    """The values of a nested config field's default, one level deep."""
    if f.default_factory is dataclasses.MISSING:
        return {}
    default = f.default_factory()
    return {g.name: getattr(default, g.name) for g in dataclasses.fields(default)}


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a config from a `.toml` (recipes) or `.json` (beside checkpoints) file."""
    path = Path(path)
    if path.suffix != ".toml":
        return from_dict(cls, read_json(path, "config", missing=f"config file not found: {path}"))
    if not path.is_file():
        raise DataError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"cannot parse {path}: {e}") from e
    return from_dict(cls, data)


def diff_configs(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two configs of one type."""
    da, db = (asdict(a), asdict(b))

    def walk(x: Any, y: Any, name: str) -> list[str]:
        if isinstance(x, dict) and isinstance(y, dict):
            return [
                d
                for k in sorted(set(x) | set(y))
                for d in walk(x.get(k), y.get(k), f"{name}.{k}" if name else k)
            ]
        return [] if x == y else [f"{name}: {x!r} != {y!r}"]

    return walk(da, db, prefix)


def require_same(expected: Any, found: Any, what: str) -> None:
    """Raise ConfigMismatchError naming every differing field."""
    diffs = diff_configs(expected, found)
    if diffs:
        raise ConfigMismatchError(f"{what} was made with another config: " + "; ".join(diffs))
