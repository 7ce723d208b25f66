#!/usr/bin/env bash
# A GPU sitting: rljax's GPU benchmark, and the plain-JAX / Hugging Face anchor in the same call so
# that their figures share a machine (the anchor script is not part of this repository).
#
#   benchmarks/gpu_sitting.sh compare|rl|profile [ANCHOR_SCRIPT] [OUT_DIR]
#
# Sized for a loan of 900 s of device time on a slow host (a lent machine's host differs between
# loans: one compiled the train step in 42 s, the next in 69 s, and the anchor's train part then ran
# past its own 150 s limit; starting the machine took ~31 s): compare, then rl at once in a second
# call (~580 + ~270 s), profile in another loan.
#   compare  the figures set side by side with the anchor, in one call:
#            rljax  --parts train,decode --train-layouts anchor,mixed --decode-streams bfloat16
#                   (limit RLJAX_GPU_LIMIT, 180 s)
#            anchor --parts env,jax_train,jax_decode --budget 390 --timeout 390
#                   (limit ANCHOR_LIMIT, 400 s; --timeout lifts its fixed per-part limits, so each
#                   part may use what the budget has left)
#   rl       rljax's own parts, each in a fresh process (a part's leftovers in the device allocator's
#            pool split the memory a large batch needs): --parts grpo (130 s), --parts fit
#            --fit-remat none (70 s), --parts fit --fit-remat full (70 s)
#   profile  --parts profile --profile-dir OUT_DIR/profile (240 s): traces of the train step, a
#            decode call and GRPO's sampling
# RLJAX_GPU_ARGS / ANCHOR_ARGS replace compare's arguments, e.g. ANCHOR_ARGS="--parts
# torch_train,torch_generate_static --budget 390 --timeout 390" for Hugging Face; `--parts check`
# (KV cache == full forward, cuDNN ~= XLA attention on the device) fits in a call's slack.
# RLJAX_GPU_EXTRA is added to every rljax process (a dry run on a CPU: RLJAX_GPU_EXTRA=--tiny).
# PYTHON: an interpreter whose jax sees the GPU (default .venv/bin/python; the project's .venv
# installs CPU jax: add jax[cuda12] there, or point PYTHON at an environment that has it).
set -u
SITTING=${1:-compare}
ANCHOR=${2:-}
OUT=${3:-gpu-sitting}
PY=${PYTHON:-.venv/bin/python}
case "$SITTING" in
  compare|rl|profile) ;;
  *)
    echo "gpu_sitting.sh: the sitting must be compare, rl or profile, not '$SITTING'" >&2
    exit 2
    ;;
esac
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
    rljax "${RLJAX_GPU_LIMIT:-180}" rljax.txt \
      ${RLJAX_GPU_ARGS:---parts train,decode --train-layouts anchor,mixed --decode-streams bfloat16}
    if [ -n "$ANCHOR" ]; then
      # shellcheck disable=SC2086
      timeout "${ANCHOR_LIMIT:-400}" "$PY" "$ANCHOR" --out "$OUT/anchor.jsonl" \
        ${ANCHOR_ARGS:---parts env,jax_train,jax_decode --budget 390 --timeout 390} 2>&1 | tee "$OUT/anchor.txt"
    fi
    ;;
  rl)
    rljax 130 rl.txt --parts grpo
    rljax 70 rl.txt --parts fit --fit-remat none
    rljax 70 rl.txt --parts fit --fit-remat full
    ;;
  profile)
    rljax 240 profile.txt --parts profile --profile-dir "$OUT/profile"
    ;;
esac
