#!/usr/bin/env bash
# Launch training the torchtitan way:
#   NGPU=8 CONFIG_FILE=toml_configs/llama3_8b_nitp.toml ./scripts/run_train.sh [--section.key value ...]
# NGPU: processes on this node (default: the GPU count, or 1 without GPUs).
# CONFIG_FILE: the job TOML (default: the CPU-sized debug model with ntp + nitp); a
# --job.config_file argument names it too.
# LOG_RANK: ranks whose output is shown (default 0). TRAIN_FILE: the module to run
# (default titan_objectives.train). PYTHON: an interpreter that already has everything
# installed; without it, ./scripts/setup.sh prepares .venv first.
# TORCHTITAN=0.3: train on torchtitan 0.3 (Python configs) in its own environment
# (.venv-tt03): MODULE and CONFIG name the config function (default: the same main job,
# titan_objectives.hosts.torchtitan_0_3 llama3_debug_nitp); arguments are 0.3 flags.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_RANK=${LOG_RANK:-0}

launch() {  # launch PYTHON MODULE_ARGS...: one process per device (NGPU), torchrun's way
  local python=$1
  shift
  if [ -z "${NGPU:-}" ]; then
    NGPU=$("$python" -c "import torch; print(max(torch.cuda.device_count(), 1))")
  fi
  cd "$ROOT"  # the bundled configs name paths relative to the project root
  # A config error ends here, with the checks' message and exit 2, not in a worker's
  # traceback under torchrun: the same checks, on the meta device (a few seconds).
  "$python" -m titan_objectives.cli validate "${@:3}" >/dev/null || exit $?
  exec "$python" -m torch.distributed.run --nproc_per_node="$NGPU" \
    --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 "$@"
}

if [ "${TORCHTITAN:-0.2}" = "0.3" ]; then
  if [ -z "${PYTHON:-}" ]; then
    TORCHTITAN=0.3 "$ROOT/scripts/setup.sh"
    PYTHON="$ROOT/.venv-tt03/bin/python"
  fi
  launch "$PYTHON" -m "${TRAIN_FILE:-titan_objectives.train}" \
    --module "${MODULE:-titan_objectives.hosts.torchtitan_0_3}" \
    --config "${CONFIG:-llama3_debug_nitp}" "$@"
fi

# torchtitan reads the first --job.config_file it is given: take the user's out of the
# arguments, so that the one passed below is the one they named.
ARGS=()
CONFIG_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --job.config_file|--job.config-file)
      if [ $# -lt 2 ]; then
        echo "run_train.sh: $1 needs a path" >&2
        exit 2
      fi
      CONFIG_ARG=$2
      shift 2 ;;
    --job.config_file=*|--job.config-file=*)
      CONFIG_ARG=${1#*=}
      if [ -z "$CONFIG_ARG" ]; then
        echo "run_train.sh: ${1%%=*}= needs a path" >&2
        exit 2
      fi
      shift ;;
    *)
      ARGS+=("$1")
      shift ;;
  esac
done
if [ -n "$CONFIG_ARG" ]; then
  if [ -n "${CONFIG_FILE:-}" ] && [ "$(realpath -m "$CONFIG_FILE")" != "$(realpath -m "$CONFIG_ARG")" ]; then
    echo "run_train.sh: CONFIG_FILE=$CONFIG_FILE and --job.config_file $CONFIG_ARG name two" \
      "different configs; give one" >&2
    exit 2
  fi
  CONFIG_FILE=$CONFIG_ARG
fi
CONFIG_FILE=${CONFIG_FILE:-"$ROOT/toml_configs/llama3_debug_nitp.toml"}
if [ ! -f "$CONFIG_FILE" ]; then
  echo "run_train.sh: CONFIG_FILE=$CONFIG_FILE does not exist" >&2
  exit 2
fi
CONFIG_FILE=$(cd "$(dirname "$CONFIG_FILE")" && pwd)/$(basename "$CONFIG_FILE")
TRAIN_FILE=${TRAIN_FILE:-"titan_objectives.train"}

if [ -z "${PYTHON:-}" ]; then
  "$ROOT/scripts/setup.sh"
  PYTHON="$ROOT/.venv/bin/python"
fi
launch "$PYTHON" -m "$TRAIN_FILE" --job.config_file "$CONFIG_FILE" ${ARGS[@]+"${ARGS[@]}"}
