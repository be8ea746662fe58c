"""The engine in a process of its own, so the model and the RPC event loop never share a GIL.

In one process the engine thread and the asyncio loop that answers RPCs take turns holding
the GIL: every small torch call hands it over and waits to get it back, and the serving
process tops out near one core's worth of Python however many cores the machine has. So
`python -m service` starts the model in a child process (`EngineProcess`): the server
process keeps gRPC, protobuf and the event loop; the child keeps the media stage, the
vision tower, the batch and detokenisation. Between them is one pipe:

    server -> engine   ("submit", key, ChatJob) ("cancel", request_id) ("stats",) ("drain", s)
    engine -> server   ("ready", EngineInfo) or ("error", message) once at start-up, then
                       ("events", [(key, item), ...]) once per engine step, ("stats", dict),
                       ("wedged",), ("drained",)

An event item is the delta's text (str; a Delta when it carries logprobs), a Trace, a
Finished, an error, or None for the end of the stream. Keys are the server's own numbers:
request ids come from clients and may repeat.
The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C or a process-group kill reaches
it too) and follows the server: drain when told, exit when the pipe closes.

The child is supervised. If it dies (a native crash, the kernel's OOM killer) or reports a
model step stuck past its limit (it is then killed), the calls it held get UNAVAILABLE, the
server reports NOT_SERVING while a new child loads the model, then serves again. Only a
crash loop ends the server (exit 3): more than `engine_restarts` deaths within
`engine_restart_window_s`. A request that was running at two deaths is refused from then on
(INVALID_ARGUMENT), so one poisonous request cannot keep taking the replica down.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

from service import logs, tenants
from service.engine.job import (
    Capacity,
    ChatJob,
    Delta,
    EngineError,
    Finished,
    InvalidRequest,
    ModelLoadError,
    Unavailable,
    check_admission,
)
from service.engine.stream import END, JobStream, Outbox
from service.runtime import limit_malloc_arenas
from service.settings import Settings
from service.tenants import engine_shares

log = logging.getLogger(__name__)
_START_TIMEOUT_S = 900.0  # loading a 9B checkpoint from a slow disk


def _shares(s: Settings) -> tuple[tuple[str, float, int], ...]:
    """The tenants' weights and queues, as the engine and its capacity take them."""
    return engine_shares(tenants.from_settings(s.auth_token, bool(s.tls_client_ca)))


def build_engine(s: Settings):
    """The native engine over the model `s.model`, with the settings' limits (in this process)."""
    from preprocess.frames import VideoPolicy
    from preprocess.media import ImagePolicy
    from preprocess.refs import RefPolicy
    from service.engine.loader import load_model, resolve_model
    from service.engine.prepare import MediaSettings
    from service.engine.scheduler import EngineSettings, NativeEngine

    folder = resolve_model(s.model, Path(s.cache_dir) if s.cache_dir else None)
    loaded = load_model(folder, s.device, s.dtype)
    media = MediaSettings(
        image=ImagePolicy(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels),
        # the decoder's own guard; the per-request limit is max_video_frames below
        video=VideoPolicy(max_bytes=s.max_video_bytes, max_frames=max(s.max_video_frames, 512),
                          max_duration_s=s.max_video_seconds, timeout_s=s.video_timeout_s,
                          hwaccel=str(loaded.device) if s.video_nvdec
                          and loaded.device.type == "cuda" else ""),
        refs=RefPolicy(media_roots=tuple(Path(r) for r in s.media_roots),
                       max_file_bytes=s.max_video_bytes, allow_urls=s.allow_urls),
        prompt_style=s.prompt_style, max_video_frames=s.max_video_frames,
        default_video_frames=s.default_video_frames, device_decode=s.device_decode)
    return NativeEngine(loaded, EngineSettings(
        max_running=s.max_running, max_queue=s.max_queue, max_batch_tokens=s.max_batch_tokens,
        token_budget=s.token_budget, chunk_above=s.chunk_above,
        max_itl_slowdown=s.max_itl_slowdown, kv_cache_mb=s.kv_cache_mb,
        kv_block_size=s.kv_block_size, prefix_cache=s.prefix_cache, attention=s.attention,
        compile_decode=s.compile_decode,
        preprocess_workers=s.preprocess_workers, step_timeout_s=s.step_timeout_s,
        video_workers=s.video_workers, video_memory_mb=s.video_memory_mb, media=media,
        tenants=_shares(s)),
        context_length=s.context_length or None)


