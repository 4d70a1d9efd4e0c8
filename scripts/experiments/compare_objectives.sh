#!/usr/bin/env bash
# Objectives side by side on one GPU: the ~125M Llama3 of toml_configs/llama3_125m_nitp.toml
# trained on the same tokens with each stack of STACKS (default: ntp, ntp+nitp, ntp+mtp,
# ntp+top), then one comparison report (per-objective losses, both effective ranks and the
# average cosine of the final hidden states and of block 2 / the NITP target, on training
# batches and held-out books), and each run's model exported for Hugging Face transformers
# and scored by lm-evaluation-harness (a table of downstream scores in the same report).
#
#   # data/gutenberg/{train,val}.jsonl.gz: the corpus, see docs/data.md
#   ./scripts/experiments/compare_objectives.sh            # ~1,500 steps per run on an H200
#   TINY=1 ./scripts/experiments/compare_objectives.sh     # a CPU-sized smoke version
#
# STACKS, STEPS, SEED, OUT and extra arguments (passed to every run) override the defaults;
# TASKS (comma-separated lm-eval tasks, default: the bundled local ones; lm-eval's own,
# e.g. arc_easy,hellaswag,piqa, need the dataset hub) and LIMIT (documents per task) the
# evaluation, which needs the eval extra: set up here (EVAL=1 ./scripts/setup.sh) unless
# PYTHON names an interpreter that has it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-outputs/compare_objectives}
STACKS=${STACKS:-"ntp ntp,nitp ntp,mtp ntp,top"}
export CONFIG_FILE=toml_configs/llama3_125m_nitp.toml NGPU=${NGPU:-1}
if [ -z "${PYTHON:-}" ]; then
  EVAL=1 ./scripts/setup.sh
  export PYTHON=.venv/bin/python
fi
# Before any training: the evaluation at the end needs lm-eval and transformers.
"$PYTHON" -c "import lm_eval, transformers" 2>/dev/null || {
  echo "compare_objectives.sh: $PYTHON has no lm-eval/transformers: EVAL=1 ./scripts/setup.sh" >&2
  exit 2
}

if [ -n "${TINY:-}" ]; then
  STEPS=${STEPS:-40}
  size=(
    --model.flavor debugmodel --model.hf_assets_path assets/tokenizer-bpe2k-tiny
    --training.dataset_path assets/tiny/train.txt --validation.dataset_path assets/tiny/val.txt
    --training.seq_len 256 --training.local_batch_size 8 --validation.seq_len 256
    --validation.local_batch_size 8 --validation.steps 4 --objectives.nitp.target_layer 2
    --objectives.top.window 64 --objectives.geometry.layers 2
    --objectives.geometry.max_tokens 512 --objectives.geometry.freq 10
    --training.mixed_precision_param float32 --compile.no-enable --metrics.log_freq 10
  )
else
  STEPS=${STEPS:-1500}
  size=()
fi
# One seed for every run (torchtitan leaves a 1-process run unseeded otherwise): the runs
# start from the same weights and differ only by the stack.
# The model is saved at the last step (model-only): what the evaluation exports.
common=(--training.steps "$STEPS" --validation.freq "$STEPS" --debug.seed "${SEED:-42}"
        --checkpoint.enable --checkpoint.interval "$STEPS"
        ${size[@]+"${size[@]}"} "$@")
evaluation=(--evaluate ${TASKS:+--tasks "$TASKS"} ${LIMIT:+--limit "$LIMIT"})

runs=()
for stack in $STACKS; do
  run="$OUT/${stack//,/_}"
  rm -rf "$run/checkpoint" "$run/hf" "$run/eval"  # a new run, not a resume of the last one
  ./scripts/run_train.sh "${common[@]}" --objectives.stack "$stack" --job.dump_folder "$run"
  runs+=("$run")
done
"$PYTHON" -m titan_objectives.cli compare "${runs[@]}" --out "$OUT/report" \
  "${evaluation[@]}"
cat "$OUT/report/summary.md"
