"""`python -m service` / `eagle-serve`: load the model, then serve until SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import os
import sys

from service import logs
from service import settings as settings_mod
from service.runtime import limit_malloc_arenas


def main(argv: list[str] | None = None) -> int:
    try:
        loaded = settings_mod.load_all(argv)
    except ValueError as exc:
        print(f"eagle-serve: {exc}", file=sys.stderr)
        return 2
    s = loaded.settings
    if loaded.print_config:
        sys.stdout.write(settings_mod.to_toml(s))
        return 0
    logs.setup(s.log_format, s.log_level)
    limit_malloc_arenas()  # before the gRPC and media threads start
    log = logging.getLogger("service")
    if loaded.ignored_variables:
        log.info("ignored %d Kubernetes service-link variable(s): %s (set "
                 "enableServiceLinks: false in the pod spec to stop them)",
                 len(loaded.ignored_variables), ", ".join(loaded.ignored_variables))
    log.info("settings", extra={"settings": s.describe(),
                                "config_file": loaded.config_file or None})
    from service.engine.job import ModelLoadError
    from service.engine_process import EngineProcess, build_engine
    from service.server import serve
    from service.tracing import Tracing

    try:  # before the model loads: a tracing setup that cannot work fails fast
        tracing = Tracing.from_env(os.environ)
    except (ValueError, ImportError) as exc:
        log.error("cannot set up tracing from the OTEL_* variables: %s", exc)
        return 2

    try:
        engine = EngineProcess(s) if s.engine_process else build_engine(s)
    except ModelLoadError as exc:
        log.error("cannot load the model: %s", exc)
        return 2
    # With the engine in this process (--engine-process false) its thread runs many short
    # torch calls, and with Python's default 5 ms GIL switch interval the event loop that
    # answers RPCs waits behind it; 0.5 ms measured better for latency and throughput.
    sys.setswitchinterval(s.gil_switch_ms / 1000)
    code = asyncio.run(serve(s, engine, tracing=tracing))
    if code == 3:
        # Wedged: a model step is stuck, maybe inside a kernel. Exit now with the code the
        # supervisor expects: a normal interpreter exit would stop the stuck thread mid-way
        # through C++ frames, which aborts the process (exit 134) instead.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    return code


if __name__ == "__main__":
    sys.exit(main())
