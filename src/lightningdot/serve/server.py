"""`ldot serve`: open an index folder with its model and re-ranker, and run the app under
uvicorn until stopped."""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import uvicorn

from lightningdot.config import RuntimeConfig, ServeConfig
from lightningdot.errors import DataError
from lightningdot.retrieval import Retriever, slow_rerank_warning
from lightningdot.serve.app import create_app
from lightningdot.serve.security import write_policy
from lightningdot.serve.watch import FolderWatch, observer_class


def serve_index(
    index_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str | None = None,
    reranker: str = "auto",
    cfg: ServeConfig | None = None,
    threads: int = 0,
    access_log: bool = True,
    log: Callable[[str], None] = print,
    api_key: str | None = None,
    runtime: str = "auto",
    watch: Path | None = None,
) -> None:
    """Serve `index_dir` at http://host:port/ (see `lightningdot.retrieval.open_reranker` for
    `reranker`); `threads`: the model's arithmetic threads (0: torch's default); `api_key`:
    what the routes that change the index require (see `write_policy`); `runtime`: what runs
    the encoders (`lightningdot.runtime`); `watch`: a folder of the index's to keep it in line
    with (synced once before serving, then after each burst of changes:
    `lightningdot.serve.watch`)."""
    writes = write_policy(host, api_key)
    check_can_listen(host, port)  # before the model loads, and in our words, not uvicorn's
    if watch is not None:
        observer_class()  # watchdog is there, before the model loads
    if threads:
        torch.set_num_threads(threads)
    run_on = RuntimeConfig(runtime, threads)
    retriever = Retriever.open(index_dir, model, reranker=reranker, runtime=run_on)
    _ = retriever.regions.backbone  # loaded (and exported) now, not in the first image request
    if reranker == "auto" and retriever.reranker is None:
        log("the shipped re-ranker does not fit this model: serving without one")
    if retriever.reranker and retriever.index.states is None and retriever.regions.store is None:
        log(f"warning: {slow_rerank_warning(index_dir)}")
    log(
        f"serving {retriever.image_index.count} images from {index_dir} on http://{host}:{port}/"
        + ("" if retriever.reranker else " (no re-ranker)")
    )
    log(writes.message)
    if watch is not None:
        watcher = FolderWatch(retriever.index, retriever.model, watch, log)
        log(f"synced {watch}: {watcher.sync().line}; watching it for changes")
        watcher.start()
    app = create_app(retriever, cfg, writes)
    # The loaded model, tokenizer and index are some 400,000 Python objects: a full collection
    # walks them all (about 240 ms here), stalling every query in flight. They live as long as
    # the process, so they are moved out of the collector's sight (as Instagram's servers do).
    gc.collect()
    gc.freeze()
    level = "info" if access_log else "warning"  # uvicorn logs requests at info
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level=level)


def check_can_listen(host: str, port: int) -> None:
    """Refuse an address this process cannot listen on (in use, not this machine's).

    Raises:
        DataError: naming the address and why.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise DataError(f"cannot listen on {host}: {e.strerror}") from e
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise DataError(f"cannot listen on {host}:{port}: {e.strerror}") from e
