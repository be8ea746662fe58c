"""`make bench`: preprocessing, engine and serving benchmarks; tables printed, JSON written."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from bench.common import machine, write_json

SECTIONS = ("preprocess", "engine", "serving", "structured", "fleet", "family", "kv",
            "tenants", "http")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--only", choices=SECTIONS, action="append")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    chosen = args.only or list(SECTIONS)
    m = machine()
    print(f"Machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if m['gpu'] else ''}; "
          f"torch {m['torch']}; {time.strftime('%Y-%m-%d')}\n")
    engine_factory = None
    if "engine" in chosen or "serving" in chosen:
        from service.engine.loader import load_model, resolve_model
        from service.engine.scheduler import NativeEngine

        loaded = load_model(resolve_model("tiny"))

        def engine_factory():
            return NativeEngine(loaded)
    for section in chosen:
        if section == "preprocess":
            from bench import preprocess_bench

            text, data = preprocess_bench.run(out, args.repeat)
        elif section == "engine":
            from bench import engine_bench

            engine = engine_factory()
            text, data = engine_bench.run(out, engine)
            engine.drain(0)
        elif section == "serving":
            from bench import serving_bench

            text, data = serving_bench.run(out, engine_factory)
        elif section == "structured":
            from bench import structured_bench

            text, data = structured_bench.run(out)
        elif section == "fleet":
            from bench import fleet_bench

            text, data = fleet_bench.run(out)
        elif section == "family":
            from bench import family_bench

            text, data = family_bench.run(out)
        elif section == "tenants":
            from bench import tenants_bench

            text, data = tenants_bench.run(out)
        elif section == "http":
            from bench import http_bench

            text, data = http_bench.run(out)
        else:
            from bench import kv_bench

            text, data = kv_bench.run(out)
        print(text)
        print(f"(JSON: {write_json(out, section, data)})\n")


if __name__ == "__main__":
    main()
