"""`ldot serve --watch DIR`: a running server's index follows its folder, a sync after each
burst of changes; without watchdog, a clear refusal."""

from __future__ import annotations

import sys
import time

import pytest

from lightningdot.errors import DataError
from lightningdot.index.build import index_images
from lightningdot.index.folder import IndexFolder
from lightningdot.model.checkpoint import load_model
from lightningdot.serve import server
from lightningdot.serve.watch import FolderWatch, observer_class
from tests.helpers import noise_photo as photo

pytest.importorskip("watchdog", reason="watchdog is not installed")


@pytest.fixture
def indexed(tmp_path, model_dir):
    folder = tmp_path / "photos"
    for n in range(4):
        photo(folder / f"p{n}.png", n)
    index_images(tmp_path / "ix", folder, model=str(model_dir))
    return tmp_path / "ix", folder


def wait_for(condition, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "the watch did not sync in time"
        time.sleep(0.05)


def test_a_watched_folder_is_synced_after_each_burst_of_changes(indexed, model_dir):
    out, folder = indexed
    index, lines = IndexFolder.open(out, load_model(model_dir)), []
    watch = FolderWatch(index, load_model(model_dir), folder, lines.append, settle=1.0)
    watch.start()
    try:
        for n in range(3):  # one burst: one sync
            photo(folder / f"new{n}.png", 10 + n)
        wait_for(lambda: index.image_index.count == 7)
        assert lines == [f"synced {folder}: +3 added, 0 changed, 0 removed, 0 moved, 0 unreadable"]
        (folder / "p0.png").unlink()
        wait_for(lambda: index.image_index.count == 6)
        for f in folder.glob("*.png"):  # emptied (a mount gone): refused, logged, kept
            f.unlink()
        wait_for(lambda: len(lines) == 3)
        assert "failed" in lines[-1] and "nothing synced" in lines[-1]
        assert index.image_index.count == 6
    finally:
        watch.stop()
    assert IndexFolder.load(out).image_index.count == 6


def test_serve_syncs_before_serving_and_refuses_a_folder_not_its_own(
    indexed, tmp_path, monkeypatch
):
    out, folder = indexed
    started = []
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr(FolderWatch, "start", lambda self: started.append(self.folder))
    photo(folder / "new.png", 20)
    lines = []
    server.serve_index(out, log=lines.append, reranker="none", watch=folder)
    assert any(line.startswith(f"synced {folder}: +1 added") for line in lines)
    assert started == [folder] and IndexFolder.load(out).image_index.count == 5
    other = tmp_path / "other"
    photo(other / "o.png", 30)
    with pytest.raises(DataError, match="--add"):
        server.serve_index(out, log=lines.append, reranker="none", watch=other)


def test_without_watchdog_the_refusal_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "watchdog.observers", None)
    with pytest.raises(DataError, match=r"pip install 'lightningdot\[watch\]'"):
        observer_class()
