"""The filter syntax against a plain-Python reference, and filtered search against brute force."""

import json
import operator
import random
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from lightningdot.config import IndexConfig
from lightningdot.errors import DataError
from lightningdot.index.filters import FilterError, parse_filter
from lightningdot.index.metadata import (
    DATE,
    MetadataColumns,
    file_metadata,
    item_fields,
    upload_metadata,
)
from lightningdot.index.vector import VectorIndex

DAY0 = 1704067200  # 2024-01-01T00:00:00Z
FOLDERS = ["", "trips/", "trips/2024/", "trips/2025/", "home/", "home/cats/"]
CAMERAS = ["X100V", "EOS 5D", "Pixel 8"]


def random_items(n: int, seed: int) -> list[dict]:
    """Items with every kind of field, each field missing from some of them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        meta = {
            "size": rng.randrange(1000, 5000),
            "mtime": 1.7e9 + rng.randrange(0, 10**8),
            "width": rng.choice([224, 640, 1024]),
            "camera": rng.choice(CAMERAS),
            "taken": DAY0 + 86400 * rng.randrange(0, 900, 100),  # every 100 days from 2024-01-01
            "stock": rng.randrange(0, 5),
            "colour": rng.choice(["red", "green", "blue"]),
        }
        meta = {k: v for k, v in meta.items() if rng.random() > 0.15}
        out.append({"id": f"i{i}", "path": f"{rng.choice(FOLDERS)}p{i}.jpg", "meta": meta})
    return out


def seconds(text: str) -> float:
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def holds(op: str, have, want) -> bool:
    if op == "in":
        return have in want
    if op == "prefix":
        return str(have).startswith(want)
    compare = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gte": operator.ge}
    return {**compare, "lt": operator.lt, "lte": operator.le}[op](have, want)


def reference(item: dict, spec: dict, kinds: dict) -> bool:
    """The filter's meaning, one item at a time, written plainly."""
    fields = item_fields(item)
    for name, cond in spec.items():
        ops = cond if isinstance(cond, dict) else {"eq": cond}
        for op, want in ops.items():
            if name not in fields:
                return False
            have = fields[name]
            if kinds[name] == DATE:
                want = (
                    [seconds(w) if isinstance(w, str) else w for w in want]
                    if op == "in"
                    else (seconds(want) if isinstance(want, str) else want)
                )
            ok = holds(op, have, want)
            if not ok:
                return False
    return True


SPECS = [
    {"folder": "trips/"},
    {"folder": {"prefix": "trips/"}},
    {"path": {"prefix": "home/c"}},
    {"folder": {"ne": "home/"}},
    {"camera": {"in": ["X100V", "Pixel 8"]}},
    {"colour": "red", "stock": {"gte": 2}},
    {"stock": {"gt": 1, "lt": 4}},
    {"stock": {"in": [0, 4]}},
    {"stock": {"ne": 3}},
    {"size": {"lte": 2500}},
    {"width": 640},
    {"taken": {"gte": "2024-01-01", "lt": "2025-06-01T12:00:00"}},
    {"mtime": {"gt": 1.75e9}},
    {"taken": {"in": ["2024-01-01", DAY0 + 100 * 86400]}},
    {"camera": {"prefix": ""}},
    {},
]


@pytest.mark.parametrize("spec", SPECS, ids=[json.dumps(s) for s in SPECS])
def test_every_operator_matches_the_reference(spec):
    items = random_items(400, seed=len(json.dumps(spec)))
    columns = MetadataColumns(items)
    parsed = parse_filter(json.dumps(spec), columns.kinds)
    mask = np.ones(len(items), bool) if parsed is None else parsed.mask(columns)
    want = [reference(it, spec, columns.kinds) for it in items]
    assert mask.tolist() == want
    assert 0 < sum(want) < len(items) or spec in ({}, {"camera": {"prefix": ""}})


