#!/usr/bin/env bash
# The paper's ablation table (LLaVA, Tables 7-8) on the synthetic world, as Hydra multirun sweeps
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

sweep() {  # name, overrides...
  local name=$1; shift
  if [ -f "$OUT/$name/report.md" ]; then echo "[$name] done already"; return; fi
  "$PYTHON" -m mmkit.train -m "$@" "$SEEDS" "hydra.sweep.dir=$OUT/$name" trainer.enable_progress_bar=false
  "$PYTHON" -m mmkit.report "$OUT/$name" --title "$name"
}

ARGS=("$@")
run() { local name=$1; shift; if [ ${#ARGS[@]} -eq 0 ] || [[ " ${ARGS[*]} " == *" $name "* ]]; then sweep "$name" "$@"; fi; }

# Feature layer: the penultimate (-2, LLaVA's choice) vs the last (-1) CLIP layer.
run feature_layer encoder.layer=-1,-2
# Pre-training: LLaVA's two stages vs instruction tuning from a random connector.
run stage1 recipe=llava,no_stage1
# Predict the answer first (QCM-ALE) vs reasoning first (QCM-LEA), on the synthetic ScienceQA-format set.
run answer_first data=scienceqa evaluation=scienceqa data.prompt_format=QCM-LEA,QCM-ALE
