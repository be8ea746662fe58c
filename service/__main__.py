"""`python -m service` / `eagle-serve`: load the model, then serve until SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from service import logs
from service import settings as settings_mod


def build_engine(s: settings_mod.Settings):
    """The native engine over the model `s.model`, with the settings' limits."""
    from preprocess.frames import VideoPolicy
    from preprocess.media import ImagePolicy
    from preprocess.refs import RefPolicy
    from service.engine.loader import load_model, resolve_model
    from service.engine.prepare import MediaSettings
    from service.engine.scheduler import EngineSettings, NativeEngine

    folder = resolve_model(s.model, Path(s.cache_dir) if s.cache_dir else None)
    loaded = load_model(folder, s.device)
    media = MediaSettings(
        image=ImagePolicy(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels),
        video=VideoPolicy(max_bytes=s.max_video_bytes, max_frames=s.max_video_frames,
                          max_duration_s=s.max_video_seconds, timeout_s=s.video_timeout_s),
        refs=RefPolicy(media_roots=tuple(Path(r) for r in s.media_roots),
                       max_file_bytes=s.max_video_bytes, allow_urls=s.allow_urls))
    return NativeEngine(loaded, EngineSettings(
        max_running=s.max_running, max_queue=s.max_queue, max_batch_tokens=s.max_batch_tokens,
        preprocess_workers=s.preprocess_workers, step_timeout_s=s.step_timeout_s,
        video_workers=s.video_workers, video_memory_mb=s.video_memory_mb, media=media))


def main(argv: list[str] | None = None) -> int:
    try:
        s = settings_mod.load(argv)
    except ValueError as exc:
        print(f"eagle-serve: {exc}", file=sys.stderr)
        return 2
    logs.setup(s.log_format, s.log_level)
    log = logging.getLogger("service")
    log.info("settings", extra={"settings": s.describe()})
    from service.engine.config import ModelLoadError
    from service.server import serve

    try:
        engine = build_engine(s)
    except ModelLoadError as exc:
        log.error("cannot load the model: %s", exc)
        return 2
    # The engine thread runs many short torch calls; with Python's default 5 ms GIL switch
    # interval the event loop that answers RPCs waits behind it. 0.5 ms measured better for
    # both latency and throughput (see the README's serving table).
    sys.setswitchinterval(s.gil_switch_ms / 1000)
    return asyncio.run(serve(s, engine))


if __name__ == "__main__":
    sys.exit(main())
