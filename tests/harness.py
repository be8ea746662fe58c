"""Run an EagleServer on 127.0.0.1:0 in a background event loop, for end-to-end tests."""
from __future__ import annotations

import socket
from dataclasses import replace

from service.server import BackgroundServer
from service.settings import Settings


class RunningServer(BackgroundServer):
    """A BackgroundServer with the tests' settings: port 0, a short grace, text logs."""

    def __init__(self, engine, tracing=None, **overrides) -> None:
        super().__init__(replace(Settings(host="127.0.0.1", port=0, grace_seconds=2,
                                          log_format="text"), **overrides), engine, tracing)


def free_port() -> int:
    """A port free on 127.0.0.1 now (for the HTTP, metrics and health ports, which take no 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
