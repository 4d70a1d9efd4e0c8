#!/usr/bin/env bash
# Creates .venv (once) with torch, the pinned torchtitan and this project (editable).
# Installs the CPU build torch==2.13.0 only when the venv has no torch yet. Fast when
# nothing changed since the last run. VENV=path overrides the location.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
STAMP=$VENV/.titan-objectives-installed

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$ROOT/pyproject.toml" ]; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
fi
echo "[setup] installing titan-objectives and its dependencies"
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
touch "$STAMP"
