"""A job's event stream, filled by the engine thread and read by sync or asyncio code."""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from service.engine.job import ChatJob, EngineError, Event, Finished

_END = object()


class JobStream:
    """Events of one job: Delta..., then Finished, or an EngineError/PreprocessError raised.

    Created on the caller's thread: inside a running event loop it is read with `async for`,
    otherwise with a plain `for`. The engine side calls `push`, `fail` and `close`.
    """

    def __init__(self, job: ChatJob) -> None:
        self.job = job
        self.cancelled = threading.Event()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aq: asyncio.Queue = asyncio.Queue()
        except RuntimeError:
            self._loop = None
            self._q: queue.Queue = queue.Queue()
        self.done = threading.Event()

    # engine side -----------------------------------------------------------------------
    def push(self, item: object) -> None:
        if self._loop is None:
            self._q.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def finish(self, event: Finished) -> None:
        self.push(event)
        self.close()

    def fail(self, error: BaseException) -> None:
        self.push(error)
        self.close()

    def close(self) -> None:
        if not self.done.is_set():
            self.done.set()
            self.push(_END)

    # caller side -----------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to drop this job at its next step; no events follow."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[Event]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            item = await self._aq.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


__all__ = ["JobStream", "EngineError"]
