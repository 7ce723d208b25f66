#!/usr/bin/env bash
# One GPU sitting: rljax's GPU benchmark and the plain-JAX / Hugging Face anchor in the same call,
# so their figures share a machine (the anchor script is not part of this repository).
#
#   benchmarks/gpu_sitting.sh [ANCHOR_SCRIPT] [OUT_DIR]
#
# Runs `python -m benchmarks.gpu` (check, train, decode, grpo, profile, then fit: the slowest part
# last), then ANCHOR_SCRIPT --out OUT_DIR/anchor.jsonl when given; each under its own time limit
# (RLJAX_GPU_LIMIT, ANCHOR_LIMIT seconds), so one hang cannot spend the other's time.
# RLJAX_GPU_ARGS / ANCHOR_ARGS: extra arguments for each. Everything at once needs more than one
# 10-minute call (2026-12-04 on an H200: check + three train layouts + two decode streams + grpo +
# profile 330 s; the anchor's env, peak, jax_train, jax_decode and torch_train 255 s). One call of
# about 8 minutes that still has both sides' train step and decode:
#   RLJAX_GPU_LIMIT=270 RLJAX_GPU_ARGS="--parts train,decode,grpo,profile --train-layouts anchor,mixed
#     --decode-streams bfloat16 --profile-dir /tmp/prof" ANCHOR_LIMIT=240
#     ANCHOR_ARGS="--parts env,jax_train,jax_decode --budget 230"
# PYTHON: an interpreter whose jax sees the GPU (default .venv/bin/python; the project's .venv
# installs CPU jax: add jax[cuda12] there, or point PYTHON at an environment that has it).
set -u
ANCHOR=${1:-}
OUT=${2:-gpu-sitting}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
timeout "${RLJAX_GPU_LIMIT:-420}" "$PY" -m benchmarks.gpu ${RLJAX_GPU_ARGS:-} 2>&1 | tee "$OUT/rljax.txt"
if [ -n "$ANCHOR" ]; then
  timeout "${ANCHOR_LIMIT:-360}" "$PY" "$ANCHOR" --out "$OUT/anchor.jsonl" ${ANCHOR_ARGS:-} 2>&1 | tee "$OUT/anchor.txt"
fi
