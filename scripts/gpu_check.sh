#!/usr/bin/env bash
# The GPU check (issue 19): one script for a machine with one CUDA GPU, run from the repository
# root of a copy of the tree that carries rlhf/ (the generated gRPC code; `python -m protos.build`
# makes it). It downloads nothing and installs nothing into the machine's Python; the project
# runs from the tree (PYTHONPATH).
# Under 8 minutes on an H100: every step has its own timeout, and all of them fit in
# GPU_CHECK_BUDGET_S (default 420 s); a step runs whatever the steps before it did.
#
#   env            nvidia-smi, versions, which Python modules import
#   kernels        tests/test_kernels_triton.py compiled on CUDA (TRITON_INTERPRET=0)
#   parity         tests/test_gpu.py: serve.engine's greedy tokens vs transformers' generate on CUDA, fp32 and bf16
#   bench-kernels  bench/kernels.py: kernel times, GB/s and the fraction of the memory-bandwidth bound
#   bench-serve    bench/serve_throughput.py --quick --device cuda: the policy server vs transformers, both on the GPU
#
#   bash scripts/gpu_check.sh
#
# Writes gpu_check.log (everything printed) and gpu_check_summary.json (each step's status,
# seconds and the benchmarks' JSON) into $OUT when it is set, else into .run/gpu_check/.
# Without CUDA each step says "skipped: no CUDA"; a step whose Python modules do not import is
# skipped with the import error (bench-serve needs grpcio-health-checking, grpcio-reflection,
# kafka-python (the server imports its interaction log's producer) and the grpcio/protobuf that
# rlhf/ was generated for). Wheels in .whl/, when carried along, are
# installed into a temporary folder first and put on PYTHONPATH. Exit status: 1 if a step failed,
# else 2 if a step was skipped, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
LOGDIR=${OUT:-.run/gpu_check}
mkdir -p "$LOGDIR"
LOG=$LOGDIR/gpu_check.log
SUMMARY=$LOGDIR/gpu_check_summary.json
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1

declare -A MOD_ERR=()   # module -> why it does not import
HAVE_CUDA=0
STEP=0
NSTEPS=5

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

record() {  # record NAME STATUS SECONDS NOTE: one line of the summary
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/steps.tsv"
    echo "---- $1: $2 in $3 s${4:+ ($4)}"
}

