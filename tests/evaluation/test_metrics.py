import pytest
import torch

from lightningdot.evaluation.metrics import recall_metrics


def naive_recall(text, image, caption_image, ks=(1, 5, 10)):
    """Reference: sort every row of the full score matrix (ties ranked against the query)."""
    s = text @ image.T
    t2i, i2t = [], []
    for q in range(len(text)):
        own = s[q, caption_image[q]]
        t2i.append(int((s[q] >= own).sum()) - 1)
    for g in range(len(image)):
        mine = [q for q in range(len(text)) if caption_image[q] == g]
        others = [q for q in range(len(text)) if caption_image[q] != g]
        best = max(s[q, g] for q in mine)
        i2t.append(sum(1 for q in others if s[q, g] >= best))
    res = {
        "t2i": {f"r{k}": 100 * sum(r < k for r in t2i) / len(t2i) for k in ks},
        "i2t": {f"r{k}": 100 * sum(r < k for r in i2t) / len(i2t) for k in ks},
    }
    res["ar"] = sum(res[d][f"r{k}"] for d in ("t2i", "i2t") for k in ks) / 6
    return res


def test_one_hot_embeddings_give_perfect_recall():
    image = torch.eye(4)
    text = image.repeat_interleave(2, 0)
    m = recall_metrics(text, image, [0, 0, 1, 1, 2, 2, 3, 3])
    assert m["ar"] == 100.0 and m["n_images"] == 4 and m["n_captions"] == 8


def test_known_ranks():
    # Text 0 ranks its image (0) second; text 1 ranks its image (1) first.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.4, 0.6], [0.0, 1.0]])
    m = recall_metrics(text, image, [0, 1])
    assert m["t2i"]["r1"] == 50.0 and m["t2i"]["r5"] == 100.0
    # Image 0: own caption 0 scores .4, caption 1 scores 0 -> rank 1. Image 1: caption 0 (.6) is
    # above its own caption 1 (1.0)? No: 1.0 > .6 -> rank 1.
    assert m["i2t"]["r1"] == 100.0


def test_ties_count_against_the_query():
    m = recall_metrics(torch.ones(3, 2), torch.ones(3, 2), [0, 1, 2])
    assert m["t2i"]["r1"] == 0.0 and m["i2t"]["r1"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blockwise_matches_naive_reference(seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(23, 8, generator=g)
    caption_image = torch.randint(0, 23, (70,), generator=g)
    caption_image[:23] = torch.arange(23)  # every image has a caption
    text = image[caption_image] + 1.5 * torch.randn(70, 8, generator=g)
    import lightningdot.evaluation.metrics as evaluate

    full = recall_metrics(text, image, caption_image)
    ref = naive_recall(text, image, caption_image.tolist())
    for d in ("t2i", "i2t"):
        for k in ("r1", "r5", "r10"):
            assert full[d][k] == pytest.approx(ref[d][k])
    # Tiny blocks walk the same matrix in pieces.
    t = evaluate.t2i_ranks(text, image, caption_image, block=4)
    i = evaluate.i2t_ranks(text, image, caption_image, block=3)
    assert torch.equal(t, evaluate.t2i_ranks(text, image, caption_image))
    assert torch.equal(i, evaluate.i2t_ranks(text, image, caption_image))
