#!/usr/bin/env bash
# The device check: one script for a lent GPU machine, offline, each step under `timeout`, a report file.
#   bash benchmarks/gpu_check.sh                       # one GPU; report: benchmarks/results/gpu_check.md
#   bash benchmarks/gpu_check.sh --gpus 8              # also the multi-GPU steps (NCCL), when N >= 2
#   bash benchmarks/gpu_check.sh --smoke [--gpus 2]    # CPU (gloo ranks), tiny shapes: checks the script itself
#   bash benchmarks/gpu_check.sh --python /usr/bin/python3 --report FILE --budget 470
# Steps: (1) grouped-GEMM probe, counts with zeros, vs a float32 loop; (2) the host sync count under
# torch.cuda.set_sync_debug_mode and the GPU-only tests; (3) a Mixtral-shaped MoE layer fwd+bwd (time,
# memory); (4) `moeyard train` on one device, stopped and resumed; (5) peak memory with replicated vs
# FSDP2-sharded state; (6) each attention path (MLA, sinks + window, packed documents): the kernel chosen,
# its output against the unfused path, its speed against plain causal attention of the same size. With
# --gpus N >= 2: (7) NCCL all-to-all, flat and hierarchical, against the one-device layer; (8) peak memory per
# rank, replicated vs FSDP2 over N ranks; (9) the pipelined exchange's overlap, r = 2 and 4 against r = 1.
# Offline: moeyard is imported from this clone (a folder of links on PYTHONPATH: nothing is installed or
# fetched); a step whose Python modules are missing is skipped, naming them. A failed step is reported and
# the next one still runs. The step limits are scaled to fit the budget (default 470 s), so the whole run
# holds it. Exit status: the number of failed steps.
set -uo pipefail
SMOKE=0
REPORT=
GPUS=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --report) REPORT="$(realpath -m "$2")"; shift ;;
    --gpus) GPUS=$2; shift ;;
    --python) PY=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "unknown argument $1 (use --smoke, --gpus N, --python PY, --budget S, --report FILE)" >&2; exit 2 ;;
  esac
  shift
done
case "$GPUS" in ''|*[!0-9]*) echo "--gpus takes a whole number of GPUs, not '$GPUS'" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
REPORT=${REPORT:-$PWD/benchmarks/results/gpu_check.md}
PY=$(command -v "$PY") || { echo "no Python at '$PY' (give one with --python)" >&2; exit 2; }
PY=$(realpath -m "$PY")  # the steps run from another directory
case "$BUDGET" in ''|*[!0-9]*) echo "--budget takes whole seconds, not '$BUDGET'" >&2; exit 2 ;; esac
[ "$BUDGET" -ge 120 ] || { echo "--budget $BUDGET is too short for the steps (at least 120 s)" >&2; exit 2; }
"$PY" -c "import torch" 2>/dev/null || { echo "$PY cannot import torch: give the Python that has it (--python)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# moeyard from this clone, as pyproject's package-dir maps it, without pip: nothing to fetch or build.
"$PY" - "$WORK/pkg" <<'PY' || { echo "cannot lay out moeyard from this clone" >&2; exit 2; }
import os, re, sys
root, pkg = os.getcwd(), sys.argv[1]
text = open("pyproject.toml").read().split("[tool.setuptools.package-dir]")[1].split("\n[")[0]
for name, folder in re.findall(r'"(moeyard(?:\.\w+)?)"\s*=\s*"([^"]+)"', text):
    if name == "moeyard":
        os.makedirs(f"{pkg}/moeyard")
        for f in os.listdir(folder):
            if f != "__pycache__":
                os.symlink(f"{root}/{folder}/{f}", f"{pkg}/moeyard/{f}")
for name, folder in re.findall(r'"(moeyard(?:\.\w+)?)"\s*=\s*"([^"]+)"', text):
    if name != "moeyard":
        os.symlink(f"{root}/{folder}", f"{pkg}/moeyard/{name.split('.')[1]}")
PY
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=cuda; SMOKE_FLAG=(); TOTAL=20; STOP=10
if [ "$SMOKE" = 1 ]; then DEVICE=cpu; SMOKE_FLAG=(--smoke); TOTAL=4; STOP=2; fi
export WORK TOTAL STOP PY
mkdir -p "$(dirname "$REPORT")"
FAILED=0
SKIPPED=0
{
  echo "# moeyard device check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); device: $DEVICE; gpus: $GPUS; smoke: $SMOKE; budget: ${BUDGET}s"
  "$PY" -c "import sys, torch; print('- python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
    torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} > "$REPORT" 2>&1

# From here on the steps run outside the clone: `python -m` and `-c` put the working directory first on
# sys.path, where the clone's own moeyard/ folder (the package root without its sub-packages) would shadow
# the laid-out package.
REPO=$PWD
cd "$WORK"

# Each step: title, its share of the budget (seconds at the default 470 s), the Python modules it needs,
# then its command. The steps are listed once (all_steps, below) and walked twice: first to add up the
# shares of those that will run, then to run them with limits scaled to add up to --budget.
count_step() {  # the first walk: shares and steps
  SHARES=$((SHARES + $2)); STEPS=$((STEPS + 1))
}

run_step() {  # run_step "title" SHARE_S "module module" command...
  local title=$1 share=$2 needs=$3; shift 3
  local log="$WORK/step.log" start=$SECONDS status limit=$((share * SCALE_NUM / SHARES))
  local missing
  missing=$("$PY" -c "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" $needs)
  if [ -n "$missing" ]; then
    SKIPPED=$((SKIPPED + 1))
    { echo; echo "## $title: SKIPPED (missing Python modules: $missing; install them into $PY)"; } >> "$REPORT"
    echo "$title: SKIPPED (missing $missing)"
    return
  fi
  timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1
  status=$?
  local verdict=PASS
  [ $status -eq 124 ] || [ $status -eq 137 ] && verdict="TIMEOUT after ${limit}s (or killed: exit $status)"
  [ $status -ne 0 ] && [ "$verdict" = PASS ] && verdict="FAIL (exit $status)"
  [ "$verdict" != PASS ] && FAILED=$((FAILED + 1))
  { echo; echo "## $title: $verdict in $((SECONDS - start))s (limit ${limit}s)"; echo; echo '```'; tail -n 25 "$log"; echo '```'; } \
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

layer_benchmark() {  # the one-GPU layer table, then its JSON on one line (the suite's smoke reads it there)
  local mfu=(--no-mfu)
  [ "$SMOKE" = 1 ] && mfu=()  # the smoke also checks the MFU run (a real moeyard train) works; a GPU skips it
  "$PY" "$REPO"/benchmarks/moe_layer_gpu.py --device "$DEVICE" "${mfu[@]}" "$@" --out "$WORK/moe_layer" || return 1
  "$PY" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))" "$WORK/moe_layer.json"
}

