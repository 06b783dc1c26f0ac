"""Dynamic batching: requests that arrive while the model is busy are answered as one batch.

A text query costs about the same to encode alone as beside a few dozen others, so under load
the service answers many queries per forward pass instead of queueing them one by one; when
it is idle a query runs at once, alone. Work runs on one dedicated thread, so the model's own
intra-op threads are not oversubscribed by a thread per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """`await batcher(item)` -> `run([..., item, ...])[position]`, batching what waits.

    `run` maps a list of items to a list of results of the same length. When a batch fails,
    its items are retried one by one, so one bad item cannot fail the queries beside it.
    Start it inside the event loop that will call it (`start`), and `stop` it there.
    """

    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        executor: ThreadPoolExecutor,
        max_batch: int = 32,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._run, self._executor, self.max_batch = run, executor, max_batch
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        """Stop the loop; requests still waiting get an error rather than no answer."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            _settle(fut, error=RuntimeError("the service is shutting down"))

    async def __call__(self, item: T) -> R:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called in this event loop")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
            try:
                await self._answer(batch)
            except asyncio.CancelledError:
                for _, fut in batch:
                    _settle(fut, error=RuntimeError("the service is shutting down"))
                raise
            except Exception as e:  # a fault here must fail this batch, not stop the loop
                for _, fut in batch:
                    _settle(fut, error=e)

    async def _answer(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        if not batch:
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._executor, self._run, [item for item, _ in batch]
            )
        except Exception as e:
            if len(batch) == 1:
                _settle(batch[0][1], error=e)
            else:
                for item, fut in batch:
                    await self._run_alone(item, fut)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            _settle(fut, result)

    async def _run_alone(self, item: T, fut: asyncio.Future[R]) -> None:
        loop = asyncio.get_running_loop()
        try:
            (result,) = await loop.run_in_executor(self._executor, self._run, [item])
        except Exception as e:
            _settle(fut, error=e)
        else:
            _settle(fut, result)


def _settle(fut: asyncio.Future, result: object = None, error: Exception | None = None) -> None:
    if fut.done():  # the client went away and its request was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
