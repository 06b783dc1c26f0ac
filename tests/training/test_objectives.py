import math

import pytest
import torch

from lightningdot.training.objectives import (
    IGNORE,
    add_global_state,
    cmr_loss,
    itm_loss,
    smrm_loss,
    vmlm_loss,
)


def test_add_global_state_adds_global_vector_to_every_state():
    states = torch.zeros(2, 3, 4)
    g = torch.arange(8.0).view(2, 4)
    out = add_global_state(states, g)
    assert torch.equal(out[1, 2], g[1]) and torch.equal(out[0, 0], g[0])


def test_vmlm_by_hand():
    # One masked token with logits (0, ln 3) over a 2-word vocabulary, true word 1:
    # p = 3 / (1 + 3) -> loss = -ln 0.75.
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 0.0]]])
    labels = torch.tensor([[1, IGNORE]])
    assert vmlm_loss(logits, labels)["vmlm"].item() == pytest.approx(-math.log(0.75))


def test_vmlm_without_masked_tokens_is_zero_and_differentiable():
    logits = torch.randn(1, 2, 5, requires_grad=True)
    loss = vmlm_loss(logits, torch.full((1, 2), IGNORE))["vmlm"]
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_smrm_by_hand():
    pred = torch.tensor([[[1.0, 1.0], [9.0, 9.0]]])
    target = torch.tensor([[[0.0, 3.0], [0.0, 0.0]]])
    masked = torch.tensor([[True, False]])  # the second region is not scored
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    q = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    out = smrm_loss(pred, target, logits, q, masked)
    assert out["smrm_mrfr"].item() == pytest.approx((1.0 + 4.0) / 2)
    # KL([1, 0] || [0.5, 0.5]) = 1 * ln(1 / 0.5) + 0 (0 log 0 = 0)
    assert out["smrm_kl"].item() == pytest.approx(math.log(2.0))


def test_smrm_without_distribution_has_no_kl_term():
    out = smrm_loss(
        torch.zeros(1, 1, 2),
        torch.ones(1, 1, 2),
        torch.zeros(1, 1, 3),
        None,
        torch.ones(1, 1, dtype=torch.bool),
    )
    assert set(out) == {"smrm_mrfr"}


def test_cmr_by_hand():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    i = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    out = cmr_loss(t, i, torch.tensor(0.0))  # scale 1
    s = t @ i.T  # [[1, .6], [0, .8]]
    t2i = (-(s[0, 0] - torch.logsumexp(s[0], 0)) - (s[1, 1] - torch.logsumexp(s[1], 0))) / 2
    i2t = (-(s[0, 0] - torch.logsumexp(s[:, 0], 0)) - (s[1, 1] - torch.logsumexp(s[:, 1], 0))) / 2
    assert out["cmr_t2i"].item() == pytest.approx(t2i.item())
    assert out["cmr_i2t"].item() == pytest.approx(i2t.item())


def test_cmr_hard_negatives_only_add_text_to_image_competitors():
    g = torch.Generator().manual_seed(0)
    t, i = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    hard = torch.randn(3, 2, 4, generator=g)
    plain = cmr_loss(t, i, torch.tensor(0.5))
    with_hard = cmr_loss(t, i, torch.tensor(0.5), hard)
    assert with_hard["cmr_t2i"] > plain["cmr_t2i"]
    assert with_hard["cmr_i2t"] == plain["cmr_i2t"]
    # Naive reference for the first text: its row plus its two hard negatives.
    scale = math.exp(0.5)
    row = torch.cat([scale * t[0] @ i.T, scale * hard[0] @ t[0]])
    first = -(row[0] - torch.logsumexp(row, 0))
    rows = [torch.cat([scale * t[b] @ i.T, scale * hard[b] @ t[b]]) for b in range(3)]
    ref = sum(-(r[b] - torch.logsumexp(r, 0)) for b, r in enumerate(rows)) / 3
    assert with_hard["cmr_t2i"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert first.item() > 0


def test_cmr_gradients_reach_both_sides_and_temperature():
    t = torch.randn(4, 3, requires_grad=True)
    i = torch.randn(4, 3, requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    out = cmr_loss(t, i, s)
    (out["cmr_t2i"] + out["cmr_i2t"]).backward()
    assert t.grad.abs().sum() > 0 and i.grad.abs().sum() > 0 and s.grad is not None


def test_itm_by_hand():
    t2i = torch.tensor([[2.0, 0.0, 0.0]])  # right answer in column 0
    i2t = torch.tensor([[0.0, 1.0], [3.0, 3.0]])
    out = itm_loss(t2i, i2t)
    want_t2i = -math.log(math.exp(2) / (math.exp(2) + 2))
    want_i2t = (-math.log(1 / (1 + math.e)) - math.log(0.5)) / 2
    assert out["itm_t2i"].item() == pytest.approx(want_t2i, rel=1e-5)
    assert out["itm_i2t"].item() == pytest.approx(want_i2t, rel=1e-5)