@pytest.mark.parametrize(
    "spec, names",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ({"folderr": "x"}, "'folderr'"),
        ({"stock": {"between": [1, 2]}}, "'between'"),
        ({"stock": {"prefix": "1"}}, "text fields only"),
        ({"camera": {"gt": "A"}}, "number and date fields only"),
        ({"camera": 3}, "text field"),
        ({"stock": "many"}, "not a number"),
        ({"stock": {"in": []}}, "non-empty list"),
        ({"taken": {"gte": "last tuesday"}}, "not an ISO date"),
        ({"stock": {}}, "no condition"),
        ({"stock": True}, "not a number"),
    ],
)
def test_bad_filters_are_refused_by_name(spec, names):
    kinds = MetadataColumns(random_items(20, 0)).kinds
    with pytest.raises(FilterError, match=names) as e:
        parse_filter(spec, kinds)
    assert isinstance(e.value, DataError)


def test_no_filter_is_none():
    assert parse_filter(None, {}) is None and parse_filter("  ", {}) is None
    assert parse_filter("{}", {}) is None


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(x, q, allowed, k):
    scores = np.where(allowed[None, :], q @ x.T, -np.inf)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


# nprobe = nlist and a large efSearch: exact, so that ids compare one for one.
EXACT = [
    IndexConfig(),
    IndexConfig(factory="IVF4,Flat", nprobe=4),
    IndexConfig(factory="HNSW32", ef_search=512),
]


@pytest.mark.parametrize("cfg", EXACT, ids=lambda c: c.factory)
def test_filtered_search_with_deletes_matches_brute_force(tmp_path, cfg):
    items = random_items(500, 1)
    x, q = unit(500, 16, 0), unit(6, 16, 1)
    index = VectorIndex.build(x, items, "m", cfg)
    spec = {"folder": {"prefix": "trips/"}, "stock": {"lte": 3}}
    mask = parse_filter(spec, index.columns.kinds).mask(index.columns)
    gone = [f"i{i}" for i in range(0, 500, 7)]
    smaller = index.without(gone)
    assert index.count == 500 and smaller.count == 500 - len(gone)  # the original is unchanged
    alive = np.ones(500, bool)
    alive[::7] = False
    smaller.save(tmp_path / "ix")
    for ix in (smaller, VectorIndex.load(tmp_path / "ix", mmap=True)):
        for allowed, want in ((mask, mask & alive), (None, alive)):
            scores, ids = ix.search(q, 10, allowed=allowed)
            ref_scores, ref_ids = brute_force(x, q, want, 10)
            assert np.array_equal(ids, ref_ids)
            assert np.allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("cfg", EXACT, ids=lambda c: c.factory)
def test_a_compacted_index_is_the_live_rows_alone(tmp_path, cfg):
    items = random_items(500, 4)
    x, q = unit(500, 16, 0), unit(6, 16, 1)
    index = VectorIndex.build(x, items, "m", cfg)
    assert index.compacted() is index  # nothing deleted: nothing to do
    gone = index.without([f"i{i}" for i in range(0, 500, 3)])
    small = gone.compacted()
    alive = np.ones(500, bool)
    alive[::3] = False
    assert gone.deleted is not None and len(gone) == 500  # unchanged
    assert small.deleted is None and len(small) == small.count == alive.sum()
    assert small.items == [it for it, a in zip(items, alive, strict=True) if a]
    kept = [it["id"] for it in small.items]
    assert np.array_equal(small.vectors(kept), x[alive])
    small.save(tmp_path / "ix")
    for ix in (small, VectorIndex.load(tmp_path / "ix")):
        scores, rows = ix.search(q, 10)
        ref_scores, ref_rows = brute_force(x[alive], q, np.ones(alive.sum(), bool), 10)
        assert np.array_equal(rows, ref_rows) and np.allclose(scores, ref_scores, atol=1e-5)
    emptied = index.without([it["id"] for it in items]).compacted()
    assert len(emptied) == 0 and (emptied.search(q, 5)[1] < 0).all()


