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