class EngineProcess:
    """The Engine interface (submit, cancel, info, stats, drain, wedged) over a child process."""

    def __init__(self, settings: Settings, start_timeout_s: float = _START_TIMEOUT_S) -> None:
        self._settings, self._start_timeout_s = settings, start_timeout_s
        self.capacity = Capacity(settings.max_running, settings.max_queue, _shares(settings))
        self._lock = threading.Lock()
        self._streams: dict[int, JobStream] = {}
        self._keys = itertools.count()
        self._accepting = True
        self._drained = False
        self.wedged = False  # a crash loop, or a child that cannot load the model again
        self.restarting = False  # a new child is loading the model
        self.restarts = 0
        self._deaths: list[float] = []
        self._suspects: OrderedDict[str, int] = OrderedDict()  # content -> deaths it saw
        self._stats_lock = threading.Lock()
        self._stats: queue.SimpleQueue = queue.SimpleQueue()
        self._last_stats: dict[str, int] = {}
        self._launch()

    def _launch(self) -> None:
        """Start a child and wait until it has loaded the model; raises ModelLoadError."""
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_child_main, args=(self._settings, child), name="eagle-engine")
        proc.start()
        child.close()
        try:
            if not conn.poll(self._start_timeout_s):
                proc.kill()
                raise ModelLoadError(f"the engine process did not load the model within "
                                     f"{self._start_timeout_s:g} s")
            kind, payload = conn.recv()
        except (EOFError, OSError):
            proc.join(5)
            raise ModelLoadError(f"the engine process exited while loading the model (exit "
                                 f"code {proc.exitcode})") from None
        if kind != "ready":
            proc.join(10)
            raise ModelLoadError(payload)
        self._info = payload
        # one writer thread: a large request is pickled and written off the event loop
        out: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self.proc, self._conn, self._out = proc, conn, out
        self._writer = threading.Thread(target=self._write, args=(conn, out),
                                        name="engine-writer", daemon=True)
        self._reader = threading.Thread(target=self._read, args=(proc, conn),
                                        name="engine-events", daemon=True)
        self._writer.start()
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    # the interface ------------------------------------------------------------------------
    def submit(self, job: ChatJob) -> JobStream:
        if self._suspects and self._suspects.get(content_key(job), 0) >= 2:
            raise InvalidRequest("this request was running both times the model process "
                                 "crashed; it is refused so it cannot take the replica down "
                                 "again")
        with self._lock:
            if self.restarting and not self.wedged:
                raise Unavailable("the model process is restarting after a crash; retry on "
                                  "another replica")
            check_admission(self.wedged, self._accepting)
            self.capacity.take(job.tenant)
            key = next(self._keys)
            stream = self._streams[key] = JobStream(job)
            out = self._out
        out.put(("submit", key, job))
        return stream

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            found = [s for s in self._streams.values() if s.job.request_id == request_id]
            out = self._out
        for stream in found:
            stream.cancel()
        if found:
            out.put(("cancel", request_id))
        return bool(found)

    def info(self):
        return self._info

    def stats(self) -> dict[str, int]:
        """The engine's counts, asked of the child (the last answer if it is slow to reply)."""
        with self._stats_lock:
            if self.proc.is_alive() and not self._drained:
                while not self._stats.empty():  # a late answer to an earlier, timed-out ask
                    self._stats.get_nowait()
                self._out.put(("stats",))
                try:
                    self._last_stats = self._stats.get(timeout=2.0)
                except queue.Empty:
                    pass
            with self._lock:
                in_flight = len(self._streams)
            return {**self._last_stats, "in_flight": in_flight,
                    "engine_restarts": self.restarts}

    def drain(self, grace: float) -> None:
        """Refuse new jobs; the child lets running ones finish for up to `grace` s and exits."""
        with self._lock:
            self._accepting = False
        while self.restarting:  # a child being started is drained once it is up
            time.sleep(0.05)
        if self.proc.is_alive():
            self._out.put(("drain", grace))
            self.proc.join(grace + 15)
        if self.proc.is_alive():
            log.error("the engine process did not exit after draining: killing it")
            self.proc.kill()
            self.proc.join(5)
        self._reader.join(5)
        self._out.put(None)
        self._fail_all(Unavailable("the server shut down before this request finished"))


    # the pipe -----------------------------------------------------------------------------
    def _write(self, conn, out: queue.SimpleQueue) -> None:
        while (msg := out.get()) is not None:
            try:
                conn.send(msg)
            except (OSError, ValueError):  # the child is gone: the reader reports it
                return

    def _read(self, proc, conn) -> None:
        outbox = Outbox()
        stuck = False
        try:
            while True:
                msg = conn.recv()
                kind = msg[0]
                if kind == "events":
                    self._deliver(msg[1], outbox)
                elif kind == "stats":
                    self._stats.put(msg[1])
                elif kind == "wedged":  # a model step stuck past its limit: start afresh
                    log.error("a model step is stuck past its limit: killing the engine process")
                    stuck = True
                    proc.kill()
                elif kind == "drained":
                    self._drained = True
                    return
        except (EOFError, OSError):
            pass
        # The pipe closed without "drained": the engine process died (a native crash, the
        # kernel's OOM killer, or killed above). What it held is lost; a new one takes over.
        proc.join(1)
        code = proc.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if stuck:
            how = "killed: a model step was stuck past --step-timeout-s"
        log.error("the engine process exited unexpectedly (%s)", how)
        self._out.put(None)  # ends this child's writer
        self._after_death(how)

    def _after_death(self, how: str) -> None:
        """Fail what the dead child held, note its requests, and start a new child unless
        this is a crash loop or the server is shutting down."""
        now = time.monotonic()
        window = self._settings.engine_restart_window_s
        with self._lock:
            held = [s.job for s in self._streams.values()]
            self._deaths = [t for t in self._deaths if now - t < window] + [now]
            loop = len(self._deaths) > self._settings.engine_restarts
            self.restarting = self._accepting and not loop
        for key in {content_key(job) for job in held}:
            self._suspects[key] = self._suspects.pop(key, 0) + 1
            while len(self._suspects) > 1024:
                self._suspects.popitem(last=False)
        self._fail_all(Unavailable(f"the model process exited unexpectedly ({how}); it is "
                                   f"restarting, retry on another replica"))
        if loop:
            log.error("the engine process died %d times within %g s: a crash loop; this "
                      "replica stops", len(self._deaths), window)
            self.wedged = True
            return
        if not self.restarting:
            return
        try:
            self._launch()
            self.restarts += 1
            log.warning("the engine process was restarted (%d so far)", self.restarts)
        except ModelLoadError as exc:
            log.error("the engine process could not be restarted: %s", exc)
            self.wedged = True
        finally:
            self.restarting = False

    def _deliver(self, events: list[tuple[int, object]], outbox: Outbox) -> None:
        for key, item in events:
            stream = self._streams.get(key)
            if stream is None:
                continue
            if item is None:
                with self._lock:
                    self._forget(key)
                stream.close(outbox)
            elif isinstance(item, (Finished, BaseException)):
                # the final event: the job stops counting in flight before its caller sees
                # it, as in the engine itself (else a caller's next submit, made as soon as
                # this one ended, could be refused as over capacity by a job already over)
                with self._lock:
                    self._forget(key)
                stream.push(item, outbox)
                stream.close(outbox)
            elif isinstance(item, str):
                stream.push(Delta(item), outbox)
            else:
                stream.push(item, outbox)
        outbox.flush()

    def _forget(self, key: int) -> None:
        """A job is over: it leaves the count of its tenant's jobs in flight (lock held)."""
        stream = self._streams.pop(key, None)
        if stream is not None:
            self.capacity.give(stream.job.tenant)

    def _fail_all(self, error: EngineError) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            self.capacity.clear()
        for stream in streams:
            stream.fail(error)


