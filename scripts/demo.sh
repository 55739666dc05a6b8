#!/usr/bin/env bash
# The main job on the embedded default: prune 25% of the experts of the shipped trained micro MoE with
# REAP and refit the kept experts to the original layer outputs (--compensate), calibrating on the shipped
# training text, and print quality (held-out NLL per domain, zero-shot accuracy on the shipped 20-item task
# samples) and size before/after. Writes out/demo-reap25 (a checkpoint stock transformers loads, with
# report.md, report.json and plots/ beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moe-fx prune examples/assets/qwen3moe-micro --method reap --ratio 0.25 --compensate \
    --calib examples/assets/calib.jsonl.gz --calib-tokens 50000 --seq-len 256 \
    --eval-data examples/assets/valid.jsonl.gz --eval-seq-len 256 --eval-seqs 4 \
    --eval-tasks default --task-data examples/assets/eval \
    --out out/demo-reap25 --overwrite "$@"
