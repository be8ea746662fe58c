"""Structured logging: one JSON object per line, stamped with the current request id."""
from __future__ import annotations

import contextvars
import json
import logging
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """Fields: ts, level, logger, msg, request_id, plus any `extra=` given to the call."""

    # color_message: uvicorn's copy of its message with terminal colours, for its own console
    _BUILTIN = set(vars(logging.makeLogRecord({}))) | {"request_id", "message", "asctime",
                                                       "color_message"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z", "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        if getattr(record, "request_id", ""):
            out["request_id"] = record.request_id
        out.update({k: v for k, v in vars(record).items() if k not in self._BUILTIN})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET:  # their INFO is their internals, once per image or call
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


# Libraries whose INFO lines would flood a server log (pyvips logs each step of every image).
QUIET = ("pyvips", "PIL", "httpx", "urllib3", "filelock", "huggingface_hub")
