"""Shared pytest fixtures and paths."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/factory.py
SHARED_CONFIGS = ROOT.parent / "shared" / "reference" / "configs"


@pytest.fixture(scope="session")
def shared_configs() -> Path:
    if not SHARED_CONFIGS.is_dir():
        pytest.skip(f"the real Eagle2 configs are not beside the project ({SHARED_CONFIGS})")
    return SHARED_CONFIGS


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from service.engine.tiny import ensure_tiny

    return ensure_tiny(tmp_path_factory.mktemp("eagle-cache"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from service.engine.loader import load_model

    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def engine(tiny):
    from service.engine.scheduler import EngineSettings, NativeEngine

    eng = NativeEngine(tiny, EngineSettings(max_running=16, max_queue=64))
    yield eng
    eng.drain(0)


def make_engine(tiny, **kw):
    from service.engine.scheduler import EngineSettings, NativeEngine

    return NativeEngine(tiny, EngineSettings(**kw))


@pytest.fixture(scope="session")
def media_root(tmp_path_factory) -> Path:
    import factory

    root = tmp_path_factory.mktemp("media")
    factory.video(root / "clip.mp4", seconds=4, fps=10)
    (root / "photo.jpg").write_bytes(factory.encode(factory.photo(800, 600), "JPEG"))
    return root


@pytest.fixture(scope="session")
def server(tiny, media_root):
    """A shared server over the tiny model, media root set, no auth."""
    from dataclasses import replace

    from harness import RunningServer

    from preprocess.refs import RefPolicy
    from service.engine.prepare import MediaSettings
    from service.engine.scheduler import EngineSettings, NativeEngine

    media = MediaSettings(refs=RefPolicy(media_roots=(media_root,)))
    engine = NativeEngine(tiny, replace(EngineSettings(), media=media))
    srv = RunningServer(engine, media_roots=(str(media_root),))
    yield srv
    srv.stop()
    engine.drain(0)
