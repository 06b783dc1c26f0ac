"""The JSON the HTTP API returns: numbers keep their type, error details read as text."""

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightningdot.config import ServeConfig  # noqa: E402
from lightningdot.retrieval import Retriever  # noqa: E402
from lightningdot.serve import create_app  # noqa: E402
from lightningdot.serve.schemas import Health  # noqa: E402


@pytest.fixture
def client(index_dir):
    app = create_app(Retriever.open(index_dir), ServeConfig(max_upload_mb=0.5))
    with TestClient(app) as c:
        yield c


def test_health_limits_keep_integers_integers(client):
    limits = client.get("/healthz").json()["limits"]
    assert limits["max_k"] == 100 and isinstance(limits["max_k"], int)
    assert isinstance(limits["max_files"], int) and isinstance(limits["max_batch"], int)
    assert limits["max_upload_mb"] == 0.5


def test_health_model_keeps_a_whole_float_a_float():
    limits = Health(
        status="ok",
        model_id="m",
        images=1,
        captions=0,
        reranker=False,
        multilingual=False,
        limits={"max_k": 3, "max_upload_mb": 10.0},
        writes="open",
    ).model_dump_json()
    assert '"max_k":3,' in limits and '"max_upload_mb":10.0' in limits


@pytest.mark.parametrize("route", ["/images", "/search/image"])
def test_undecodable_upload_is_named_not_a_python_object(client, route):
    field = "files" if route == "/images" else "file"
    r = client.post(route, files={field: ("notes.txt", b"plain text", "text/plain")})
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "notes.txt" in detail and "BytesIO" not in detail and " at 0x" not in detail
