#!/usr/bin/env bash
# Everything drpo's GPU claims rest on, in one command for a lent GPU machine (docs/performance.md,
# "GPU"): CUDA tests, the objectives and log-prob benchmarks, `drpo train` and TRL steps on CUDA.
#
#   scripts/gpu-check.sh OUT_DIR                # on the GPU machine, after `make gpu-wheels` here
#   scripts/gpu-check.sh --cpu-dry-run OUT_DIR  # the same steps on the CPU at tiny sizes (CI runs it)
#
# The wheels the GPU machine lacks (.gpu-wheels/, `make gpu-wheels`) are installed into a temporary
# folder with pip --no-index --no-deps --target, only those whose package is missing there
# (scripts/gpu/wheel_plan.py logs each decision); drpo runs from src/. Each step has its own time
# limit and log (OUT_DIR/<step>.log); a failed step does not stop the next. OUT_DIR ends with 8
# files: 6 logs, summary.md and summary.json. Exit 0 only when every step passed.
# Environment: PYTHON (default python3), GPU_WHEELS (default .gpu-wheels), GPU_CHECK_COMMIT (the
# commit to name where there is no .git), GPU_CHECK_LIMIT_SCALE (multiplies every step's limit,
# for a machine shared with other work; default 1).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=gpu
if [ "${1:-}" = "--cpu-dry-run" ]; then MODE=cpu-dry-run; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu-check.sh [--cpu-dry-run] OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
STEP_PID=
trap 'rm -rf "$WORK"' EXIT
# Stopped from outside: stop the running step too (timeout(1) leads its own process group).
trap '[ -n "$STEP_PID" ] && kill -TERM -- "-$STEP_PID" 2>/dev/null; exit 143' TERM INT
export ROOT MODE OUT WORK
export PY=${PYTHON:-python3} WHEELS=${GPU_WHEELS:-$ROOT/.gpu-wheels} SITE=$WORK/site
export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DRPO_CACHE=$WORK/cache  # the warm start is measured from scratch, and nothing lands in ~/.cache
export QWEN=$WORK/qwen2  # the random Qwen2-shaped policy, built in set-up, used by train and trl
cd "$ROOT" || exit 2
echo "${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" > "$WORK/commit"

# Sizes and time limits (seconds) per mode. GPU limits sum to 475 s, so the script ends within
# 8 minutes on one H100/H200 even if every step runs into its limit (estimates from the sizes,
# not yet measured: set-up 15 s, pytest 60, objectives 20, logprobs 80, train 60, trl 35).
if [ "$MODE" = gpu ]; then
  export DEVICE=cuda
  # Qwen2-0.5B's shape; built on the GPU, written in bf16 (1 GB).
  export QWEN_SHAPE="--device cuda"
  # 2^22 tokens (the issue's >= 4M), 20 timed rounds of 8 methods: ~2-5 ms each.
  export OBJ_ARGS="--device cuda --tokens 4194304 --repeats 20"
  # Qwen2-0.5B's LM head at 32k tokens, bf16: the naive case's fp32 logits are 20 GB (peak ~60 GB);
  # 7 cases, one full-size warm-up and 3 timed runs each; torch.compile's compilation ~30 s.
  export LP_ARGS="--device cuda --dtype bf16 --tokens 32768 --vocab 151936 --hidden 896 --seq-len 1024 --repeats 3"
  # The tiny default as shipped (SFT warm start, then RL), 20 steps.
  export TINY_ARGS="--config configs/default.yaml --set train.device=cuda --set train.steps=20"
  # 0.5B policy, bf16 rollouts: 8 prompts x 8 samples x 32 new tokens, 5 steps of 4 updates,
  # eval at start and end on 64 prompts, no checkpoint (6 GB of weights and optimizer state).
  export QWEN_ARGS="--set train.device=cuda --set rollout.precision=bf16 --set train.steps=5 \
    --set rollout.prompts_per_step=8 --set rollout.n_samples=8 --set rollout.max_new_tokens=32 \
    --set task.eval_size=64 --set train.eval_every=100 --set train.save_every=100 --set train.save_final=false"
  # 4 optimizer steps per trainer, 16 completions (2 prompts x 8) of 32 tokens, fp32 (exact comparison).
  export TRL_ARGS="--device cuda --steps 4 --batch 16 --generations 8 --completion-len 32"
  LIMITS=(setup=45 pytest=110 objectives=45 logprobs=120 train=100 trl=55)
else
  export DEVICE=cpu
  export QWEN_SHAPE="--hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128"  # real vocabulary
  export OBJ_ARGS="--tokens 16384 --repeats 3"
  export LP_ARGS="--tokens 256 --vocab 2048 --hidden 32 --seq-len 64 --repeats 1 --chunk-size 64 \
    --cases naive,drpo,trl,liger,drpo_fused,compile"  # liger_ce: a Triton kernel, CUDA only
  export TINY_ARGS="--config configs/default.yaml --set train.steps=2 --set model.hidden_size=32 \
    --set model.num_layers=1 --set model.num_heads=2 --set model.intermediate_size=64 --set warmstart.steps=5 \
    --set warmstart.check_size=16 --set warmstart.on_miss=continue --set task.eval_size=16 \
    --set rollout.prompts_per_step=4 --set rollout.n_samples=4"
  export QWEN_ARGS="--set rollout.precision=bf16 --set train.steps=2 --set rollout.prompts_per_step=2 \
    --set rollout.n_samples=4 --set rollout.max_new_tokens=4 --set task.eval_size=4 --set train.save_final=false"
  export TRL_ARGS="--device cpu --steps 2 --batch 4 --generations 4 --completion-len 4"
  # Limits ~3x a 2-core CPU's time for each step, so a slow CI machine still passes (all: ~2.5 CPU min).
  LIMITS=(setup=60 pytest=90 objectives=90 logprobs=180 train=180 trl=120)
