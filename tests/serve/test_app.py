"""The HTTP service, through FastAPI's TestClient, over a tiny seeded index."""

import asyncio
import dataclasses
import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightningdot.config import ServeConfig  # noqa: E402
from lightningdot.errors import DataError  # noqa: E402
from lightningdot.index.vector import VectorIndex  # noqa: E402
from lightningdot.retrieval import Retriever  # noqa: E402
from lightningdot.serve import create_app  # noqa: E402
from lightningdot.serve.batching import MicroBatcher  # noqa: E402
from lightningdot.serve.service import TextQuery, answer_texts  # noqa: E402


@pytest.fixture
def retriever(index_dir):
    return Retriever.open(index_dir, reranker=str(index_dir.parent / "rr"))


@pytest.fixture
def client(retriever):
    with TestClient(create_app(retriever, ServeConfig(max_upload_mb=0.05, max_files=4))) as c:
        yield c


def png(colour, size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def broken_png() -> bytes:
    """A PNG whose image data is split over two chunks, the second with a garbled type: Pillow
    reads its header, then raises SyntaxError (not OSError) while decoding."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    data = buf.getvalue()
    at = data.index(b"IDAT") - 4
    n = struct.unpack(">I", data[at : at + 4])[0]
    payload, half = data[at + 8 : at + 8 + n], n // 2

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + kind + body + crc

    return (
        data[:at]
        + chunk(b"IDAT", payload[:half])
        + chunk(b"I\x00AT", payload[half:])
        + data[at + 12 + n :]
    )


def test_text_search_answers_like_the_retriever(client, retriever):
    r = client.get("/search", params={"q": "a blue picture", "k": 3})
    assert r.status_code == 200
    body = r.json()
    (want,) = retriever.search_text(["a blue picture"], 3)
    assert [h["id"] for h in body["results"]] == [x.id for x in want.results]
    assert [h["score"] for h in body["results"]] == pytest.approx([x.score for x in want.results])
    assert body["results"][0]["image_url"] == f"/images/{want.results[0].id}"
    assert set(body["timing_ms"]) == {"queue", "encode", "search", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["encode"]


def test_rerank_is_a_stage_and_matches_the_retriever(client, retriever):
    body = client.get("/search", params={"q": "something red", "k": 2, "rerank": 5}).json()
    (want,) = retriever.search_text(["something red"], 2, rerank=5)
    assert [h["id"] for h in body["results"]] == [x.id for x in want.results]
    assert "rerank" in body["timing_ms"]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"q": ""}, 422),
        ({"q": "   "}, 400),
        ({"q": "x" * 1001}, 422),
        ({"q": "red", "k": 0}, 422),
        ({"q": "red", "k": 101}, 422),
        ({"q": "red", "k": "many"}, 422),
        ({"q": "red", "rerank": -1}, 422),
        ({"q": "red", "rerank": 65}, 422),
        ({"q": "red", "k": 10, "rerank": 4}, 400),  # re-ranking 4 cannot answer 10
        ({}, 422),
    ],
)
def test_bad_text_queries_get_a_4xx_with_a_message(client, params, status):
    r = client.get("/search", params=params)
    assert r.status_code == status
    assert r.json()["detail"]
    assert client.get("/search", params={"q": "red"}).status_code == 200  # still serving


def test_odd_text_still_gets_an_answer(client):
    for q in ["🐕🐕 a dog", "كلب يركض", "狗在草地上跑", "a\u200bb\u0000c", "ⓐⓑⓒ ẞ ǅ"]:
        r = client.get("/search", params={"q": q, "k": 2})
        assert r.status_code == 200, q
        assert len(r.json()["results"]) == 2


def test_rerank_without_a_reranker_is_a_400(index_dir):
    with TestClient(create_app(Retriever.open(index_dir))) as c:
        r = c.get("/search", params={"q": "red", "rerank": 4})
        assert r.status_code == 400 and "re-ranker" in r.json()["detail"]
        assert c.get("/healthz").json()["reranker"] is False


def test_image_search_finds_captions_and_similar_images(client, retriever, corpus_dir):
    data = (corpus_dir / "images" / "img02.png").read_bytes()
    r = client.post("/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": 3})
    assert r.status_code == 200
    body = r.json()
    (want,) = retriever.search_image_all([corpus_dir / "images" / "img02.png"], 3)
    assert [h["id"] for h in body["images"]] == [x.id for x in want.images]
    assert [h["id"] for h in body["captions"]] == [x.id for x in want.captions]
    assert body["images"][0]["id"] == "img02.png"  # the image itself is the most similar
    caption = body["captions"][0]
    assert caption["image_url"] == f"/images/{caption['path']}"
    assert {"queue", "encode", "search", "total"} <= set(body["timing_ms"])


def test_image_search_with_rerank(client):
    r = client.post(
        "/search/image",
        files={"file": ("q.png", png("green"), "image/png")},
        data={"k": 2, "rerank": 4},
    )
    assert r.status_code == 200
    assert len(r.json()["captions"]) == 2 and "rerank" in r.json()["timing_ms"]


@pytest.mark.parametrize(
    ("files", "data", "status", "says"),
    [
        ({"file": ("notes.txt", b"not an image at all", "text/plain")}, {}, 400, "notes.txt"),
        ({"file": ("cut.png", png("red")[:60], "image/png")}, {}, 400, "cut.png"),
        ({"file": ("garbled.png", broken_png(), "image/png")}, {}, 400, "garbled.png"),
        ({"file": ("empty.png", b"", "image/png")}, {}, 400, "empty"),
        ({}, {"k": 3}, 422, "file"),
        ({"file": ("q.png", png("red"), "image/png")}, {"k": 0}, 422, "k"),
        ({"file": ("big.png", bytes(60_000), "image/png")}, {}, 413, ""),
    ],
)
def test_bad_image_queries_get_a_4xx(client, files, data, status, says):
    r = client.post("/search/image", files=files, data=data)
    assert r.status_code == status
    assert says in str(r.json()["detail"])


def test_malformed_multipart_is_a_4xx(client):
    r = client.post(
        "/search/image",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nunterminated',
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert r.status_code in (400, 422) and r.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_unknown_route_and_method(client):
    assert client.get("/nope").status_code == 404
    assert client.delete("/search").status_code == 405


def test_add_images_then_find_them_and_persist(client, retriever, index_dir):
    before = len(retriever.image_index)
    files = [
        ("files", ("teal.png", png((0, 128, 128)), "image/png")),
        ("files", ("pink.png", png((255, 105, 180)), "image/png")),
    ]
    r = client.post("/images", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == before + 2 and all(im["added"] for im in body["images"])
    teal = body["images"][0]["id"]
    assert teal.startswith("upload-") and teal.endswith(".png")
    # The added image is served, found by a similar image, and on disk for a restart.
    assert client.get(f"/images/{teal}").content == png((0, 128, 128))
    similar = client.post(
        "/search/image", files={"file": ("q.png", png((0, 128, 128)), "image/png")}
    )
    assert similar.json()["images"][0]["id"] == teal
    assert len(Retriever.open(index_dir).image_index) == before + 2
    # The same bytes again are not added twice.
    again = client.post("/images", files=files[:1]).json()
    assert again["images"][0]["added"] is False and again["count"] == before + 2


def test_uploads_are_named_by_their_decoded_format(client):
    """A PNG sent as "page.html" is stored and served as a PNG, never as a page."""
    r = client.post("/images", files={"files": ("page.html", png("olive"), "text/html")})
    (added,) = r.json()["images"]
    assert added["id"].endswith(".png") and added["filename"] == "page.html"
    served = client.get(added["image_url"])
    assert served.headers["content-type"] == "image/png"
    assert served.headers["x-content-type-options"] == "nosniff"


def test_an_image_too_large_to_decode_safely_is_refused(client, monkeypatch):
    from lightningdot.features import backbones

    monkeypatch.setattr(backbones, "MAX_PIXELS", 100)
    r = client.post("/search/image", files={"file": ("big.png", png("red"), "image/png")})
    assert r.status_code == 400 and "big.png" in r.json()["detail"]


def test_a_failed_add_adds_nothing(client, retriever, index_dir):
    before = len(retriever.image_index)
    files = [
        ("files", ("fine.png", png("red"), "image/png")),
        ("files", ("broken.jpg", b"\xff\xd8\xff\xe0 broken", "image/jpeg")),
    ]
    r = client.post("/images", files=files)
    assert r.status_code == 400 and "broken.jpg" in r.json()["detail"]
    assert len(retriever.image_index) == before
    assert len(Retriever.open(index_dir).image_index) == before
    assert not list((index_dir / "uploads").glob("*")) if (index_dir / "uploads").exists() else True
    too_many = [("files", (f"{i}.png", png((i, i, i)), "image/png")) for i in range(5)]
    assert client.post("/images", files=too_many).status_code == 400  # max_files = 4
    assert client.post("/images", files={"x": ("a", b"1")}).status_code == 422


def test_a_failed_save_changes_nothing_in_memory(retriever, monkeypatch):
    before = len(retriever.image_index)

    def fail(self, folder):
        raise OSError("disk full")

    monkeypatch.setattr(VectorIndex, "write", fail)
    with pytest.raises(OSError):
        retriever.add_uploads([("a.png", png("red"))])
    assert len(retriever.image_index) == before
    assert not any((retriever.folder / "uploads").glob("*"))
    with pytest.raises(DataError, match="b.png"):
        retriever.add_uploads([("b.png", b"nope")])


def test_searches_go_on_while_an_add_runs(retriever, index_dir, monkeypatch):
    """An add holds the index lock while it saves; searches must not wait for it."""
    saving, release = threading.Event(), threading.Event()
    real_write = VectorIndex.write

    def slow_write(self, folder):
        saving.set()
        release.wait(10)
        real_write(self, folder)

    monkeypatch.setattr(VectorIndex, "write", slow_write)
    with TestClient(create_app(retriever)) as c, ThreadPoolExecutor(1) as pool:
        add = pool.submit(c.post, "/images", files={"files": ("n.png", png("navy"), "image/png")})
        assert saving.wait(10)
        during = c.get("/search", params={"q": "a red picture"})
        assert during.status_code == 200 and len(during.json()["results"]) == 8  # the old index
        release.set()
        assert add.result(10).status_code == 200
        assert len(c.get("/search", params={"q": "navy", "k": 20}).json()["results"]) == 9


def test_thumbnails_and_originals(client, corpus_dir):
    original = client.get("/images/img01.png")
    assert original.status_code == 200
    assert original.content == (corpus_dir / "images" / "img01.png").read_bytes()
    thumb = client.get("/images/img01.png", params={"size": 16})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 16
    assert client.get("/images/nope.png").status_code == 404
    assert client.get("/images/img01.png", params={"size": 5000}).status_code == 422


def test_health_metrics_and_openapi(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["images"] == 8 and health["captions"] == 16
    assert health["reranker"] is True and health["limits"]["max_k"] == 100
    assert health["writes"] == "open"  # loopback, no key
    assert health["multilingual"] is False  # the tiny model reads English
    client.get("/search", params={"q": "red"})
    client.get("/nope")
    text = client.get("/metrics").text
    assert 'ldot_requests_total{method="GET",route="/search",status="200"}' in text
    assert 'ldot_requests_total{method="GET",route="unmatched",status="404"}' in text
    assert 'ldot_stage_seconds_count{route="/search",stage="encode"}' in text
    assert 'ldot_index_items{index="images"} 8.0' in text
    schema = client.get("/openapi.json").json()
    assert {"/search", "/search/image", "/images", "/images/{image_id}", "/healthz"} <= set(
        schema["paths"]
    )
    ok = schema["paths"]["/search"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"]["$ref"].endswith("/SearchResponse")
    assert "multipart/form-data" in schema["paths"]["/images"]["post"]["requestBody"]["content"]


def test_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<title>lightningdot</title>" in r.text


def test_batched_text_queries_equal_one_by_one(retriever):
    queries = [TextQuery("a red picture", 3, 0), TextQuery("blue", 5, 0), TextQuery("x", 2, 4)]
    batched = answer_texts(retriever, queries)
    for q, a in zip(queries, batched, strict=True):
        (alone,) = retriever.search_text([q.text], q.k, q.rerank)
        assert [x.id for x in a.results] == [x.id for x in alone.results]
        assert [x.score for x in a.results] == pytest.approx(
            [x.score for x in alone.results], abs=1e-6
        )


def test_micro_batcher_batches_what_waits_and_isolates_failures():
    batches = []

    def run(items):
        batches.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [s.upper() for s in items]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_batch=3)
            batcher.start()
            results = await asyncio.gather(
                *(batcher(s) for s in ["a", "b", "bad", "c", "d"]), return_exceptions=True
            )
            await batcher.stop()
            return results

    results = asyncio.run(main())
    assert results[:2] == ["A", "B"] and results[3:] == ["C", "D"]
    assert isinstance(results[2], ValueError)
    assert max(len(b) for b in batches) == 3  # queued requests ran together, capped
    assert ["bad"] in batches  # the failed batch was retried one by one


def test_micro_batcher_survives_a_fault_outside_the_model():
    def on_batch(n):
        if n == 2:
            raise ValueError("metrics broke")

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(lambda items: items, pool, max_batch=2, on_batch=on_batch)
            batcher.start()
            first = await asyncio.gather(batcher("a"), batcher("b"), return_exceptions=True)
            after = await batcher("c")  # the loop is still running
            await batcher.stop()
            return first, after

    first, after = asyncio.run(main())
    assert all(isinstance(x, ValueError) for x in first) and after == "c"


def test_cli_serve_refuses_a_folder_that_is_no_index(tmp_path):
    from typer.testing import CliRunner

    from lightningdot.cli import app

    r = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert r.exit_code == 2
    assert "not an index folder" in r.output and "Traceback" not in r.output


def test_errors_name_the_servers_folders_by_root_not_by_place(client, retriever, corpus_dir):
    """A re-rank that meets a vanished image file says which, without the server's paths."""
    # As in a folder that keeps none: re-ranking reads the files.
    retriever.index._live = dataclasses.replace(retriever.index.live, states=None)
    for f in (corpus_dir / "images").iterdir():
        f.unlink()
    with pytest.warns(RuntimeWarning, match="keeps no region states"):
        r = client.get("/search", params={"q": "red", "k": 2, "rerank": 4})
    assert r.status_code == 400 and "image not found: images/img" in r.json()["detail"], r.text
    assert str(corpus_dir) not in r.text
    hits = client.get("/search", params={"q": "red"}).json()["results"]
    assert all(not h["path"].startswith("/") for h in hits)


def test_a_query_the_model_hardly_reads_is_answered_with_warnings(client):
    plain = client.get("/search", params={"q": "a red picture", "k": 2}).json()
    assert plain["warnings"] == []
    body = client.get("/search", params={"q": "ᱚᱞ ᱪᱤᱠᱤ", "k": 2}).json()  # Ol Chiki
    assert len(body["results"]) == 2
    assert any("vocabulary" in w for w in body["warnings"])
    assert any("reads English" in w for w in body["warnings"])
