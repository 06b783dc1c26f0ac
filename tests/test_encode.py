"""Collections into vectors: regions from a feature store or from image files, batched."""

import pytest
import torch

import lightningdot.encode as encode
from lightningdot.encode import RegionSource, encode_collection, encode_texts
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore, create_backbone
from lightningdot.features.extract import extract_images
from lightningdot.model.encoders import BiEncoder
from tests.helpers import tiny_model_config


@pytest.fixture
def extracted(corpus_dir, tmp_path):
    """A store of the backbone's own regions of every corpus image, and the image keys."""
    keys = sorted(p.name for p in (corpus_dir / "images").iterdir())
    items = [(k, corpus_dir / "images" / k) for k in keys]
    extract_images(items, tmp_path / "store", create_backbone("test-colour"), shard_size=5)
    return FeatureStore(tmp_path / "store"), keys


def test_regions_from_the_store_equal_regions_from_the_files(extracted, corpus_dir, monkeypatch):
    store, keys = extracted
    monkeypatch.setattr(encode, "FILE_BATCH", 5)  # several batches, one of them short
    monkeypatch.setattr(encode, "STORE_BATCH", 3)
    from_store = list(RegionSource("test-colour", store, corpus_dir / "images").batches(keys))
    from_files = list(RegionSource("test-colour", None, corpus_dir / "images").batches(keys))
    assert [len(b) for b in from_store] == [3, 3, 3, 3] and [len(b) for b in from_files] == [
        5,
        5,
        2,
    ]
    a = torch.cat([b.features.float() for b in from_store])
    b = torch.cat([b.features for b in from_files])
    assert torch.equal(a, b)  # mean colours: exact in float16 too
    assert torch.equal(
        torch.cat([x.boxes for x in from_store]), torch.cat([x.boxes for x in from_files])
    )


def test_a_store_missing_images_is_an_error_or_for_candidates_the_files(
    extracted, corpus_dir, tmp_path
):
    store, keys = extracted
    source = RegionSource("test-colour", store, corpus_dir / "images")
    with pytest.raises(DataError, match="missing from"):
        list(source.batches([*keys[:2], "elsewhere.png"]))
    (corpus_dir / "images" / "img00.png").rename(tmp_path / "moved.png")
    # Every candidate in the store: read from it, so a file that moved does not matter.
    assert len(source.regions(keys[:3])) == 3
    # One missing from the store: all from their files (here, a path outside the folder).
    regions = source.regions(["img01.png", "moved"], ["img01.png", str(tmp_path / "moved.png")])
    assert torch.equal(regions.features[1], source.regions(["img00.png"]).features[0].float())


def test_batched_encoding_equals_one_at_a_time(extracted, monkeypatch):
    store, keys = extracted
    model = BiEncoder(tiny_model_config(pooled_dim=8)).eval()
    monkeypatch.setattr(encode, "STORE_BATCH", 5)
    images = encode_collection(model, RegionSource("test-colour", store), keys)
    with torch.no_grad():
        alone = torch.cat([model.encode_image(store.batch([k])) for k in keys])
    assert torch.allclose(images, alone, atol=1e-5)
    captions = ["a red picture", "something much longer than the others", "blue"]
    with torch.no_grad():
        one_by_one = torch.cat([model.encode_text([c]) for c in captions])
    assert torch.allclose(encode_texts(model, captions, batch_size=2), one_by_one, atol=1e-5)
