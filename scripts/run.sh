#!/usr/bin/env bash
# Sets up and runs the main job: the online RLHF loop (python -m online) on the bundled Kafka and
# the default small models. The first run also pretrains the default policy for a few minutes on
# the hh dialogues (train.sft) so that it speaks before RLHF starts. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -f models/policy-v0/sft.json ]; then
  echo "[run] pretraining the default policy on the hh dialogues (about 4 minutes, once)"
  python3 -m train.sft --model models/policy-v0 --minutes 4
fi
exec python3 -m online "$@"
