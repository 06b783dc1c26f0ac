"""Region states kept in an index folder: the image encoder's own, row for row with the image
index through builds, adds and uploads, linked (not copied) from version to version."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lightningdot.data import Corpus, read_karpathy
from lightningdot.encode import RegionSource, StateRows
from lightningdot.errors import DataError
from lightningdot.index.build import build_index
from lightningdot.index.folder import IndexFolder
from lightningdot.index.record import Manifest
from lightningdot.index.states import RegionStates
from lightningdot.model.checkpoint import load_model
from lightningdot.retrieval import Retriever


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, "PNG")
    return buf.getvalue()


def reference_states(model, files):
    """The states straight from the files: backbone, then the image encoder."""
    regions = RegionSource.of(model).of_images(files)
    with torch.inference_mode():
        return model.encode_image_states(regions)[1]


def build(corpus_dir, model_dir, out, n=None, states=True):
    corpus = read_karpathy(corpus_dir / "captions.json")
    corpus = Corpus(corpus.images[:n]) if n else corpus
    model = load_model(model_dir)
    build_index(model, str(model_dir), corpus, corpus_dir / "images", out, states=states)
    return model, corpus


def test_kept_states_are_the_encoders_own_row_for_row(corpus_dir, model_dir, tmp_path):
    model, corpus = build(corpus_dir, model_dir, tmp_path / "ix", n=5)
    r = Retriever.open(tmp_path / "ix")
    assert len(r.index.states) == len(r.image_index) == 5
    rows = [4, 0, 2]
    files = [corpus_dir / "images" / r.image_index.items[i]["path"] for i in rows]
    got, mask = r.index.states.gather(rows)
    want = reference_states(model, files)
    assert got.dtype == torch.float32 and mask.all() and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)  # float16 on disk


def test_adds_and_uploads_keep_states_in_step_and_link_old_chunks(corpus_dir, model_dir, tmp_path):
    model, _ = build(corpus_dir, model_dir, tmp_path / "ix", n=4)
    full = read_karpathy(corpus_dir / "captions.json")
    r = Retriever.open(tmp_path / "ix", mmap=False)
    first = tmp_path / "ix" / Manifest.read(tmp_path / "ix").parts["states"]
    inode = (first / "chunk-0.npy").stat().st_ino  # its version is swept by the next commit
    assert r.add_collection(full, corpus_dir / "images").added == 8
    r.add_uploads([("a.png", png("teal")), ("b.png", png("navy"))])
    folder = IndexFolder.open(tmp_path / "ix", model)
    assert len(folder.states) == len(folder.image_index) == 14
    assert [len(c.rows) for c in folder.states.chunks] == [4, 8, 2]
    latest = tmp_path / "ix" / folder.manifest.parts["states"]
    assert (latest / "chunk-0.npy").stat().st_ino == inode
    row = folder.image_index.row(r.add_uploads([("a.png", png("teal"))]).images[0][0])
    got, _ = folder.states.gather([row, 5])
    files = [png("teal"), corpus_dir / "images" / folder.image_index.items[5]["path"]]
    torch.testing.assert_close(got, reference_states(model, files), atol=2e-3, rtol=1e-2)


def test_no_states_leaves_them_out_and_adds_keep_it_so(corpus_dir, model_dir, tmp_path):
    build(corpus_dir, model_dir, tmp_path / "ix", n=4, states=False)
    assert "states" not in Manifest.read(tmp_path / "ix").parts
    r = Retriever.open(tmp_path / "ix", mmap=False)
    r.add_uploads([("a.png", png("teal"))])
    assert r.index.states is None
    assert "states" not in Manifest.read(tmp_path / "ix").parts


def test_states_that_do_not_match_the_images_are_refused(corpus_dir, model_dir, tmp_path):
    build(corpus_dir, model_dir, tmp_path / "ix", n=4)
    part = tmp_path / "ix" / Manifest.read(tmp_path / "ix").parts["states"]
    np.save(part / "chunk-0.npy", np.zeros((3, 5, 32), np.float16))
    with pytest.raises(DataError, match="does not hold 4"):
        IndexFolder.load(tmp_path / "ix")
    record = json.loads((part / "states.json").read_text())
    np.save(part / "chunk-0.npy", np.zeros((3, 5, 32), np.float16))
    np.save(part / "lengths-0.npy", np.full(3, 5, np.int32))
    (part / "states.json").write_text(json.dumps({**record, "rows": 3, "chunks": [3]}))
    with pytest.raises(DataError, match="3 images' states for 4 images"):
        IndexFolder.load(tmp_path / "ix")


def test_gather_pads_chunks_of_different_widths():
    wide = StateRows(np.ones((2, 5, 3), np.float16), np.array([5, 3], np.int32))
    narrow = StateRows(np.full((1, 2, 3), 2, np.float16), np.array([2], np.int32))
    states = RegionStates.build(wide).grown(narrow)
    got, mask = states.gather([2, 1])
    assert got.shape == (2, 3, 3)  # the widest real length among them, not the chunks' width
    assert mask.tolist() == [[True, True, False], [True] * 3]
    assert got[0, :2].eq(2).all() and got[0, 2:].eq(0).all() and got[1, :3].eq(1).all()
    with pytest.raises(IndexError):
        states.gather([3])


def test_kept_states_drop_rows_and_keep_whole_chunks_as_committed(tmp_path):
    rng = np.random.default_rng(0)
    first = StateRows(rng.normal(size=(3, 4, 2)).astype(np.float16), np.array([4, 2, 3], np.int32))
    second = StateRows(rng.normal(size=(2, 5, 2)).astype(np.float16), np.array([5, 1], np.int32))
    third = StateRows(rng.normal(size=(2, 3, 2)).astype(np.float16), np.array([3, 3], np.int32))
    states = RegionStates.build(first).grown(second).grown(third)
    (tmp_path / "v1").mkdir()
    states.write(tmp_path / "v1")
    states = RegionStates.load(tmp_path / "v1")
    keep = np.array([True, False, True, False, False, True, True])
    kept = states.kept(keep)
    assert len(kept) == 4 and len(kept.chunks) == 2
    assert kept.chunks[1].source == tmp_path / "v1"  # the third chunk, whole: linked again
    for got, row in enumerate(np.flatnonzero(keep).tolist()):
        (got_states, got_mask), (want_states, want_mask) = kept.gather([got]), states.gather([row])
        assert torch.equal(got_states, want_states) and torch.equal(got_mask, want_mask)
    (tmp_path / "v2").mkdir()
    kept.write(tmp_path / "v2")
    assert (tmp_path / "v2" / "chunk-1.npy").stat().st_ino == (
        tmp_path / "v1" / "chunk-2.npy"
    ).stat().st_ino
    assert len(RegionStates.load(tmp_path / "v2")) == 4
    with pytest.raises(ValueError, match="flags"):
        states.kept(keep[:3])


def test_a_change_puts_its_parts_live_in_one_step(corpus_dir, model_dir, tmp_path):
    """A search holds the parts it read; an add meanwhile leaves them as they were."""
    build(corpus_dir, model_dir, tmp_path / "ix", n=4)
    r = Retriever.open(tmp_path / "ix", mmap=False)
    held = r.index.live
    r.add_uploads([("a.png", png("teal"))])
    assert len(held.images) == len(held.states) == 4
    assert len(r.index.live.images) == len(r.index.live.states) == 5
    (hits,) = [a.results for a in r.search_text(["a red picture"], k=3)]
    got, _ = r.candidate_states(hits, held)  # rows of the version the results came from
    assert got.shape[0] == 3
