"""A small asyncio micro-batcher with a bounded queue: concurrent requests share one forward pass."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The queue holds as many requests as it may (or is shutting down): the server answers 503."""


class Capacity:
    """A bound on the requests waiting at once, from admission until their batch starts, shared by batchers.
    The server takes a place (`enter`) before it reads an upload, so the bound covers uploads being
    received and decoded: a burst's memory stays proportional to `limit`. Event loop only (no locking)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the queue limit must be >= 1, got {limit}")
        self.limit, self.depth, self.peak = limit, 0, 0

    def enter(self) -> Ticket:
        """A place in the queue; QueueFull when all `limit` places are taken."""
        if self.depth >= self.limit:
            raise QueueFull(f"the queue is full ({self.limit} requests waiting)")
        self.depth += 1
        self.peak = max(self.peak, self.depth)
        return Ticket(self)


class Ticket:
    """One place in a `Capacity`; `leave()` gives it back, once however often it is called."""

    __slots__ = ("_capacity",)

    def __init__(self, capacity: Capacity) -> None:
        self._capacity: Capacity | None = capacity

    def leave(self) -> None:
        if self._capacity is not None:
            self._capacity.depth -= 1
            self._capacity = None


class MicroBatcher(Generic[T, R]):
    """Queue single items, run `fn` on up to `max_batch` of them at a time in `executor`.

    A batch takes what is waiting when the previous one finishes, then waits up to `max_wait_ms` for
    more: batching grows with the load, and an idle server adds at most `max_wait_ms` of latency.
    `fn(items)` returns one result per item, in order (an exception fails the batch). `capacity` bounds
    the queue (a number, a shared `Capacity`, None: unbounded; full: QueueFull).
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], executor: Executor, *, max_batch: int = 32,
                 max_wait_ms: float = 2.0, capacity: int | Capacity | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.fn, self.executor = fn, executor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.capacity = Capacity(capacity) if isinstance(capacity, int) else capacity
        self.requests = self.batches = self.largest_batch = self.dropped = 0
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R], Ticket | None]] | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._queue, self._closing = asyncio.Queue(), False
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Refuse new items, finish the queued ones for at most `drain_timeout` s (the rest fail with
        QueueFull), then end the loop."""
        self._closing = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), drain_timeout)
        except asyncio.TimeoutError:
            pass
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        while not self._queue.empty():
            _, future, ticket = self._queue.get_nowait()
            _fail([(None, future, ticket)], QueueFull("the server stopped before this request ran"))

    async def submit(self, item: T, ticket: Ticket | None = None) -> R:
        """Queue `item` and wait for its result. `ticket`: a place taken beforehand from `capacity` (before
        reading the upload), given back when the item leaves the queue; without one a place is taken
        here (QueueFull when there is none)."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self._closing:
            if ticket is not None:
                ticket.leave()
            raise QueueFull("the server is shutting down")
        if ticket is None and self.capacity is not None:
            ticket = self.capacity.enter()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # A cancelled request (a client's timeout) keeps its place until the loop pops it, so that
        # the items physically queued never exceed the bound, even when the model is stuck.
        self._queue.put_nowait((item, future, ticket))
        return await future

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            for _, _, ticket in batch:
                if ticket is not None:
                    ticket.leave()
            live = [entry for entry in batch if not entry[1].done()]  # drop requests whose client gave up
            self.dropped += len(batch) - len(live)
            try:
                if live:
                    await self._run(live)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _collect(self) -> list[tuple[T, asyncio.Future[R], Ticket | None]]:
        """What is waiting (at least one item), then more for up to `max_wait`, up to `max_batch`."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self, batch: list[tuple[T, asyncio.Future[R], Ticket | None]]) -> None:
        self.requests += len(batch)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.fn, [e[0] for e in batch])
        except asyncio.CancelledError:  # stop() while this batch ran: its requests get no answer
            _fail(batch, QueueFull("the server stopped while this request ran"))
            raise
        except Exception as e:  # noqa: BLE001 - handed to each waiting request
            _fail(batch, e)
            return
        for (_, future, _), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    def stats(self) -> dict[str, int]:
        """Items run, batches run, the largest batch, `max_batch`, and items dropped unrun (their client gave up)."""
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest_batch,
                "max_batch": self.max_batch, "dropped": self.dropped}


def _fail(batch: list[tuple[object, asyncio.Future, Ticket | None]], error: BaseException) -> None:
    for _, future, ticket in batch:
        if ticket is not None:
            ticket.leave()
        if not future.done():
            future.set_exception(error)
