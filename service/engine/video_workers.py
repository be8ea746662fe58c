"""Video decoding in child processes: a wall-clock timeout, a data-memory limit, and a
fresh process in place of one that hung or crashed. FFmpeg runs native code on hostile
input; a hang there holds the GIL and a crash takes the process, so it must not be ours."""
from __future__ import annotations

import importlib
import logging
import multiprocessing
import queue
import resource
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from preprocess import frames
from preprocess.errors import MediaError
from service.engine.job import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)


def _child(conn: Connection, memory_mb: int, decoder_module: str) -> None:
    """The worker loop: say "ready" once the imports are done, then decode requests until the
    pipe closes. The memory limit is on data (heap and anonymous mappings), not address
    space: torch, which resizes the frames, maps 3.4 GB of libraries that are shared and
    never written."""
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import torch

    torch.set_num_threads(1)  # the decoder's threads already cover the cores: no torch pool
    importlib.import_module(decoder_module)
    conn.send(("ready", None))
    while True:
        try:
            fn, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", fn(**kwargs)))
        except MediaError as exc:
            conn.send(("error", exc.message))
        except MemoryError:
            conn.send(("error", f"{kwargs.get('label', 'video')}: decoding needed more than the "
                                f"{memory_mb} MB memory limit"))
        except Exception as exc:  # anything else the decoder raises is still the file's fault
            conn.send(("error", f"{kwargs.get('label', 'video')}: cannot decode the video "
                                f"({type(exc).__name__}: {str(exc)[:100]})"))


def _left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (at least a millisecond), or None without one."""
    return None if deadline is None else max(0.001, deadline - time.monotonic())


class _Worker:
    def __init__(self, ctx, memory_mb: int, decoder_module: str) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, memory_mb, decoder_module),
                                daemon=True, name="video-decoder")
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self, wait: float | None) -> bool:
        """Whether its imports are done (it says so once); raises EOFError when it died.
        Without the fork server's preload (another pool started the fork server first, and
        a preload only applies to a server not yet running) each worker imports torch itself:
        a second or more, never counted against a decode's time limit."""
        if not self.ready and self.conn.poll(wait):
            self.conn.recv()
            self.ready = True
        return self.ready

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class VideoDecoderPool:
    """`decode(source, num_frames, ...)` with the signature of preprocess.frames.decode_video,
    run in one of `workers` child processes."""

    start_timeout_s = 120.0  # a worker's imports, on a loaded machine

    def __init__(self, workers: int = 2, timeout_s: float = 60.0, memory_mb: int = 4096,
                 decoder: Callable = frames.decode_video) -> None:
        self.timeout_s, self.memory_mb, self.decoder = timeout_s, memory_mb, decoder
        self._ctx = multiprocessing.get_context("forkserver")
        # the decoder's imports (PyAV, and torch for the resize) once, in the fork server,
        # not in every worker it starts
        self._ctx.set_forkserver_preload([decoder.__module__])
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self.replaced = 0
        self._all: list[_Worker] = []
        for _ in range(workers):
            self._idle.put(self._spawn())

    def _spawn(self) -> _Worker:
        worker = _Worker(self._ctx, self.memory_mb, frames.decode_video.__module__)
        with self._lock:
            self._all.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        with self._lock:
            self._all.remove(worker)
            self.replaced += 1
        return self._spawn()

    def decode(self, source: str | bytes, num_frames: int, *, deadline: float | None = None,
               **kwargs) -> frames.DecodedVideo:
        """Decode in a worker; `deadline` (time.monotonic()) also bounds the wait for a free
        worker and the decode itself: past it the worker is replaced, the job is over."""
        label = kwargs.get("label", "video")
        try:
            worker = self._idle.get(timeout=_left(deadline))
        except queue.Empty:
            raise DeadlineExceeded(f"{label}: the deadline passed while waiting for a video "
                                   f"decoder") from None
        try:
            try:
                started = worker.wait_ready(min(self.start_timeout_s,
                                                _left(deadline) or self.start_timeout_s))
            except (EOFError, OSError):
                started = False
            if not started:
                code = worker.proc.exitcode
                worker = self._replace(worker)
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"{label}: the deadline passed while a video "
                                           f"decoder started") from None
                log.error("a video decoder process failed to start (exit %s)", code)
                raise Unavailable(f"{label}: the video decoder could not start; retry") from None
            worker.conn.send((self.decoder, {"source": source, "num_frames": num_frames,
                                             **kwargs}))
            limit = min(self.timeout_s, _left(deadline) or self.timeout_s)
            if not worker.conn.poll(limit):
                worker = self._replace(worker)
                if limit < self.timeout_s:
                    raise DeadlineExceeded(f"{label}: the deadline passed while decoding")
                raise MediaError(f"{label}: decoding took longer than {self.timeout_s:g} s; the "
                                 f"file may be damaged or far longer than it says")
            try:
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                worker.proc.join(timeout=2)
                code = worker.proc.exitcode
                worker = self._replace(worker)
                raise MediaError(f"{label}: the video decoder crashed on this file (exit "
                                 f"{code}); the file is damaged or not a video") from None
        except (BrokenPipeError, ConnectionResetError):
            worker = self._replace(worker)
            raise MediaError(f"{label}: the video decoder died; try again") from None
        finally:
            self._idle.put(worker)
        if kind == "ok":
            return payload
        raise MediaError(payload)

    def close(self) -> None:
        with self._lock:
            workers = list(self._all)
        for worker in workers:
            worker.kill()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._all]
