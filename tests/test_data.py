import json

import pytest

from lightningdot.data import read_image_folder, read_karpathy
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
    with pytest.raises(DataError, match="malformed"):
        read_karpathy(tmp_path / "mal.json")
    with pytest.raises(DataError, match="no split 'test'.*train, val"):
        read_karpathy(corpus_dir / "captions.json", "test")


def test_image_folder(corpus_dir, tmp_path):
    c = read_image_folder(corpus_dir / "images")
    assert len(c.images) == 12 and c.captions == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_image_folder(tmp_path / "empty")
