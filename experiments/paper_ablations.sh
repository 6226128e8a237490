#!/usr/bin/env bash
# The paper's ablation table (LLaVA, Tables 7-8; the connector from LLaVA-1.5) on the synthetic world, as Hydra multirun sweeps
# of the embedded default, each followed by python -m mmkit.report. Three seeds per setting.
#   bash experiments/paper_ablations.sh                 # every sweep (about 2-3 min per run on 2 CPU cores)
#   bash experiments/paper_ablations.sh answer_first    # one sweep
# Outputs: experiments/runs/paper/<sweep>/{report.md,report.csv,report.png}; the recorded tables
# and their reading are in experiments/paper_ablations.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=experiments/runs/paper
SEEDS=seed=0,1,2

sweep() {  # name, report metrics ("" = the evaluator's own), overrides...
  local name=$1 metrics=$2; shift 2
  if [ ! -f "$OUT/$name/multirun.yaml" ] || [ "$(find "$OUT/$name" -name summary.json | wc -l)" -lt 6 ]; then
    "$PYTHON" -m mmkit.train -m "$@" "$SEEDS" "hydra.sweep.dir=$OUT/$name" trainer.enable_progress_bar=false
  fi
  # shellcheck disable=SC2086 # the metric names are separate words
  "$PYTHON" -m mmkit.report "$OUT/$name" --title "$name" ${metrics:+--metrics $metrics}
}

ARGS=("$@")
run() { if [ ${#ARGS[@]} -eq 0 ] || [[ " ${ARGS[*]} " == *" $1 "* ]]; then sweep "$@"; fi; }

# Feature layer: the penultimate (-2, LLaVA's choice) vs the last (-1) CLIP layer.
run feature_layer "" encoder.layer=-1,-2
# Pre-training: LLaVA's two stages vs instruction tuning from a random connector.
run stage1 "" recipe=llava,no_stage1
# Predict the answer first (QCM-ALE) vs reasoning first (QCM-LEA), on the synthetic ScienceQA-format set.
run answer_first "acc acc_NAT acc_SOC acc_LAN acc_TXT acc_IMG acc_NO acc_G1_6 acc_G7_12 lenient_acc" \
  data=scienceqa evaluation=scienceqa data.prompt_format=QCM-LEA,QCM-ALE
# Connector: LLaVA's linear projection vs LLaVA-1.5's two-layer GELU MLP.
run connector "" connector=linear,mlp2x_gelu
# Model size: the zoo's Llama vs one with about twice the parameters (LLaVA: 7B vs 13B).
run model_size "" decoder=tiny_llama,tiny_llama_large
