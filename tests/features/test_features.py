import json

import numpy as np
import pytest
import torch
from PIL import Image

from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.features import (
    FeatureStore,
    FeatureStoreWriter,
    RegionFeatures,
    StoreInfo,
    collate_regions,
    grid_boxes,
    load_image,
    read_detector_npz,
)
from lightningdot.features.extract import extract_images
from tests.helpers import FEATURE_DIM, NUM_CLASSES, ColourBackbone, write_store


def test_grid_boxes_tile_the_image():
    b = grid_boxes(2, 3)
    assert b.shape == (6, 7)
    assert torch.allclose(b[0], torch.tensor([0, 0, 1 / 3, 0.5, 1 / 3, 0.5, 1 / 6]))
    assert torch.allclose(b[:, 6].sum(), torch.tensor(1.0))  # areas add up to the image


def test_store_round_trip_across_shards(tmp_path):
    keys = [f"k{i}" for i in range(12)]
    write_store(tmp_path / "s", keys, seed=3)  # shard size 5 -> 3 shards
    store = FeatureStore(tmp_path / "s")
    assert len(store) == 12 and len(list((tmp_path / "s").glob("shard-*"))) == 3
    g = torch.Generator().manual_seed(3)
    first = torch.randn(4, FEATURE_DIM, generator=g)
    got = store.get("k0")
    assert torch.allclose(got.features.float(), first, atol=1e-2)  # stored as fp16
    batch = store.batch(["k11", "k0"])
    assert (
        batch.features.shape == (2, 4, FEATURE_DIM) and batch.soft_labels.shape[-1] == NUM_CLASSES
    )
    assert torch.equal(batch.features[1], got.features)


def test_store_variable_region_counts_are_padded_and_masked(tmp_path):
    info = StoreInfo("detector", 3, 0)
    with FeatureStoreWriter(tmp_path, info) as w:
        w.add("a", RegionFeatures(torch.ones(2, 3), grid_boxes(1, 2)))
        w.add("b", RegionFeatures(torch.ones(5, 3), grid_boxes(1, 5)))
    store = FeatureStore(tmp_path)
    assert store.get("a").features.shape == (2, 3)
    batch = store.batch(["a", "b"])
    assert batch.mask.sum(1).tolist() == [2, 5] and batch.soft_labels is None


def test_writer_refuses_another_config(tmp_path):
    write_store(tmp_path, ["a"])
    with pytest.raises(ConfigMismatchError):
        FeatureStoreWriter(tmp_path, StoreInfo("other", FEATURE_DIM, NUM_CLASSES))


def test_damaged_shard_is_a_clear_error(tmp_path):
    write_store(tmp_path, ["a", "b"])
    shard = next(tmp_path.glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match="damaged"):
        FeatureStore(tmp_path)


def test_missing_key_names_it(tmp_path):
    write_store(tmp_path, ["a"])
    with pytest.raises(DataError, match="'zz'"):
        FeatureStore(tmp_path).get("zz")


def test_extraction_skips_bad_images_and_resumes(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (10, 10), "red").save(imgs / "red.png")
    Image.new("L", (7, 13), 128).save(imgs / "grey.png")  # unusual mode and size
    Image.new("RGBA", (9, 9), (0, 0, 255, 0)).save(imgs / "clear.png")
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    items = [(p.name, p) for p in sorted(imgs.iterdir())] + [("gone.png", imgs / "gone.png")]
    bb = ColourBackbone()
    summary = extract_images(items, tmp_path / "store", bb, batch_size=2, shard_size=2)
    assert summary.extracted == 3 and summary.total == 5
    assert sorted(k for k, _ in summary.failed) == ["broken.jpg", "gone.png"]
    store = FeatureStore(tmp_path / "store")
    assert torch.allclose(store.get("red.png").features.float()[0, :3], torch.tensor([255.0, 0, 0]))
    # Transparent pixels are pasted on white.
    assert torch.allclose(store.get("clear.png").features.float()[0, :3], torch.tensor([255.0] * 3))
    again = extract_images(items, tmp_path / "store", bb, batch_size=2)
    assert again.skipped == 3 and again.extracted == 0


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="bad.png"):
        load_image(bad)


