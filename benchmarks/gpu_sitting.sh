#!/usr/bin/env bash
# A GPU sitting: rljax's GPU benchmark, and the plain-JAX / Hugging Face anchor in the same call so
# that their figures share a machine (the anchor script is not part of this repository).
#
#   benchmarks/gpu_sitting.sh [compare|rl] [ANCHOR_SCRIPT] [OUT_DIR]
#
# Two sittings, each sized for one 10-minute device call on a slow host (about 9.5 minutes in all;
# a lent machine's host CPU differs between loans: one compiled the train step in 42 s, the next in
# 69 s, and the anchor's train part then ran past its own 150 s limit):
#   compare  the figures set side by side with the anchor, in one call:
#            rljax  --parts train,decode --train-layouts anchor,mixed --decode-streams bfloat16
#                   (limit RLJAX_GPU_LIMIT, 200 s)
#            anchor --parts env,jax_train,jax_decode --budget 370 --timeout 370
#                   (limit ANCHOR_LIMIT, 380 s; --timeout lifts its fixed per-part limits, so each
#                   part may use what the budget has left)
#   rl       rljax's own parts, each in a fresh process (a part's leftovers in the device allocator's
#            pool split the memory a large batch needs):
#            --parts grpo (150 s), --parts fit --fit-remat none (90 s), --parts fit --fit-remat full
#            (90 s), --parts profile --profile-dir OUT_DIR/profile (240 s)
# RLJAX_GPU_ARGS / ANCHOR_ARGS replace compare's arguments, e.g. ANCHOR_ARGS="--parts
# torch_train,torch_generate_static --budget 370 --timeout 370" for Hugging Face; `--parts check`
# (KV cache == full forward, cuDNN ~= XLA attention on the device) fits in either call's slack.
# RLJAX_GPU_EXTRA is added to every rljax process (a dry run on a CPU: RLJAX_GPU_EXTRA=--tiny).
# PYTHON: an interpreter whose jax sees the GPU (default .venv/bin/python; the project's .venv
# installs CPU jax: add jax[cuda12] there, or point PYTHON at an environment that has it).
set -u
SITTING=${1:-compare}
ANCHOR=${2:-}
OUT=${3:-gpu-sitting}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

rljax() {  # rljax LIMIT LOG ARGS...: one benchmarks.gpu process under its own time limit
  local limit=$1 log=$2
  shift 2
  # shellcheck disable=SC2086
  timeout "$limit" "$PY" -m benchmarks.gpu "$@" ${RLJAX_GPU_EXTRA:-} 2>&1 | tee -a "$OUT/$log"
}

case "$SITTING" in
  compare)
    # shellcheck disable=SC2086  # the argument strings are split into words on purpose
    rljax "${RLJAX_GPU_LIMIT:-200}" rljax.txt \
      ${RLJAX_GPU_ARGS:---parts train,decode --train-layouts anchor,mixed --decode-streams bfloat16}
    if [ -n "$ANCHOR" ]; then
      # shellcheck disable=SC2086
      timeout "${ANCHOR_LIMIT:-380}" "$PY" "$ANCHOR" --out "$OUT/anchor.jsonl" \
        ${ANCHOR_ARGS:---parts env,jax_train,jax_decode --budget 370 --timeout 370} 2>&1 | tee "$OUT/anchor.txt"
    fi
    ;;
  rl)
    rljax 150 rl.txt --parts grpo
    rljax 90 rl.txt --parts fit --fit-remat none
    rljax 90 rl.txt --parts fit --fit-remat full
    rljax 240 rl.txt --parts profile --profile-dir "$OUT/profile"
    ;;
  *)
    echo "gpu_sitting.sh: the sitting must be compare or rl, not '$SITTING'" >&2
    exit 2
    ;;
esac
