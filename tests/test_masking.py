import torch

from lightningdot.masking import mask_regions, mask_tokens
from lightningdot.objectives import IGNORE


def test_mask_tokens_never_touches_special_tokens_and_masks_each_caption():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (64, 12), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    special[:5, 6:] = True  # padding
    masked, labels = mask_tokens(ids, special, mask_token_id=103, vocab_size=3000, generator=g)
    picked = labels != IGNORE
    assert not (picked & special).any()
    assert picked.any(1).all()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    # About 15% of real tokens, and most picked ones become [MASK].
    rate = picked.sum() / (~special).sum()
    assert 0.08 < rate < 0.25
    assert (masked[picked] == 103).float().mean() > 0.6


def test_mask_regions_at_least_one_real_region_per_image():
    real = torch.ones(200, 4, dtype=torch.bool)
    real[:, 3] = False
    m = mask_regions(real, prob=0.15, generator=torch.Generator().manual_seed(1))
    assert m.any(1).all()
    assert not (m & ~real).any()