def test_detector_npz_pixel_boxes_are_normalised(tmp_path):
    np.savez(
        tmp_path / "a.npz",
        features=np.ones((2, 2048), np.float32),
        boxes=np.array([[0, 0, 50, 100], [25, 50, 100, 100]], np.float32),
        image_w=np.array(100),
        image_h=np.array(100),
    )
    r = read_detector_npz(tmp_path / "a.npz")
    assert torch.allclose(r.boxes[0], torch.tensor([0, 0, 0.5, 1.0, 0.5, 1.0, 0.5]))
    np.savez(tmp_path / "b.npz", features=np.ones((2, 4)))
    with pytest.raises(DataError, match="box"):
        read_detector_npz(tmp_path / "b.npz")


def test_collate_pads(tmp_path):
    b = collate_regions(
        [
            RegionFeatures(torch.ones(1, 2), grid_boxes(1, 1)),
            RegionFeatures(torch.ones(3, 2), grid_boxes(1, 3)),
        ]
    )
    assert b.features.shape == (2, 3, 2) and b.mask.tolist() == [[True, False, False], [True] * 3]


@pytest.mark.slow
def test_efficientnet_lite2_grid(tmp_path):
    from lightningdot.features import create_backbone

    bb = create_backbone("efficientnet-lite2")
    x = bb.preprocess(Image.new("RGB", (224, 224), "blue")).unsqueeze(0)
    (r,) = bb(x)
    assert r.features.shape == (81, 1280) and r.soft_labels.shape == (81, 1000)
    assert torch.allclose(r.soft_labels.sum(-1), torch.ones(81), atol=1e-4)
    json.dumps(bb.name)


def test_reading_a_few_rows_equals_reading_whole_shards(tmp_path):
    keys = [f"k{i}" for i in range(40)]
    write_store(tmp_path / "small", keys)  # shards of 5 rows: every read takes a whole shard
    small = FeatureStore(tmp_path / "small")
    # The same regions in shards of 20 rows, where a read of two rows goes row by row.
    with FeatureStoreWriter(tmp_path / "big", small.info, shard_size=20) as w:
        for k, r in zip(keys, small.gather(keys), strict=True):
            w.add(k, r)
    big = FeatureStore(tmp_path / "big")
    few, want = big.batch(["k3", "k37"]), small.batch(["k3", "k37"])
    assert torch.equal(few.features, want.features) and torch.equal(few.boxes, want.boxes)
    assert torch.equal(few.soft_labels, want.soft_labels)
    assert big.batch(["k3"], soft_labels=False).soft_labels is None


def test_creating_the_backbone_prints_nothing_on_stdout(capfd):
    # `ldot search --json` prints results on stdout; efficientnet_lite_pytorch announces the
    # weights it loaded with print(), which must not land there.
    from lightningdot.features import create_backbone

    bb = create_backbone("efficientnet-lite2")
    out, err = capfd.readouterr()
    assert bb.name == "efficientnet-lite2" and out == ""
    assert "Loaded pretrained weights" in err  # still shown, on stderr


def test_undecodable_bytes_are_named_not_shown_as_a_python_object(tmp_path):
    with pytest.raises(DataError, match="^cannot decode the uploaded data: not an image") as e:
        load_image(b"plain text")
    assert "BytesIO" not in str(e.value)
    with pytest.raises(DataError, match="^cannot decode cat.txt: "):
        load_image(b"plain text", name="cat.txt")
    with pytest.raises(DataError, match="^cannot decode the uploaded data: OSError: Truncated"):
        load_image(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
    with pytest.raises(DataError, match="is a folder, not a file"):
        load_image(tmp_path)


def test_writer_refuses_a_file_a_folder_of_other_files_and_no_shards(tmp_path):
    info = StoreInfo("test", FEATURE_DIM, NUM_CLASSES)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        FeatureStoreWriter(tmp_path / "file", info)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"holds other files \('a.jpg', ...\) and no feature store"):
        FeatureStoreWriter(tmp_path / "images", info)
    assert not (tmp_path / "images" / "store.json").exists()
    with pytest.raises(DataError, match="shard size must be at least 1, not 0"):
        FeatureStoreWriter(tmp_path / "new", info, shard_size=0)
    with pytest.raises(DataError, match="batch size must be at least 1, not 0"):
        extract_images([], tmp_path / "new", ColourBackbone(), batch_size=0)
