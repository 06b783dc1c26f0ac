import json
import re

import pytest

from lightningdot.data import read_collection, read_image_folder, read_karpathy
from lightningdot.errors import DataError


def test_karpathy_split_and_caption_index(corpus_dir):
    c = read_karpathy(corpus_dir / "captions.json", "val")
    assert len(c.images) == 4 and len(c.captions) == 8
    assert c.caption_image == [0, 0, 1, 1, 2, 2, 3, 3]


def test_karpathy_errors(tmp_path, corpus_dir):
    with pytest.raises(DataError, match="not found"):
        read_karpathy(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        read_karpathy(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no images"):
        read_karpathy(tmp_path / "empty.json")
    (tmp_path / "mal.json").write_text(json.dumps({"images": [{"split": "train"}]}))
    with pytest.raises(DataError, match="image entry 0 has no 'filename'"):
        read_karpathy(tmp_path / "mal.json")
    with pytest.raises(DataError, match="no split 'test'.*train, val"):
        read_karpathy(corpus_dir / "captions.json", "test")


def test_image_folder(corpus_dir, tmp_path):
    c = read_image_folder(corpus_dir / "images")
    assert len(c.images) == 12 and c.captions == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_image_folder(tmp_path / "empty")


def _entry(**fields):
    return {"filename": "a.jpg", "split": "val", "sentences": [{"raw": "a dog"}]} | fields


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], r"not in Karpathy format.*'images' list, got \[1, 2\]$"),
        ({"images": "abc"}, r"'images' list, got \"abc\"$"),
        ({"dataset": "x"}, r"'images' list, got \{\"dataset\": \"x\"\}$"),
    ],
)
def test_karpathy_file_of_another_shape(tmp_path, data, message):
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        read_karpathy(tmp_path / "ann.json")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("abc", r"1 must be an object, got \"abc\"$"),
        (_entry(filename=5), r"1: 'filename' must be a string, got 5$"),
        (_entry(filename=None), r"1: 'filename' must be a string, got null$"),
        (_entry(filepath=3), r"1: 'filepath' must be a string, got 3$"),
        (_entry(filename=""), r"1: image '' is not a path inside the images folder$"),
        (_entry(filename="/etc/x.jpg"), r"1: image '/etc/x.jpg' is not a path inside"),
        (_entry(filename="../x.jpg"), r"1: image '../x.jpg' is not a path inside"),
        (_entry(split=["val"]), r"1 \(a.jpg\): 'split' must be a string, got \[\"val\"\]$"),
        ({"filename": "a.jpg", "split": "val"}, r"1 \(a.jpg\) has no 'sentences'$"),
        (_entry(sentences="x"), r"1 \(a.jpg\): 'sentences' must be a list of .*, got \"x\"$"),
        (_entry(sentences=[None]), r"1 \(a.jpg\), sentence 0 must be an object .*, got null$"),
        (_entry(sentences=[{"tokens": []}]), r"1 \(a.jpg\), sentence 0 has no 'raw'$"),
        (_entry(sentences=[{"raw": 3}]), r"1 \(a.jpg\), sentence 0: 'raw' must be a string"),
        (_entry(filename="ok.jpg"), r"1 \(ok.jpg\) repeats entry 0$"),
    ],
)
def test_malformed_karpathy_entry_is_named(tmp_path, entry, message):
    # A good entry comes first, and only its split is asked for: every entry is checked.
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [_entry(filename="ok.jpg", split="train"), entry]}))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: image entry {message}"):
        read_karpathy(path, "train")


def test_karpathy_file_that_is_a_folder_or_empty(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        read_karpathy(tmp_path)
    (tmp_path / "empty.json").write_text(" \n")
    with pytest.raises(DataError, match="is empty"):
        read_karpathy(tmp_path / "empty.json")
    (tmp_path / "latin1.json").write_bytes(b'{"images": ["\xe9"]}')
    with pytest.raises(DataError, match="not UTF-8"):
        read_karpathy(tmp_path / "latin1.json")


def test_karpathy_keeps_coco_folders_and_drops_blank_captions(tmp_path):
    entry = _entry(filepath="val2014", sentences=[{"raw": " a cat "}, {"raw": "  "}])
    (tmp_path / "coco.json").write_text(json.dumps({"images": [entry]}))
    (record,) = read_karpathy(tmp_path / "coco.json").images
    assert record.key == "val2014/a.jpg" and record.captions == ["a cat"]


def test_collection_needs_an_images_folder_even_with_annotations(corpus_dir):
    ann = corpus_dir / "captions.json"
    assert len(read_collection(corpus_dir / "images", ann, "val").images) == 4
    with pytest.raises(DataError, match="image folder not found"):
        read_collection(corpus_dir / "nope", ann, "val")
    with pytest.raises(DataError, match="captions.json is a file; give the folder of the images"):
        read_collection(ann, ann, "val")
    with pytest.raises(DataError, match="is a file; give the folder"):
        read_image_folder(ann)
