import torch

from lightningdot.training.masking import mask_regions, mask_tokens
from lightningdot.training.objectives import IGNORE


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


def test_drop_regions_keeps_a_random_subset_of_real_regions():
    from lightningdot.features import RegionBatch, grid_boxes
    from lightningdot.training.masking import drop_regions

    b, r = 3, 6
    feats = torch.arange(b * r, dtype=torch.float32).view(b, r, 1).expand(b, r, 2).clone()
    mask = torch.ones(b, r, dtype=torch.bool)
    mask[0, 4:] = False  # image 0 has 4 real regions
    regions = RegionBatch(
        feats, grid_boxes(1, r).expand(b, r, 7).clone(), mask, torch.rand(b, r, 5)
    )
    out = drop_regions(regions, 0.5, torch.Generator().manual_seed(0))
    assert out.features.shape == (b, 3, 2) and out.soft_labels.shape == (b, 3, 5)
    assert out.mask.all()  # padding goes before real regions
    for i in range(b):
        kept = out.features[i, :, 0].long().tolist()
        assert len(set(kept)) == 3 and all(i * r <= k < (i + 1) * r for k in kept)
        # Boxes and soft labels travel with their features.
        pos = [k - i * r for k in kept]
        assert torch.equal(out.boxes[i], regions.boxes[i, pos])
        assert torch.equal(out.soft_labels[i], regions.soft_labels[i, pos])
    assert drop_regions(regions, 1.0) is regions
