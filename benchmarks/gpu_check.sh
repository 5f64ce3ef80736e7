#!/usr/bin/env bash
# The device check: one script for a lent GPU, under 8 minutes, each step under `timeout`, a report file.
#   bash benchmarks/gpu_check.sh                  # on the GPU machine; report: benchmarks/results/gpu_check.md
#   bash benchmarks/gpu_check.sh --smoke          # CPU, tiny shapes: checks the script itself (the suite runs it)
#   bash benchmarks/gpu_check.sh --report FILE
# Steps: (1) grouped-GEMM probe, counts with zeros, vs a float32 loop; (2) the GPU-only tests and the host
# sync count under torch.cuda.set_sync_debug_mode; (3) a Mixtral-shaped MoE layer fwd+bwd (time, memory);
# (4) `moeyard train` on one device, stopped at step 10 and resumed to 20; (5) peak memory of the same run
# with replicated (plain) vs FSDP2-sharded state. A failed step is reported and the next one still runs;
# the exit status is the number of failed steps.
# The whole run stays inside GPU_CHECK_BUDGET_S (default 470 s): each step gets what is left, at most
# its own limit. PYTHON (default python3) is the interpreter that has torch.
set -uo pipefail
SMOKE=0
REPORT=
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --report) REPORT="$(realpath -m "$2")"; shift ;;
    *) echo "unknown argument $1 (use --smoke, --report FILE)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
REPORT=${REPORT:-$PWD/benchmarks/results/gpu_check.md}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
# The repository's own moeyard/ folder imports from anywhere here; the installed package is what has
# moeyard.models. A bare device machine has no network: no build isolation, no dependencies.
if ! "$PY" -c "import moeyard.models, moeyard.launch.cli" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "cannot install moeyard with $PY" >&2; exit 2; }
fi
DEVICE=cuda; LAYER=(); TOTAL=20; STOP=10
if [ "$SMOKE" = 1 ]; then DEVICE=cpu; LAYER=(--smoke); TOTAL=4; STOP=2; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export WORK TOTAL STOP PY
mkdir -p "$(dirname "$REPORT")"
FAILED=0
{
  echo "# moeyard device check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); device: $DEVICE; smoke: $SMOKE"
  "$PY" -c "import torch; print('- torch', torch.__version__, '| cuda', torch.version.cuda, '|',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} > "$REPORT" 2>&1

step() {  # step "title" SECONDS command...
  local title=$1 limit=$2; shift 2
  local log="$WORK/step.log" start=$SECONDS status left=$((BUDGET - SECONDS - 10))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    FAILED=$((FAILED + 1))
    { echo; echo "## $title: SKIPPED (the ${BUDGET}s budget is spent)"; } >> "$REPORT"
    echo "$title: SKIPPED"
    return
  fi
  timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1
  status=$?
  local verdict=PASS
  [ $status -eq 124 ] || [ $status -eq 137 ] && verdict="TIMEOUT after ${limit}s (or killed: exit $status)"
  [ $status -ne 0 ] && [ "$verdict" = PASS ] && verdict="FAIL (exit $status)"
  [ "$verdict" != PASS ] && FAILED=$((FAILED + 1))
  { echo; echo "## $title: $verdict in $((SECONDS - start))s"; echo; echo '```'; tail -n 25 "$log"; echo '```'; } \
    >> "$REPORT"
  echo "$title: $verdict"
}

train() {  # train RUN_DIR extra --set overrides...
  local dir=$1; shift
  "$PY" -m moeyard train --nproc 1 --set run.dir="$dir" --set parallel.ep=1 --set train.steps="$TOTAL" \
    --set train.global_batch_tokens=2048 --set log.every=1 "$@"
}

train_stop_resume() {
  train "$WORK/run" --set train.stop_at="$STOP" && train "$WORK/run" || return 1
  "$PY" - "$WORK/run/metrics.jsonl" "$TOTAL" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip() and "loss" in json.loads(l)]
steps = [r["step"] for r in rows]
print("steps logged:", steps[0], "..", steps[-1], "| last loss", rows[-1]["loss"], "| peak GB", rows[-1].get("peak_memory_gb"))
assert steps[-1] == int(sys.argv[2]) and steps == sorted(set(steps)), "the resumed run did not continue the first"
PY
}

row_at_stop() {  # row_at_stop METRICS: the metrics row of step $STOP (exit 1 without one)
  "$PY" -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if l.strip() and json.loads(l).get('step') == $STOP][-1];
print('peak_memory_gb', r.get('peak_memory_gb'), 'loss', r['loss'])" "$1" 2>/dev/null
}

state_memory() {  # the replicated run is step 4's first process (parallel.fsdp=false), up to its stop
  for fsdp in false true; do
    local dir="$WORK/state-$fsdp"
    if [ $fsdp = false ] && row_at_stop "$WORK/run/metrics.jsonl" > /dev/null; then
      dir="$WORK/run"
    else  # the same schedule as step 4's run (train.steps=$TOTAL), stopped at the same step
      train "$dir" --set train.stop_at="$STOP" --set parallel.fsdp=$fsdp > "$WORK/state-$fsdp.log" 2>&1 \
        || { tail -n 20 "$WORK/state-$fsdp.log"; return 1; }
    fi
    local row
    row=$(row_at_stop "$dir/metrics.jsonl") || { echo "no metrics row at step $STOP in $dir"; return 1; }
    echo "parallel.fsdp=$fsdp: $row"
  done
}

export -f train train_stop_resume row_at_stop state_memory
step "1. grouped-GEMM probe (counts with zeros vs a float32 loop)" 60 "$PY" benchmarks/gpu_probe.py grouped --device $DEVICE
step "2a. host syncs of a MoE layer fwd+bwd (sync debug mode)" 60 "$PY" benchmarks/gpu_probe.py syncs --device $DEVICE
if [ "$SMOKE" = 0 ]; then
  # One process, without the suite's xdist workers (addopts): the device's Python has no pytest-xdist.
  step "2b. GPU-only tests" 90 "$PY" -m pytest -q -p no:cacheprovider -o "addopts=--import-mode=importlib -ra" \
    -k "cuda or gpu" tests/unit/models
fi
step "3. Mixtral-shaped MoE layer fwd+bwd" 120 "$PY" benchmarks/moe_layer_gpu.py --device $DEVICE --no-mfu \
  "${LAYER[@]}" --out "$WORK/moe_layer"
step "4. moeyard train on one device, stop at $STOP, resume to $TOTAL" 150 bash -c train_stop_resume
step "5. peak memory, replicated vs FSDP2-sharded state" 120 bash -c state_memory
echo "report: $REPORT ($FAILED failed, ${SECONDS}s)"
echo "- total: ${SECONDS}s, $FAILED step(s) not passed" >> "$REPORT"
exit $FAILED
