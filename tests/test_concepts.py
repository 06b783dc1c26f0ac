import pytest
import torch
import torch.nn.functional as F

from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.model.concepts import (
    concept_gate,
    concept_vectors,
    load_class_names,
)


def test_the_shipped_names_are_the_1000_imagenet_classes_in_order():
    names = load_class_names(1000)
    assert names[0].startswith("tench") and names[292].startswith("tiger,")
    assert names[409].startswith("analog clock")
    with pytest.raises(ConfigMismatchError, match="1000 classes .* has 1001"):
        load_class_names(1001)


def test_a_malformed_line_is_refused(tmp_path):
    bad = tmp_path / "names.tsv"
    bad.write_text("n01\ttench\nn02 goldfish\n")
    with pytest.raises(DataError, match="names.tsv:2"):
        load_class_names(2, bad)


def test_concept_vectors_match_a_loop_over_the_top_classes():
    g = torch.Generator().manual_seed(0)
    logits, names = (
        torch.randn(4, 12, generator=g),
        F.normalize(torch.randn(12, 5, generator=g), dim=-1),
    )
    got = concept_vectors(logits, names, top=3)
    for b in range(4):
        p = logits[b].softmax(-1)
        best = sorted(range(12), key=lambda c: -p[c])[:3]
        v = sum(p[c] * names[c] for c in best) / sum(p[c] for c in best)
        assert torch.allclose(got[b], v / v.norm(), atol=1e-6)
    assert torch.allclose(concept_vectors(logits, names, top=99).norm(dim=-1), torch.ones(4))


def test_the_gate_follows_the_best_name_match():
    names = torch.eye(3)
    queries = F.normalize(torch.tensor([[1.0, 0, 0], [1.0, 1, 1]]), dim=-1)  # cos 1, cos 0.577
    gate = concept_gate(queries, names, weight=2.0, slope=40.0, shift=0.6)
    assert gate[0] > 1.99 and 0.5 < gate[1] < 1.0
    assert torch.allclose(gate, 2 * torch.sigmoid(40 * (torch.tensor([1.0, 3**-0.5]) - 0.6)))
