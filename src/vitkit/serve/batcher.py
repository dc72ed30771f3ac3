"""A small asyncio micro-batcher: concurrent requests share one forward pass."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Queue single items, run `fn` on up to `max_batch` of them at a time in `executor`.

    A batch takes what is waiting when the previous one finishes, then waits up to `max_wait_ms`
    for more. While the model is busy, new requests pile up and go together into the next batch,
    so batching grows with the load and an idle server adds at most `max_wait_ms` of latency.
    `fn(items) -> results` must return one result per item, in order; an exception fails every
    request of that batch.
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], executor: Executor, *, max_batch: int = 32,
                 max_wait_ms: float = 2.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.fn, self.executor = fn, executor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.requests = self.batches = self.largest_batch = 0
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def submit(self, item: T) -> R:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # a client that gave up
            if not batch:
                continue
            self.requests += len(batch)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest_batch,
                "max_batch": self.max_batch}
