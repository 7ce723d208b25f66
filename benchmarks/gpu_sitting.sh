#!/usr/bin/env bash
# One GPU sitting: rljax's GPU benchmark and the plain-JAX / Hugging Face anchor in the same call,
# so their figures share a machine (the anchor script is not part of this repository).
#
#   benchmarks/gpu_sitting.sh [ANCHOR_SCRIPT] [OUT_DIR]
#
# Runs `python -m benchmarks.gpu`, then ANCHOR_SCRIPT --out OUT_DIR/anchor.jsonl when given, each
# under its own time limit (RLJAX_GPU_LIMIT, ANCHOR_LIMIT seconds), so one hang cannot spend the
# other's time. The defaults fit one 10-minute call of a lent machine (about 9 minutes in all):
#   rljax  --parts train,decode,grpo,profile --train-layouts anchor,mixed
#          --decode-streams bfloat16 --profile-dir OUT_DIR/profile         (limit 300 s)
#   anchor --parts env,jax_train,jax_decode --budget 235                   (limit 240 s)
# (2026-12-04 on an H200: the anchor's jax_train took 119 s and jax_decode 107 s; rljax's check,
# three train layouts, two decode streams, grpo and profile 330 s; the device check (`--parts check`:
# KV cache == full forward, cuDNN ~= XLA attention) passed then.) RLJAX_GPU_ARGS / ANCHOR_ARGS
# replace those arguments, e.g. RLJAX_GPU_ARGS="--parts fit" for the largest batch (slow: one
# compile per size), ANCHOR_ARGS="--parts torch_train,torch_generate_static" for Hugging Face.
# PYTHON: an interpreter whose jax sees the GPU (default .venv/bin/python; the project's .venv
# installs CPU jax: add jax[cuda12] there, or point PYTHON at an environment that has it).
set -u
ANCHOR=${1:-}
OUT=${2:-gpu-sitting}
PY=${PYTHON:-.venv/bin/python}
RLJAX_ARGS=${RLJAX_GPU_ARGS:---parts train,decode,grpo,profile --train-layouts anchor,mixed --decode-streams bfloat16 --profile-dir $OUT/profile}
PEER_ARGS=${ANCHOR_ARGS:---parts env,jax_train,jax_decode --budget 235}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
# shellcheck disable=SC2086  # the argument strings are split into words on purpose
timeout "${RLJAX_GPU_LIMIT:-300}" "$PY" -m benchmarks.gpu $RLJAX_ARGS 2>&1 | tee "$OUT/rljax.txt"
if [ -n "$ANCHOR" ]; then
  # shellcheck disable=SC2086
  timeout "${ANCHOR_LIMIT:-240}" "$PY" "$ANCHOR" --out "$OUT/anchor.jsonl" $PEER_ARGS 2>&1 | tee "$OUT/anchor.txt"
fi
