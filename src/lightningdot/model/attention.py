"""A BERT layer run by hand, so that its attention can take any mask or bias: the re-ranker's
caption states attend to keys and values computed once per image, and the image encoder's
gated forward pass (`ImageEncoder.gated_states`) weighs each region by a differentiable gate."""

from __future__ import annotations

import torch
from torch import nn


def keys_values(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, H) -> a BertLayer's keys and values (N, heads, L, H / heads)."""
    att = layer.attention.self
    split = (*x.shape[:2], -1, att.attention_head_size)
    return att.key(x).view(split).transpose(1, 2), att.value(x).view(split).transpose(1, 2)


def layer_output(
    layer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """A BertLayer's output at `query` (P, Q, H) attending to given keys and values.

    `mask` (P, 1, 1, K) is True where a key may be read, or a float bias added to the attention
    logits (0: as is, -inf: never read); dropout applies while the layer trains."""
    att = layer.attention.self
    q = att.query(query).view(*query.shape[:2], -1, att.attention_head_size).transpose(1, 2)
    out = nn.functional.scaled_dot_product_attention(
        q,
        keys,
        values,
        attn_mask=mask,
        dropout_p=att.dropout.p if layer.training else 0.0,
        scale=att.scaling,
    )
    h = layer.attention.output(out.transpose(1, 2).flatten(2), query)
    return layer.output(layer.intermediate(h), h)


def gate_bias(gate: torch.Tensor) -> torch.Tensor:
    """(N, K) key gates in [0, 1] -> the (N, 1, 1, K) bias `layer_output` adds: log gate, so a
    key's attention weight is scaled by its gate (0: never read). Through a clamp, so that
    the gradient at a gate of 0 is 0, not nan."""
    bias = gate.clamp_min(1e-30).log().masked_fill(gate == 0, float("-inf"))
    return bias[:, None, None, :]