env_step() {
    STEP=$((STEP + 1))
    echo "==== [$STEP/$NSTEPS] env: the machine, versions, imports ===="
    local t0; t0=$(now)
    date -u '+%Y-%m-%dT%H:%M:%SZ'
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing the carried wheels in .whl/ into $WORK/site (no index, no dependencies)"
        "$PY" -m pip install -q --root-user-action=ignore --disable-pip-version-check --no-index --no-deps \
            --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:$WORK/site"
    fi
    timeout -k 5 120 "$PY" - >"$WORK/env.out" 2>&1 <<'EOF'
import importlib
import platform

print(f"python {platform.python_version()} ({platform.machine()})")
MODULES = ["torch", "triton", "transformers", "tokenizers", "safetensors", "numpy", "pytest", "scipy", "grpc",
           "google.protobuf", "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection", "prometheus_client",
           "kafka", "rlhf.v1.policy_pb2_grpc"]
for name in MODULES:
    try:
        mod = importlib.import_module(name)
        print(f"mod {name} ok {getattr(mod, '__version__', '')}")
    except Exception as e:  # noqa: BLE001 - an old grpcio makes the generated code raise RuntimeError
        print(f"mod {name} {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
import torch

print(f"cuda {int(torch.cuda.is_available())}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs; torch CUDA {torch.version.cuda}")
EOF
    local rc=$?
    cat "$WORK/env.out"
    while read -r tag name rest; do
        [[ $tag == mod && $rest != ok* ]] && MOD_ERR[$name]=$rest
    done <"$WORK/env.out"
    grep -q '^cuda 1$' "$WORK/env.out" && HAVE_CUDA=1
    local status=PASS note=""
    if ((rc != 0)); then
        status=FAIL note="the environment probe exited with $rc"
    elif ((!HAVE_CUDA)) && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        status=FAIL note="nvidia-smi lists a GPU but torch.cuda.is_available() is False"
    elif ((!HAVE_CUDA)); then
        note="no CUDA"
    fi
    ((${#MOD_ERR[@]})) && note="${note:+$note; }not importable: ${!MOD_ERR[*]}"
    record env "$status" "$(since "$t0")" "$note"
}

# step NAME KIND TIMEOUT "MODULES" DESCRIPTION CMD...: KIND pytest passes when pytest exits 0 and
# something passed; KIND json when the command exits 0 and its last line is one JSON object.
step() {
    local name=$1 kind=$2 limit=$3 needs=$4 desc=$5
    shift 5
    STEP=$((STEP + 1))
    echo
    echo "==== [$STEP/$NSTEPS] $name: $desc ===="
    echo "\$ $*"
    if ((!HAVE_CUDA)); then
        echo "skipped: no CUDA"
        record "$name" SKIP 0 "no CUDA"
        return
    fi
    local m missing=""
    for m in $needs; do
        [[ -n ${MOD_ERR[$m]:-} ]] && missing="${missing:+$missing; }$m: ${MOD_ERR[$m]}"
    done
    if [[ -n $missing ]]; then
        echo "skipped: $missing"
        record "$name" SKIP 0 "does not import: $missing"
        return
    fi
    local left=$((BUDGET - SECONDS - 5))
    if ((left < 30)); then
        echo "skipped: ${SECONDS} s of the ${BUDGET} s budget spent"
        record "$name" SKIP 0 "out of time"
        return
    fi
    ((limit > left)) && limit=$left
    echo "(timeout ${limit} s)"
    local t0 out=$WORK/$name.out
    t0=$(now)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out"
    local rc=${PIPESTATUS[0]} status=PASS note="" last
    last=$(tail -n 1 "$out")
    if ((rc == 124 || rc == 137)); then
        status=FAIL note="timed out after ${limit} s"
    elif ((rc != 0)); then
        status=FAIL note="exit status $rc"
    elif [[ $kind == pytest ]]; then
        note=$(grep -E '(passed|failed|skipped|error)' "$out" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
        grep -qE '[0-9]+ passed' <<<"$note" || status=FAIL note="nothing passed: $note"
    elif [[ $kind == json ]]; then
        if "$PY" -c 'import json, sys; assert isinstance(json.loads(sys.argv[1]), dict)' "$last" 2>/dev/null; then
            printf '%s\n' "$last" >"$WORK/$name.json"
        else
            status=FAIL note="the last line is not a JSON object"
        fi
    fi
    record "$name" "$status" "$(since "$t0")" "$note"
}

summarize() {
    echo
    echo "==== summary ($SECONDS s in all) ===="
    column -t -s $'\t' "$WORK/steps.tsv" 2>/dev/null || cat "$WORK/steps.tsv"
    "$PY" - "$WORK" "$SUMMARY" "$SECONDS" <<'EOF'
import json
import sys
from pathlib import Path

work, out, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, secs, note = line.split("\t")
    steps[name] = {"status": status, "seconds": float(secs), "note": note}
    if (work / f"{name}.json").exists():
        steps[name]["result"] = json.loads((work / f"{name}.json").read_text())
env = (work / "env.out").read_text().splitlines() if (work / "env.out").exists() else []
summary = {"seconds": seconds, "env": env, "steps": steps,
           "failed": [n for n, s in steps.items() if s["status"] == "FAIL"],
           "skipped": [n for n, s in steps.items() if s["status"] == "SKIP"]}
out.write_text(json.dumps(summary, indent=2) + "\n")
print(f"summary: {out}")
EOF
}

main() {
    echo "gpu_check: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)'), budget ${BUDGET} s"
    env_step
    step kernels pytest 150 "torch triton pytest scipy" \
        "tests/test_kernels_triton.py compiled on CUDA (TRITON_INTERPRET=0)" \
        "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_triton.py
    step parity pytest 120 "torch triton transformers tokenizers safetensors pytest" \
        "tests/test_gpu.py: the engine's greedy tokens vs transformers' generate on CUDA, fp32 and bf16" \
        "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
    step bench-kernels json 90 "torch triton" \
        "bench/kernels.py: the fraction of the memory-bandwidth bound" \
        "$PY" bench/kernels.py
    step bench-serve json 150 \
        "torch triton transformers tokenizers grpc google.protobuf grpc_health.v1.health grpc_reflection.v1alpha.reflection prometheus_client kafka rlhf.v1.policy_pb2_grpc" \
        "bench/serve_throughput.py --quick: the policy server vs transformers, both on the GPU" \
        "$PY" bench/serve_throughput.py --quick --device cuda
    summarize
    if grep -q $'\tFAIL\t' "$WORK/steps.tsv"; then
        echo "gpu_check: FAILED"
        return 1
    elif grep -q $'\tSKIP\t' "$WORK/steps.tsv"; then
        echo "gpu_check: passed, with steps skipped"
        return 2
    fi
    echo "gpu_check: all steps passed"
}

main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
