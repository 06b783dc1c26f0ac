import numpy as np
import pytest

from lightningdot.config import IndexConfig
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.index.vector import VectorIndex, recall_against_exact


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n, start=0):
    return [{"id": f"img{i}", "path": f"img{i}.jpg"} for i in range(start, start + n)]


def test_exact_index_matches_brute_force():
    x, q = unit(300, 16, 0), unit(7, 16, 1)
    idx = VectorIndex.build(x, items(300), "m")
    scores, ids = idx.search(q, 5)
    ref = q @ x.T
    ref_ids = np.argsort(-ref, axis=1)[:, :5]
    assert np.array_equal(ids, ref_ids)
    assert np.allclose(scores, np.take_along_axis(ref, ref_ids, 1), atol=1e-5)


def test_k_larger_than_the_index_is_clamped():
    idx = VectorIndex.build(unit(3, 4, 0), items(3), "m")
    scores, ids = idx.search(unit(1, 4, 1), 10)
    assert ids.shape == (1, 3) and sorted(ids[0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("factory", ["HNSW16", "IVF8,Flat"])
def test_approximate_indexes_recall_against_exact(factory):
    x, q = unit(2000, 16, 0), unit(50, 16, 1)
    exact = VectorIndex.build(x, items(2000), "m")
    approx = VectorIndex.build(x, items(2000), "m", IndexConfig(factory=factory, nprobe=8))
    assert recall_against_exact(approx, exact, q, 10) >= 0.95
    assert recall_against_exact(exact, exact, q, 10) == 1.0


def test_tune_changes_nprobe_with_and_without_a_filter():
    x, q = unit(2000, 16, 0), unit(20, 16, 1)
    exact = VectorIndex.build(x, items(2000), "m")
    ivf = VectorIndex.build(x, items(2000), "m", IndexConfig(factory="IVF16,Flat", nprobe=1))
    allowed = np.arange(2000) % 3 == 0
    narrow = recall_against_exact(ivf, exact, q, 10)
    ivf.tune(IndexConfig(factory="IVF16,Flat", nprobe=16))  # every list: exact
    assert narrow < 0.9 and recall_against_exact(ivf, exact, q, 10) == 1.0
    got, want = ivf.search(q, 10, allowed=allowed), exact.search(q, 10, allowed=allowed)
    assert np.array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="IVF16,Flat index cannot be tuned as Flat"):
        ivf.tune(IndexConfig())


def test_add_without_rebuild_equals_building_all_at_once():
    x = unit(60, 8, 0)
    grown = VectorIndex.build(x[:40], items(40), "m")
    grown.add(x[40:], items(20, 40))
    whole = VectorIndex.build(x, items(60), "m")
    q = unit(5, 8, 1)
    assert np.array_equal(grown.search(q, 7)[1], whole.search(q, 7)[1])
    assert grown.items[45]["id"] == "img45"
    with pytest.raises(ConfigMismatchError):
        grown.add(unit(1, 4, 2), items(1))


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path, mmap):
    x = unit(50, 8, 0)
    VectorIndex.build(x, items(50), "model-a").save(tmp_path / "ix")
    idx = VectorIndex.load(tmp_path / "ix", model_id="model-a", mmap=mmap)
    assert len(idx) == 50 and idx.items[3]["path"] == "img3.jpg"
    assert idx.search(x[:1], 1)[1][0, 0] == 0


def test_load_refuses_another_model_and_damaged_files(tmp_path):
    VectorIndex.build(unit(50, 8, 0), items(50), "model-a").save(tmp_path / "ix")
    with pytest.raises(ConfigMismatchError, match="another|not by"):
        VectorIndex.load(tmp_path / "ix", model_id="model-b")
    f = tmp_path / "ix" / "index.faiss"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated|damaged"):
        VectorIndex.load(tmp_path / "ix")
    with pytest.raises(DataError, match="no index.json"):
        VectorIndex.load(tmp_path / "nowhere")


def test_failed_save_keeps_the_previous_index(tmp_path, monkeypatch):
    VectorIndex.build(unit(10, 8, 0), items(10), "m").save(tmp_path / "ix")
    bigger = VectorIndex.build(unit(20, 8, 1), items(20), "m")
    import lightningdot.index.vector as index_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.faiss, "write_index", boom)
    with pytest.raises(OSError):
        bigger.save(tmp_path / "ix")
    monkeypatch.undo()
    assert len(VectorIndex.load(tmp_path / "ix")) == 10


def test_an_id_names_one_row_always():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(DataError, match="repeated"):
        VectorIndex.build(x[:2], [{"id": "a"}, {"id": "a"}], "m")
    index = VectorIndex.build(x[:2], [{"id": "a"}, {"id": "b"}], "m")
    with pytest.raises(DataError, match=r"\['b'\]"):
        index.add(x[2:], [{"id": "c"}, {"id": "b"}])
    assert len(index) == 2 and index.row("c") is None


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8"])
@pytest.mark.parametrize("with_prior", [False, True], ids=["no-prior", "prior"])
def test_vectors_are_those_added(factory, with_prior, tmp_path):
    """What a sync gives a moved image: the vector it was added with, the prior left out, in a
    grown index with deletes and in one read back from disk."""
    from lightningdot.index.vector import IndexPrior

    x = unit(120, 8, 0)
    prior = IndexPrior(unit(30, 8, 3), 10.0) if with_prior else None
    index = VectorIndex.build(x[:100], items(100), "m", IndexConfig(factory=factory), prior)
    index.add(x[100:], items(20, 100))
    index = index.without(["img7", "img50"])
    ids = ["img110", "img3", "img99", "img3"]
    want = x[[110, 3, 99, 3]]
    assert index.vectors(ids).shape == (4, 8)
    np.testing.assert_allclose(index.vectors(ids), want, atol=1e-6)
    index.save(tmp_path / "ix")
    for mmap in (False, True):
        loaded = VectorIndex.load(tmp_path / "ix", mmap=mmap)
        np.testing.assert_allclose(loaded.vectors(ids), want, atol=1e-6)
    assert index.vectors([]).shape == (0, 8)
    with pytest.raises(DataError, match="not in the index"):
        index.vectors(["img7"])  # deleted