export SMOKE DEVICE REPO
export -f train train_stop_resume row_at_stop state_memory layer_benchmark
TRAIN_NEEDS="yaml safetensors numpy"
all_steps() {
  step "1. grouped-GEMM probe (counts with zeros vs a float32 loop)" 40 "" "$PY" "$REPO"/benchmarks/gpu_probe.py grouped --device $DEVICE
  step "2a. host syncs of a MoE layer fwd+bwd (sync debug mode)" 50 "" "$PY" "$REPO"/benchmarks/gpu_probe.py syncs --device $DEVICE
  if [ "$SMOKE" = 0 ]; then
    # One process, without the suite's xdist workers (addopts): the device's Python has no pytest-xdist.
    step "2b. GPU-only tests" 50 "pytest numpy yaml" "$PY" -m pytest -q -p no:cacheprovider \
      -o "addopts=--import-mode=importlib -ra" -k "cuda or gpu" "$REPO"/tests/unit/models
  fi
  step "2c. FP8 GEMMs (train.fp8) against bf16: error, ms, cast bytes" 30 "" "$PY" "$REPO"/benchmarks/gpu_probe.py fp8 \
    --device $DEVICE "${SMOKE_FLAG[@]}"
  step "3. Mixtral-shaped MoE layer fwd+bwd" 60 "" bash -c 'layer_benchmark "$@"' _ "${SMOKE_FLAG[@]}"
  step "4. moeyard train on one device, stop at $STOP, resume to $TOTAL" 80 "$TRAIN_NEEDS" bash -c train_stop_resume
  step "5. peak memory, replicated vs FSDP2-sharded state" 60 "$TRAIN_NEEDS" bash -c state_memory
  step "6. attention paths: kernel chosen, output, speed vs plain causal" 50 "" "$PY" "$REPO"/benchmarks/gpu_probe.py attention \
    --device $DEVICE "${SMOKE_FLAG[@]}"
  if [ "$GPUS" -ge 2 ]; then
    step "7. $GPUS ranks: NCCL all-to-all, flat and hierarchical, vs one device" 60 "" "$PY" "$REPO"/benchmarks/gpu_multi.py \
      exchange --nproc "$GPUS" --device $DEVICE "${SMOKE_FLAG[@]}"
    step "8. $GPUS ranks: peak memory per rank, replicated vs FSDP2" 50 "" "$PY" "$REPO"/benchmarks/gpu_multi.py fsdp \
      --nproc "$GPUS" --device $DEVICE "${SMOKE_FLAG[@]}"
    step "9. $GPUS ranks: pipelined exchange overlap, r = 2 and 4 vs r = 1" 60 "" "$PY" "$REPO"/benchmarks/gpu_multi.py overlap \
      --nproc "$GPUS" --device $DEVICE "${SMOKE_FLAG[@]}"
  fi
}
SHARES=0; STEPS=0
step() { count_step "$@"; }
all_steps
# 20 s for the report and the layout above, and each step's 5 s of grace after its limit (timeout --kill-after)
SCALE_NUM=$((BUDGET - 20 - 5 * STEPS))
step() { run_step "$@"; }
all_steps
echo "report: $REPORT ($FAILED failed, $SKIPPED skipped, ${SECONDS}s)"
echo "- total: ${SECONDS}s of ${BUDGET}s, $FAILED step(s) failed, $SKIPPED skipped for missing modules" >> "$REPORT"
exit $FAILED
