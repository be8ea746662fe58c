#!/usr/bin/env bash
# The GPU check and benchmark in one command, everything written to one folder:
#   bench/gpu.sh OUT_DIR              on the GPU machine (after `make gpu-kit` here)
#   bench/gpu.sh OUT_DIR --dry-run    the same steps on CPU with the tiny model (make test)
# Steps: the kit (.whl/, when present) into a temporary site; `pytest -m gpu`; bench.gpu.
# OUT_DIR gets gpu-tests.log, gpu-tests.xml, gpu-bench.log and gpu.json. Exit 0 only when
# both steps pass. Extra arguments go to bench.gpu (e.g. --tokens 64 --batches 1,16).
# GPU_TESTS_TIMEOUT and GPU_BENCH_TIMEOUT (seconds, 300 and 420) bound the two steps; the
# benchmark rewrites gpu.json after each of its parts, so a run cut short keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bench/gpu.sh OUT_DIR [--dry-run] [bench.gpu arguments]" >&2
  exit 2
fi
out=$1; shift
mkdir -p "$out"
dry=0
args=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then dry=1; else args+=("$a"); fi
done
# the interpreter: $PYTHON as `make` passes it (a virtual environment need not be active)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  if "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    site=$(mktemp -d)/site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      .whl/*.whl || { echo "gpu.sh: installing the kit failed" >&2; exit 3; }
    export PYTHONPATH="$PWD:$PWD/protos:$site${PYTHONPATH#$PWD:$PWD/protos}"
    echo "kit: $(ls .whl/*.whl | wc -l) wheels installed into $site"
  else
    echo "kit: built for Python 3.12, this is $("$py" -V); using the installed packages"
  fi
else
  echo "kit: none (.whl/ is empty: run \`make gpu-kit\` on the CPU machine); using the installed packages"
fi
start=$(date +%s)
if [ $dry = 1 ]; then
  bench=(--device cpu --tiny --tokens 16 --batches 1,4)
else
  bench=()
fi
timeout "${GPU_TESTS_TIMEOUT:-300}" "$py" -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_gpu.py \
  --junitxml "$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
timeout "${GPU_BENCH_TIMEOUT:-420}" "$py" -m bench.gpu --out "$out" ${bench[@]+"${bench[@]}"} ${args[@]+"${args[@]}"} 2>&1 \
  | tee "$out/gpu-bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu.sh: pytest -m gpu exit $tests_rc, benchmark exit $bench_rc, $(( $(date +%s) - start )) s; logs and gpu.json in $out"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
