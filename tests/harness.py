"""Run an EagleServer on 127.0.0.1:0 in a background event loop, for end-to-end tests."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

from service.server import EagleServer
from service.settings import Settings


class RunningServer:
    """An EagleServer started on its own loop thread; `port`, `app`, `call(coro)`, `stop()`."""

    def __init__(self, engine, tracing=None, **overrides) -> None:
        self.tracing = tracing
        self.settings = replace(Settings(host="127.0.0.1", port=0, grace_seconds=2,
                                         log_format="text"), **overrides)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.app: EagleServer = self.call(self._build(engine))
        self.port = self.app.port
        self.target = f"127.0.0.1:{self.port}"

    async def _build(self, engine) -> EagleServer:
        app = EagleServer(self.settings, engine, tracing=self.tracing)
        await app.start()
        return app

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.call(self.app.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
