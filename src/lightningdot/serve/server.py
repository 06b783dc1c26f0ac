"""`ldot serve`: open an index folder with its model and re-ranker, and run the app under
uvicorn until stopped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import uvicorn

from lightningdot.config import ServeConfig
from lightningdot.retrieval import Retriever
from lightningdot.serve.app import create_app
from lightningdot.serve.security import write_policy


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
) -> None:
    """Serve `index_dir` at http://host:port/ (see `lightningdot.retrieval.open_reranker` for
    `reranker`); `threads`: the model's arithmetic threads (0: torch's default); `api_key`:
    what the routes that change the index require (see `write_policy`)."""
    writes = write_policy(host, api_key)
    if threads:
        torch.set_num_threads(threads)
    retriever = Retriever.open(index_dir, model, reranker=reranker)
    if reranker == "auto" and retriever.reranker is None:
        log("the shipped re-ranker does not fit this model: serving without one")
    log(
        f"serving {len(retriever.image_index)} images from {index_dir} on http://{host}:{port}/"
        + ("" if retriever.reranker else " (no re-ranker)")
    )
    log(writes.message)
    app = create_app(retriever, cfg, writes)
    level = "info" if access_log else "warning"  # uvicorn logs requests at info
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level=level)
