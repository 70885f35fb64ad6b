#!/usr/bin/env bash
# Sets up and runs the main job: for now the policy server on the default model and a sample
# call against it (the online loop grows from here). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m serve.demo "$@"
