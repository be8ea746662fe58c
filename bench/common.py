"""Benchmark helpers: timing, percentiles, the printed table and the JSON record."""
from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__}


def best_of(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> tuple[float, object]:
    """Median seconds of `repeat` runs after `warmup` runs, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([f"### {title}", "", line, sep, *body, ""])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(out: Path, name: str, data: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    return path


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants: the server, its engine process and the video decoders."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += process_tree(int(child))
    return out


def tree_status(pid: int, field: str) -> int:
    """A /proc/<pid>/status number (VmRSS, VmHWM in kB; Threads) summed over the process
    tree; for VmHWM that is the sum of each process's own peak."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except FileNotFoundError:  # exited meanwhile
            pass
    return total


def stamp_tokens(streams: list) -> tuple[list[list[float]], list]:
    """One reader thread per engine stream recording when each token arrived (with logprobs
    every token is a Delta); returns the stamps and the threads, once every stream has one."""
    import threading

    from service.engine.job import Delta

    stamps: list[list[float]] = [[] for _ in streams]

    def read(i: int) -> None:
        try:
            for event in streams[i]:
                if isinstance(event, Delta):
                    stamps[i] += [time.monotonic()] * len(event.logprobs)
        except Exception:  # cancelled at the end
            pass

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for r in readers:
        r.start()
    while not all(stamps):
        ended = [i for i, r in enumerate(readers) if not r.is_alive() and not stamps[i]]
        if ended:  # refused or failed before its first token: say so rather than wait forever
            raise RuntimeError(f"stream {ended[0]} ended before its first token")
        time.sleep(0.01)
    return stamps, readers


def free_port() -> int:
    """A port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
