"""The short soak: mixed load, faults and a restart; both ledgers agree (make soak runs more)."""
from __future__ import annotations

from bench import soak


def test_short_soak_loses_nothing() -> None:
    result = soak.run(requests=160, concurrency=8, out=None, seed=3)
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert failed == [], result
    assert result["server_accepted"] >= 150  # a few may land in the restart window
    assert result["codes"].get("OK", 0) >= 40
    assert result["poisoned"] >= 1