def content_key(job: ChatJob) -> str:
    """What identifies a request's content, whoever sends it and whenever: its messages,
    sampling and vision settings (not its id or deadline)."""
    data = pickle.dumps((job.messages, job.sampling, job.vision), protocol=5)
    return hashlib.sha256(data).hexdigest()


# the child ----------------------------------------------------------------------------------
class _Forwarder:
    """The child's side of the pipe: one lock, events encoded small (a delta is its text)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        with self.lock:
            self.conn.send(msg)

    def events(self, batch: list[tuple[object, object]]) -> None:
        out = [(key, None if item is END else
                 item.text if isinstance(item, Delta) and not item.logprobs else item)
               for key, item in batch]
        try:
            self.send(("events", out))
        except (OSError, ValueError):  # the server is gone; the child is about to exit
            pass
        except Exception:  # an error that does not pickle: say so rather than lose the job
            log.exception("an engine event could not be sent")
            safe = [(k, i if i is None or isinstance(i, str) else
                     EngineError(f"internal error in the engine: {type(i).__name__}"))
                    for k, i in out]
            self.send(("events", safe))


def _child_main(settings: Settings, conn) -> None:
    limit_malloc_arenas()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(settings.log_format, settings.log_level)
    sys.setswitchinterval(settings.gil_switch_ms / 1000)
    try:
        engine = build_engine(settings)
    except ModelLoadError as exc:
        conn.send(("error", str(exc)))
        return
    except Exception as exc:  # the server reports it and exits 2
        log.exception("loading the model failed")
        conn.send(("error", f"loading the model failed: {type(exc).__name__}: {exc}"))
        return
    out = _Forwarder(conn)
    out.send(("ready", engine.info()))
    threading.Thread(target=_report_wedge, args=(engine, out), name="wedge-report",
                     daemon=True).start()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the server process is gone: nobody to answer
            engine.drain(0)
            os._exit(0)
        kind = msg[0]
        if kind == "submit":
            _, key, job = msg
            try:
                engine.submit(job, sink=out.events, key=key)
            except EngineError as exc:
                out.events([(key, exc), (key, END)])
        elif kind == "cancel":
            engine.cancel(msg[1])
        elif kind == "stats":
            out.send(("stats", engine.stats()))
        elif kind == "drain":
            engine.drain(msg[1])
            out.send(("drained",))
            logging.shutdown()
            os._exit(0)


def _report_wedge(engine, out: _Forwarder) -> None:
    while not engine.wedged:
        time.sleep(0.25)
    out.send(("wedged",))


__all__ = ["EngineProcess", "build_engine", "content_key"]
