"""The routes of a collection that changes: DELETE /images/{id}, filters and pages of results."""

import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightningdot.retrieval import Page, Retriever  # noqa: E402
from lightningdot.serve import create_app  # noqa: E402
from tests.serve.test_security import HERE, KEY, client_for  # noqa: E402


@pytest.fixture(params=["faiss", "milvus"])
def retriever(request, index_dir, corpus_dir, tmp_path):
    """The index of `index_dir`, or the same built into Milvus."""
    if request.param == "faiss":
        return Retriever.open(index_dir)
    pytest.importorskip("milvus_lite")
    from lightningdot.data import read_karpathy
    from lightningdot.index.milvus import MilvusTarget
    from tests.helpers import index_of_saved_model

    corpus = read_karpathy(corpus_dir / "captions.json", "train")
    milvus = MilvusTarget(str(tmp_path / "m.db"))
    index_of_saved_model(tmp_path / "model", corpus, corpus_dir, tmp_path / "ixm", milvus=milvus)
    return Retriever.open(tmp_path / "ixm")


@pytest.fixture
def client(retriever):
    with TestClient(create_app(retriever), base_url=HERE) as c:
        yield c


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, "PNG")
    return buf.getvalue()


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [h["id"] for h in response.json()["results"]]


def test_delete_takes_an_image_out_of_every_answer(client, retriever):
    first = ids(client.get("/search", params={"q": "red", "k": 20}))
    gone = first[0]
    r = client.delete(f"/images/{gone}")
    assert r.status_code == 200 and r.json() == {"deleted": gone, "count": len(first) - 1}
    assert ids(client.get("/search", params={"q": "red", "k": 20})) == first[1:]
    assert client.get(f"/images/{gone}").status_code == 404
    found = client.post("/search/image", files={"file": ("q.png", png("red"))}, data={"k": 20})
    assert all(not h["id"].startswith(f"{gone}#") for h in found.json()["captions"])
    again = client.delete(f"/images/{gone}")
    assert again.status_code == 404 and gone in again.json()["detail"]


def test_filter_offset_and_min_score_answer_like_the_retriever(client, retriever):
    spec = json.dumps({"path": {"in": ["img01.png", "img03.png", "img04.png", "img06.png"]}})
    params = {"q": "a blue picture", "k": 2, "filter": spec, "offset": 1}
    (want,) = retriever.search_text(["a blue picture"], 2, page=Page(spec, offset=1))
    assert ids(client.get("/search", params=params)) == [x.id for x in want.results]
    scores = [h["score"] for h in client.get("/search", params={"q": "blue"}).json()["results"]]
    floor = sorted(scores)[-3]
    high = client.get("/search", params={"q": "blue", "min_score": floor}).json()["results"]
    assert len(high) == 3
    data = {"k": 10, "filter": spec}
    found = client.post("/search/image", files={"file": ("q.png", png("blue"))}, data=data).json()
    assert {h["id"] for h in found["images"]} <= {
        "img01.png",
        "img03.png",
        "img04.png",
        "img06.png",
    }
    assert {h["id"].split("#")[0] for h in found["captions"]} <= {h["id"] for h in found["images"]}


@pytest.mark.parametrize(
    "params, status, says",
    [
        ({"filter": '{"colour": "red"}'}, 400, "unknown filter field 'colour'"),
        ({"filter": '{"path": {"like": "a"}}'}, 400, "unknown filter operator 'like'"),
        ({"filter": "{oops"}, 400, "not JSON"),
        ({"offset": -1}, 422, "offset"),
        ({"offset": 10**6}, 422, "offset"),
        ({"min_score": "high"}, 422, "min_score"),
    ],
)
def test_bad_pages_get_a_4xx_naming_what_is_wrong(client, params, status, says):
    r = client.get("/search", params={"q": "red", **params})
    assert r.status_code == status and says in r.text


def test_delete_is_a_write_like_an_add(retriever):
    with client_for(retriever, "127.0.0.1", KEY) as c:
        assert c.delete("/images/img00.png").status_code == 401
        evil = {"Origin": "http://evil.example", "X-API-Key": KEY}
        assert c.delete("/images/img00.png", headers=evil).status_code == 403
        assert retriever.image_index.get("img00.png") is not None
        assert c.delete("/images/img00.png", headers={"X-API-Key": KEY}).status_code == 200
    with client_for(retriever, "0.0.0.0", None) as c:  # writes off beyond loopback without a key
        assert c.delete("/images/img01.png").status_code == 403


def test_searches_during_deletes_see_the_index_before_or_after_each(client):
    everything = ids(client.get("/search", params={"q": "red", "k": 20}))
    doomed = everything[:4]

    def search(_):
        return ids(client.get("/search", params={"q": "red", "k": 20}))

    with ThreadPoolExecutor(4) as pool:
        seen = pool.map(search, range(40))
        for image_id in doomed:
            assert client.delete(f"/images/{image_id}").status_code == 200
        seen = list(seen)
    for answer in seen:  # each answer is the index after some prefix of the deletes
        cut = len(everything) - len(answer)
        assert answer == [i for i in everything if i not in doomed[:cut]]
    assert search(0) == everything[4:]


def test_patch_sets_fields_a_filter_then_reads(client):
    r = client.patch("/images/img02.png", json={"fields": {"stock": 5}})
    assert r.status_code == 200 and r.json()["fields"]["stock"] == 5
    spec = json.dumps({"stock": {"gt": 0}})
    assert ids(client.get("/search", params={"q": "red", "filter": spec})) == ["img02.png"]
    bad = client.patch("/images/img02.png", json={"fields": {"path": "elsewhere.png"}})
    assert bad.status_code == 400 and "cannot be set" in bad.json()["detail"]
    assert client.patch("/images/nope.png", json={"fields": {"a": 1}}).status_code == 404
    assert client.patch("/images/img02.png", json={"nofields": 1}).status_code == 422


def test_patch_is_a_write_like_an_add(retriever):
    with client_for(retriever, "127.0.0.1", KEY) as c:
        assert c.patch("/images/img00.png", json={"fields": {"a": 1}}).status_code == 401
        evil = {"Origin": "http://evil.example", "X-API-Key": KEY}
        assert (
            c.patch("/images/img00.png", json={"fields": {"a": 1}}, headers=evil).status_code == 403
        )
        assert "a" not in retriever.image_index.get("img00.png").get("meta", {})
