#!/usr/bin/env bash
# One command on a GPU machine: Eagle2-1B-shaped random bf16 weights, engine vs generate().
# Dry run anywhere: bench/gpu.sh --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m bench.gpu "$@"
