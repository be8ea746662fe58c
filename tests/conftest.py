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
