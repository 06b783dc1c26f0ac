"""`ldot serve --watch DIR`: a running server's index kept in line with one of its folders.

A watchdog observer (the optional `watchdog` package) reports changes under the folder; once
they have stopped for `settle` seconds (a copy of many files makes one sync, not one per
file), a sync runs in a thread of its own (`lightningdot.index.sync`): it encodes what is new
without holding the index and commits everything at once, so searches see the index before
the sync or after it. A sync that fails or is refused (the folder unmounted, say) is logged,
and the next change tries again. Changes inside the index folder itself are not the folder's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from lightningdot.errors import DataError
from lightningdot.index.folder import IndexFolder
from lightningdot.index.sync import SyncReport, collection_of, sync_collection
from lightningdot.model.encoders import BiEncoder

SETTLE = 2.0  # seconds without a change before a sync runs


def observer_class() -> type:
    """watchdog's `Observer`.

    Raises:
        DataError: watchdog is not installed.
    """
    try:
        from watchdog.observers import Observer
    except ImportError:
        raise DataError(
            "--watch needs the watchdog package: pip install 'lightningdot[watch]'"
        ) from None
    return Observer


class FolderWatch:
    """Syncs of the index `index` with the folder `folder` (one of its roots) after each burst
    of changes there, until stopped; `log` gets one line per sync."""

    def __init__(
        self,
        index: IndexFolder,
        model: BiEncoder,
        folder: Path,
        log: Callable[[str], None] = print,
        settle: float = SETTLE,
    ) -> None:
        self.index, self.model, self.folder, self.log = index, model, Path(folder), log
        self.settle = settle
        self._changed, self._stop = threading.Event(), threading.Event()
        self._observer = None
        self._thread: threading.Thread | None = None

    def sync(self) -> SyncReport:
        """One sync, now.

        Raises:
            DataError: the sync is refused (see `collection_of`).
        """
        ours, _ = collection_of(self.index, self.folder)
        return sync_collection(self.index, self.model, ours)

    def start(self) -> None:
        """Watch the folder from now on."""
        from watchdog.events import FileSystemEventHandler

        inside = self.index.folder.resolve()
        changed = self._changed

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                paths = [event.src_path, getattr(event, "dest_path", "") or event.src_path]
                if not all(Path(p).resolve().is_relative_to(inside) for p in paths):
                    changed.set()

        self._observer = observer_class()()
        self._observer.schedule(Handler(), str(self.folder), recursive=True)
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="ldot-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while self._changed.wait() and not self._stop.is_set():
            while self._changed.is_set():  # until the folder has been quiet for `settle`
                self._changed.clear()
                if self._stop.wait(self.settle):
                    return
            try:
                self.log(f"synced {self.folder}: {self.sync().line}")
            except (DataError, OSError) as e:
                self.log(f"sync of {self.folder} failed: {e}")
