"""A job's event stream, filled by the engine thread and read by sync or asyncio code."""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from service.engine.job import ChatJob, Delta, Event, Finished, Stage

END = object()  # the last item of every stream
Sink = Callable[[list[tuple[object, object]]], None]


class JobStream:
    """Events of one job: Delta..., then Finished, or an EngineError/PreprocessError raised.

    Created on the caller's thread: inside a running event loop it is read with `async for`,
    otherwise with a plain `for`. The engine side calls `push`, `fail` and `close`. A stream
    made with a `sink` is read by nobody here: its events go to `sink([(key, item), ...])`
    (the engine process forwards them to the server process this way).
    """

    def __init__(self, job: ChatJob, sink: Sink | None = None, key: object = None) -> None:
        self.job = job
        self.sink, self.key = sink, key
        self.cancelled = threading.Event()
        # the job's timed steps, filled by the media threads and the engine thread
        self.stages: list[Stage] | None = [] if job.traced else None
        self._loop: asyncio.AbstractEventLoop | None = None
        if sink is not None:
            self.done = threading.Event()
            return
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aq: asyncio.Queue = asyncio.Queue()
        except RuntimeError:
            self._loop = None
            self._q: queue.Queue = queue.Queue()
        self.done = threading.Event()

    # engine side -----------------------------------------------------------------------
    def push(self, item: object, outbox: Outbox | None = None) -> None:
        if outbox is not None:
            outbox.add(self, item)
            return
        if self.sink is not None:
            self.sink([(self.key, item)])
            return
        if self._loop is None:
            self._q.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def finish(self, event: Finished, outbox: Outbox | None = None) -> None:
        self.push(event, outbox)
        self.close(outbox)

    def fail(self, error: BaseException, outbox: Outbox | None = None) -> None:
        self.push(error, outbox)
        self.close(outbox)

    def close(self, outbox: Outbox | None = None) -> None:
        if not self.done.is_set():
            self.done.set()
            self.push(END, outbox)

    # caller side -----------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to drop this job at its next step; no events follow."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[Event]:
        while True:
            item = self._q.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[Event]:
        """Deltas that queued up while the reader was busy come out joined as one, so a slow
        reader gets fewer, larger messages instead of falling further behind."""
        while True:
            items = [await self._aq.get()]
            while not self._aq.empty():
                items.append(self._aq.get_nowait())
            for item in _join_deltas(items):
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item


def _join_deltas(items: list[object]) -> list[object]:
    out: list[object] = []
    for item in items:
        if isinstance(item, Delta) and out and isinstance(out[-1], Delta):
            out[-1] = Delta(out[-1].text + item.text, out[-1].logprobs + item.logprobs)
        else:
            out.append(item)
    return out


class Outbox:
    """Events produced during one engine step, delivered with one wake-up per event loop."""

    def __init__(self) -> None:
        self._items: list[tuple[JobStream, object]] = []

    def add(self, stream: JobStream, item: object) -> None:
        self._items.append((stream, item))

    def flush(self) -> None:
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[JobStream, object]]] = {}
        by_sink: dict[Sink, list[tuple[object, object]]] = {}
        for stream, item in items:
            if stream.sink is not None:
                by_sink.setdefault(stream.sink, []).append((stream.key, item))
            elif stream._loop is None:
                stream._q.put(item)
            else:
                by_loop.setdefault(stream._loop, []).append((stream, item))
        for sink, batch in by_sink.items():
            sink(batch)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop has closed: nobody is listening
                pass


def _deliver(batch: list[tuple[JobStream, object]]) -> None:
    for stream, item in batch:
        stream._aq.put_nowait(item)


__all__ = ["END", "JobStream", "Outbox", "Sink"]
