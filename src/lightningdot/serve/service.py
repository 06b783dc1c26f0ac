"""The service behind the routes: one `Retriever`, the thread that runs its model, the thread
that runs adds, and the batching of text queries.

One thread answers queries: text queries that arrive together are encoded as one batch
(`MicroBatcher`), and image queries run there too. Adds encode their images on a second
thread, so a long add never holds queries up (it shares the CPU with them), and swap the grown
index in once it is saved (`IndexFolder.append`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lightningdot.config import ServeConfig
from lightningdot.retrieval import FIRST_PAGE, Answer, Page, Retriever
from lightningdot.serve.batching import MicroBatcher
from lightningdot.serve.metrics import Metrics

T = TypeVar("T")


@dataclass
class TextQuery:
    text: str
    k: int
    rerank: int
    explain: bool = False
    page: Page = FIRST_PAGE  # its filter as JSON text, so that queries group by it
    received: float = field(default_factory=time.perf_counter)  # for its time in the queue

    def kind(self) -> tuple:
        """What queries must share to be answered by one search call."""
        return self.rerank, self.explain, self.page


def answer_texts(retriever: Retriever, queries: list[TextQuery]) -> list[Answer]:
    """Answer a batch of text queries with one encode per kind (re-rank depth, explained or
    not, page) present in it."""
    out: list[Answer | None] = [None] * len(queries)
    for kind in dict.fromkeys(q.kind() for q in queries):
        idx = [i for i, q in enumerate(queries) if q.kind() == kind]
        k = max(queries[i].k for i in idx)
        texts, received = [queries[i].text for i in idx], [queries[i].received for i in idx]
        depth, explain, page = kind
        answers = retriever.search_text(texts, k, depth, received, explain, page)
        for i, a in zip(idx, answers, strict=True):
            a.results = a.results[: queries[i].k]
            out[i] = a
    return out  # type: ignore[return-value]


class Service:
    """What the routes share. `start` and `stop` run in the app's lifespan (its event loop)."""

    def __init__(self, retriever: Retriever, cfg: ServeConfig, writes: str = "open") -> None:
        self.retriever, self.cfg = retriever, cfg
        self.writes = writes  # `WritePolicy.mode`, for /healthz
        self.metrics = Metrics(retriever)
        self._model: ThreadPoolExecutor | None = None
        self._adds: ThreadPoolExecutor | None = None
        self._batcher: MicroBatcher[TextQuery, Answer] | None = None

    def start(self) -> None:
        self._model = ThreadPoolExecutor(1, thread_name_prefix="ldot-model")
        self._adds = ThreadPoolExecutor(1, thread_name_prefix="ldot-add")
        self._batcher = MicroBatcher(
            functools.partial(answer_texts, self.retriever),
            self._model,
            self.cfg.max_batch,
            on_batch=self.metrics.batch.observe,
        )
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()
        for pool in (self._model, self._adds):
            pool.shutdown(wait=True, cancel_futures=True)

    async def search_text(self, query: TextQuery) -> Answer:
        """Answered in a batch with the text queries waiting beside it."""
        return await self._batcher(query)

    async def on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._model, fn, *args)

    async def on_add_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._adds, fn, *args)