fi

step_setup() {
  if [ -d "$WHEELS" ]; then
    local plan
    plan=$("$PY" scripts/gpu/wheel_plan.py "$WHEELS") || return 1
    if [ -n "$plan" ]; then
      # shellcheck disable=SC2086  # one wheel path per line, none with spaces (pip's file names)
      "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $plan || return 1
    else
      echo "every wheel's package is already installed here: nothing to install"
    fi
  else
    echo "no $WHEELS (make gpu-wheels): nothing installed, using what this Python has"
  fi
  "$PY" - <<'EOF' || return 1
import importlib
for name in ("pydantic", "trl", "datasets", "liger_kernel", "drpo"):
    m = importlib.import_module(name)
    print(f"import {name} {getattr(m, '__version__', '')} from {m.__file__}")
EOF
  # shellcheck disable=SC2086
  "$PY" scripts/gpu/qwen2_policy.py "$QWEN" $QWEN_SHAPE > "$WORK/setup_policy.json" && cat "$WORK/setup_policy.json"
}

step_pytest_cuda() {
  # Only the files that mark tests `cuda` (collecting the whole suite costs a minute of CPU).
  local files
  files=$(grep -l --include='test_*.py' -r 'mark\.cuda' tests | grep -v '^tests/integrations/verl/') || return 1
  # shellcheck disable=SC2086
  "$PY" -m pytest -m cuda $files -q -rfEs -p no:cacheprovider --junitxml="$WORK/pytest.xml"
}

step_objectives() {
  local dtype rc=0
  for dtype in bf16 fp32; do
    # shellcheck disable=SC2086
    "$PY" benchmarks/objectives.py $OBJ_ARGS --dtype $dtype --json "$WORK/objectives_$dtype.json" || rc=1
  done
  return $rc
}

step_logprobs() {
  # shellcheck disable=SC2086
  "$PY" benchmarks/logprobs.py $LP_ARGS --json "$WORK/logprobs.json"
}

step_train() {
  local rc=0
  # shellcheck disable=SC2086
  "$PY" scripts/gpu/train_run.py --label tiny --json "$WORK/train_tiny.json" --out "$WORK/run-tiny" $TINY_ARGS || rc=1
  # shellcheck disable=SC2086
  "$PY" scripts/gpu/train_run.py --label qwen2 --json "$WORK/train_qwen2.json" --out "$WORK/run-qwen2" \
    --model "$QWEN" $QWEN_ARGS || rc=1
  return $rc
}

step_trl() {
  # shellcheck disable=SC2086
  "$PY" scripts/gpu/trl_steps.py --model "$QWEN" --json "$WORK/trl.json" $TRL_ARGS
}

export -f step_setup step_pytest_cuda step_objectives step_logprobs step_train step_trl

# CPU seconds (user + system) of this shell's finished children so far: a step's cost that a
# busy machine does not inflate, unlike its wall-clock time.
# (`times` runs in this shell, not in a $(...) subshell, which has no children of its own.)
children_cpu() {
  times > "$WORK/times"
  tail -n 1 "$WORK/times" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); t += p[1] * 60 + p[2] } printf "%.1f", t }'
}

# run_step NAME FUNCTION: the function under its limit, its output in OUT_DIR/NAME.log, its exit
# code, wall and CPU seconds in WORK/steps.tsv (timeout(1) signals the whole process group at the limit).
run_step() {
  local name=$1 fn=$2 limit start cpu0 rc seconds cpu
  limit=$(printf '%s\n' "${LIMITS[@]}" | sed -n "s/^$name=//p")
  limit=$(awk -v l="$limit" -v s="${GPU_CHECK_LIMIT_SCALE:-1}" 'BEGIN { printf "%d", l * s }')
  start=$(date +%s.%N)
  children_cpu > "$WORK/cpu0"; cpu0=$(cat "$WORK/cpu0")
  echo "== $name ($MODE, limit ${limit} s)" > "$OUT/$name.log"
  timeout --kill-after=10 "$limit" bash -c "$fn" >> "$OUT/$name.log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"  # in the background, so that the TERM trap runs at once
  rc=$?
  STEP_PID=
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  children_cpu > "$WORK/cpu1"
  cpu=$(awk -v a="$cpu0" -v b="$(cat "$WORK/cpu1")" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$cpu" "$limit" >> "$WORK/steps.tsv"
  echo "gpu-check: $name exit $rc in $seconds s, CPU $cpu s (limit $limit s)"
}

run_step setup step_setup
run_step pytest step_pytest_cuda
run_step objectives step_objectives
run_step logprobs step_logprobs
run_step train step_train
run_step trl step_trl
"$PY" scripts/gpu/summarize.py "$WORK" "$OUT" "$MODE"
