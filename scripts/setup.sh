#!/usr/bin/env bash
# Creates the environment of one torchtitan host (once) with torch, that torchtitan and
# this project (editable). Fast when nothing changed since the last run.
#   ./scripts/setup.sh                 torchtitan 0.2.2 (TOML configs) in .venv: installs
#                                      the CPU build torch==2.13.0 when the venv has no torch
#   TORCHTITAN=0.3 ./scripts/setup.sh  torchtitan 0.3.0 (Python configs) in .venv-tt03,
#                                      with torch==2.14.1 (FSDP2 needs it) and triton
# EVAL=1 adds the `eval` extra: lm-evaluation-harness and transformers, for
# `titan-objectives export --verify` and `evaluate` (the test script asks for it).
# VENV=path overrides the location.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${TORCHTITAN:-0.2}" in
  0.2|0.2.2) VENV=${VENV:-$ROOT/.venv}; TORCH=torch==2.13.0; EXTRA=torchtitan02 ;;
  0.3|0.3.0) VENV=${VENV:-$ROOT/.venv-tt03}; TORCH=torch==2.14.1; EXTRA=torchtitan03 ;;
  *) echo "setup.sh: TORCHTITAN=$TORCHTITAN is not a host; expected 0.2 or 0.3" >&2; exit 2 ;;
esac
EXTRAS=test,$EXTRA${EVAL:+,eval}
STAMP=$VENV/.titan-objectives-installed-${EXTRAS//,/-}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$ROOT/pyproject.toml" ]; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH"
fi
echo "[setup] installing titan-objectives[$EXTRAS] and its dependencies"
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[$EXTRAS]"
touch "$STAMP"
