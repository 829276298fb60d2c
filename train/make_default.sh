#!/usr/bin/env bash
# Retrain the two shipped default models from scratch and copy them into tmfast/assets/.
#   train/make_default.sh            all stages (AR; maturation from it; its self-conditioned fine-tune)
#   train/make_default.sh ar         stage 1 only
#   train/make_default.sh maturation stage 2 only (needs runs/ar_kjv)
#   train/make_default.sh finetune   stage 3 only (needs runs/maturation_kjv); this is what ships
# Extra arguments after the stage are passed to both `python -m train` calls,
# e.g. `train/make_default.sh all --max_steps=100` for a quick smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"; shift || true
PY="${PYTHON:-python}"

ship() {  # run dir → asset dir, without the optimiser/resume state
  local run="$1" dest="$2" cmd="$3"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  for f in config.json model.safetensors tokenizer.json train_config.json train_log.jsonl loss_curve.png; do
    cp "$run/$f" "$dest.tmp/$f"
  done
  printf '%s\n' "# made by train/make_default.sh with:" "$cmd" > "$dest.tmp/train_command.txt"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "shipped $run -> $dest"
}

run_stage() {  # name, config file, [run dir, asset dir to ship it to]; extra args go to python -m train
  local name="$1" config="$2" run="${3:-}" dest="${4:-}"
  [[ "$stage" == all || "$stage" == "$name" ]] || return 0
  local cmd="$PY -m train --config $config $EXTRA"
  echo "+ $cmd"; local start=$(date +%s)
  $cmd
  echo "stage $name: $(( $(date +%s) - start )) s wall"
  if [[ -n "$dest" ]]; then ship "$run" "$dest" "$cmd"; fi
}

EXTRA="$*"
run_stage ar train/configs/ar_kjv.json runs/ar_kjv tmfast/assets/ar
run_stage maturation train/configs/maturation_kjv.json "" ""      # stage 3 starts from it; not shipped itself
run_stage finetune train/configs/maturation_kjv_finetune.json runs/maturation_kjv_finetune tmfast/assets/maturation
