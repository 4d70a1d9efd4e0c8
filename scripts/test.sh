#!/usr/bin/env bash
# Runs the test suites of both torchtitan hosts, each in its own environment (set up
# first if needed): tests/ on torchtitan 0.2.2 (.venv), tests_tt03/ on torchtitan 0.3.0
# (.venv-tt03). TORCHTITAN=0.2 or 0.3 runs one of them. Extra args go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HOSTS=${TORCHTITAN:-"0.2 0.3"}
for host in $HOSTS; do
  case "$host" in
    0.2) TORCHTITAN=0.2 "$ROOT/scripts/setup.sh"
         "$ROOT/.venv/bin/python" -m pytest tests "$@" ;;
    0.3) TORCHTITAN=0.3 "$ROOT/scripts/setup.sh"
         "$ROOT/.venv-tt03/bin/python" -m pytest tests_tt03 "$@" ;;
    *) echo "test.sh: TORCHTITAN=$host is not a host; expected 0.2 or 0.3" >&2; exit 2 ;;
  esac
done
