#!/usr/bin/env bash
# Runs the test suites of both torchtitan hosts, each in its own environment (set up
# first if needed): tests/core (no torchtitan) in both, with tests/hosts/torchtitan_0_2 on
# torchtitan 0.2.2 (.venv) and tests/hosts/torchtitan_0_3 on torchtitan 0.3.0
# (.venv-tt03), each with the `eval` extra (lm-eval, transformers). TORCHTITAN=0.2 or 0.3
# runs one of them. Extra args go to pytest.
# Tests run in TEST_WORKERS processes (pytest-xdist; default: the CPU count, at most 4):
# most of a test's time is a training subprocess starting up, which another test's
# subprocess can overlap. TEST_WORKERS=0 runs them in this process, one at a time.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HOSTS=${TORCHTITAN:-"0.2 0.3"}
CPUS=$(nproc)
WORKERS=${TEST_WORKERS:-$((CPUS < 4 ? CPUS : 4))}
# Each test process (and the trainings it starts) gets its share of the cores: more
# threads than cores slow every run down. (TEST_WORKERS may also be pytest-xdist's
# 'auto' or 'logical': a process per core.)
if [[ "$WORKERS" =~ ^[0-9]+$ ]]; then
  THREADS=$((WORKERS > 0 ? CPUS / WORKERS : CPUS))
else
  THREADS=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((THREADS > 0 ? THREADS : 1))}
for host in $HOSTS; do
  case "$host" in
    0.2|0.3) ;;
    *) echo "test.sh: TORCHTITAN=$host is not a host; expected 0.2 or 0.3" >&2; exit 2 ;;
  esac
done

# With both hosts, 0.3's environment (torch 2.14.1, mostly unpacking) installs while the
# 0.2.2 suite runs.
SETUP_03_LOG=""
if [[ " $HOSTS " == *" 0.2 "* && " $HOSTS " == *" 0.3 "* ]]; then
  SETUP_03_LOG=$(mktemp)
  EVAL=1 TORCHTITAN=0.3 "$ROOT/scripts/setup.sh" >"$SETUP_03_LOG" 2>&1 &
  SETUP_03_PID=$!
fi

for host in $HOSTS; do
  if [ "$host" = 0.2 ]; then
    EVAL=1 TORCHTITAN=0.2 "$ROOT/scripts/setup.sh"
    "$ROOT/.venv/bin/python" -m pytest tests/core tests/hosts/torchtitan_0_2 \
      -n "$WORKERS" --dist loadgroup "$@"
  else
    if [ -n "$SETUP_03_LOG" ]; then
      status=0
      wait "$SETUP_03_PID" || status=$?
      cat "$SETUP_03_LOG"
      rm -f "$SETUP_03_LOG"
      [ "$status" -eq 0 ] || { echo "test.sh: setting up torchtitan 0.3 failed" >&2; exit "$status"; }
    else
      EVAL=1 TORCHTITAN=0.3 "$ROOT/scripts/setup.sh"
    fi
    "$ROOT/.venv-tt03/bin/python" -m pytest tests/core tests/hosts/torchtitan_0_3 \
      -n "$WORKERS" --dist loadgroup "$@"
  fi
done