def test_a_filter_passing_fewer_than_k_returns_only_those():
    items = random_items(50, 2)
    index = VectorIndex.build(unit(50, 8, 0), items, "m")
    allowed = np.zeros(50, bool)
    allowed[[3, 9]] = True
    _, ids = index.search(unit(1, 8, 1), 10, allowed=allowed)
    assert sorted(i for i in ids[0].tolist() if i >= 0) == [3, 9]
    assert (ids[0] < 0).sum() == 8


def test_deleted_items_leave_their_id_free():
    x = unit(10, 8, 0)
    index = VectorIndex.build(x[:5], random_items(5, 0), "m").without(["i2"])
    assert index.row("i2") is None and index.count == 4 and len(index) == 5
    with pytest.raises(DataError, match="not in the index"):
        index.without(["i2"])
    grown = index.copy()
    grown.add(x[5:6], [{"id": "i2", "path": "again.jpg"}])
    assert grown.row("i2") == 5 and grown.count == 5
    _, ids = grown.search(x[2:3], 6)
    assert 2 not in ids[0].tolist()


def test_damaged_tombstones_are_refused(tmp_path):
    VectorIndex.build(unit(5, 4, 0), random_items(5, 0), "m").without(["i1"]).save(tmp_path / "ix")
    np.save(tmp_path / "ix" / "deleted.npy", np.zeros(4, bool))
    with pytest.raises(DataError, match="deleted.npy"):
        VectorIndex.load(tmp_path / "ix")


def test_file_metadata_reads_size_dimensions_and_exif(tmp_path):
    exif = Image.Exif()
    exif[271], exif[272] = "Fujifilm", "X100V"
    exif.get_ifd(0x8769)[36867] = "2024:06:01 18:30:00"
    path = tmp_path / "a.jpg"
    Image.new("RGB", (64, 48), "red").save(path, exif=exif)
    meta = file_metadata(path)
    assert meta["width"] == 64 and meta["height"] == 48 and meta["size"] == path.stat().st_size
    assert meta["camera"] == "Fujifilm X100V"
    assert meta["taken"] == seconds("2024-06-01T18:30:00")
    assert upload_metadata(path.read_bytes())["camera"] == "Fujifilm X100V"
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    assert set(file_metadata(tmp_path / "b.jpg")) == {"size", "mtime"}
    assert file_metadata(tmp_path / "missing.jpg") == {}


def test_folder_and_path_come_from_the_item():
    assert item_fields({"id": "a", "path": "x.jpg"}) == {"path": "x.jpg", "folder": ""}
    fields = item_fields({"id": "a", "path": "t/2024/x.jpg", "meta": {"stock": 1}})
    assert fields == {"path": "t/2024/x.jpg", "folder": "t/2024/", "stock": 1}


@pytest.mark.parametrize("factory", ["PCA8,IVF4,Flat", "IVF4,Flat,RFlat", "OPQ4,IVF4,Flat"])
def test_wrapped_index_types_filter_and_delete(factory):
    x, q = unit(600, 16, 0), unit(4, 16, 1)
    index = VectorIndex.build(x, random_items(600, 3), "m", IndexConfig(factory, nprobe=4))
    index = index.without([f"i{i}" for i in range(0, 600, 3)])
    allowed = np.zeros(600, bool)
    allowed[::2] = True
    _, ids = index.search(q, 10, allowed=allowed)
    assert (ids >= 0).all() and allowed[ids].all() and (ids % 3 != 0).all()


def test_an_index_type_that_cannot_skip_rows_refuses_deletes_and_filters():
    index = VectorIndex.build(unit(300, 16, 0), random_items(300, 3), "m", IndexConfig("PQ2x4"))
    with pytest.raises(DataError, match="cannot search a subset"):
        index.without(["i1"])
    assert index.deleted is None and index.row("i1") == 1
    with pytest.raises(DataError, match="rebuild it as Flat, IVF or HNSW"):
        index.search(unit(1, 16, 1), 5, allowed=np.ones(300, bool))
