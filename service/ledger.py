"""An append-only record of every RPC the server took and the one status it ended with."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path


class Ledger:
    """JSON lines: {"event": "accepted" | "terminal", "id": ..., "code": ..., "t": ...}."""

    def __init__(self, path: str | Path) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, event: str, rid: str, **extra: object) -> None:
        line = json.dumps({"event": event, "id": rid, "t": round(time.time(), 3), **extra})
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


class NoLedger:
    def write(self, event: str, rid: str, **extra: object) -> None:
        pass

    def close(self) -> None:
        pass
