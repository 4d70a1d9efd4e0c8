#!/usr/bin/env bash
# NITP vs NTP on one GPU: compare_objectives.sh with the stacks `ntp` and `ntp + nitp`
# (the ~125M Llama3 of toml_configs/llama3_125m_nitp.toml, the same tokens for both).
#
#   ./scripts/experiments/nitp_vs_ntp.sh            # ~1,500 steps per run on an H200
#   TINY=1 ./scripts/experiments/nitp_vs_ntp.sh     # a CPU-sized smoke version
set -euo pipefail
export STACKS="ntp ntp,nitp" OUT=${OUT:-outputs/nitp_vs_ntp}
exec "$(dirname "${BASH_SOURCE[0]}")/compare_objectives.sh" "$@"
