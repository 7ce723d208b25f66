"""Which library runs XLA:CPU's matrix products in rljax's full-sequence programs.

XLA:CPU hands each matrix product to one of two libraries: YNNPACK (its default in jax 0.10) or,
with `xla_cpu_experimental_ynn_fusion_type` leaving products out, Eigen's blocked kernels. Which
one is faster depends on the CPU and on the shapes. On the 2-core AMD EPYC (AVX2, no AVX-512) these figures were
taken on, the same compiled program run both ways in one process, alternated six times
(`python -m benchmarks.cpu_dots`; docs/performance.md):

| program | YNNPACK | Eigen |
| --- | --- | --- |
| train step, 128 rows x 136 tokens, d256 x 4 layers, MLP 1024 (the GRPO update's shape) | 4.06-4.59 s | 3.74-4.25 s (6-12% faster) |
| train step, 32 x 128 tokens, MLP 688 (the torch comparison's shape) | 686-868 ms | 661-784 ms (4-10% faster) |
| train step, 32 x 97 tokens, MLP 1024 (DPO's shape), float32 | 651-676 ms | 651-683 ms (the same) |
| the same in bfloat16 compute | 773 ms | 660 ms (15% faster) |
| sampling, 128 rows x 128 new tokens (products of 128 rows) | 1.95-2.06 s | 2.03-2.04 s (0-4% slower) |

The GRPO iteration itself, both builds alternated in one process (`python -m benchmarks.grpo_step
--which trl --track-kl off --compare-dots`): the update 4.99 -> 4.66 s (Eigen faster in 6 of 6
iterations), the iteration 6.95 -> 6.71 s.
Products of many rows ([17,408, 256] @ [256, 1024]: 126 against 164 GFLOP/s) favour Eigen here;
a decode step's products of a few rows favour YNNPACK. So rljax compiles the programs that run
whole sequences (every phase's train step, `compile_step`, and the scoring passes for reference
log-probs and values, `jit_full_sequence`) with Eigen's products on CPUs of that kind, and leaves
sampling with XLA's default:

    RLJAX_CPU_DOTS=auto     # the default: Eigen on x86 CPUs with AVX2 and without AVX-512; on CPUs
                            # with avx512_bf16 (AMX ones included) for float32 programs only
    RLJAX_CPU_DOTS=eigen    # Eigen on every CPU
    RLJAX_CPU_DOTS=ynn      # XLA's default everywhere

On a 2-core AMD EPYC with AVX-512 and avx512_bf16 (same benchmark, 4 rounds) float32 programs
favour Eigen too (GRPO update shape 2,306 -> 2,006 ms, 0.870x, 4 of 4; in the GRPO iteration the
update 0.727x; torch shape 0.943x; DPO shape 1.001x) and bfloat16-compute programs YNNPACK (Eigen
1.071x the GRPO update, 1.096x the DPO step, slower in every round), so there `auto` picks by the
program's compute dtype. On a 2-core Intel Xeon with AMX (amx_tile, amx_bf16; it has avx512_bf16
too), the same benchmark, 4 rounds: float32 Eigen 0.941x the GRPO update shape (4 of 4), 1.007x the
torch shape, 0.999x DPO, 1.021x sampling; bfloat16 Eigen 1.307x, 1.294x, 1.402x, 1.310x (slower in
every round): the same picture, so `auto` treats AMX CPUs like the avx512_bf16 ones. There bf16
compute is the fast setting: with YNNPACK's products the GRPO update's step took 2,114 ms against
float32's 2,664 (Eigen), the DPO step 336 against 463 ms, sampling 1,549 against 1,950 ms. Other
AVX-512 CPUs (no avx512_bf16) were not measured: `auto` leaves them with XLA's default.
Train steps ask for Eigen's products as YNNPACK fusions of reductions only (`EIGEN_PRODUCTS`), not
as no YNNPACK fusions at all (the option empty, as before 2026-12-05): XLA's default hands the
reductions (the norms' and softmax's sums, the gradients' sums over tokens) to YNNPACK as well, and
without it XLA:CPU splits every float sum of more than 32 elements into a reduce-window over windows
of 32 and a second reduce, run as generic loops. Keeping the reductions with YNNPACK, the same
lowering compiled both ways on the AMX Xeon (in-process, alternated 6 rounds, faster in every
round): the float32 gradient step at the DPO shape (32 x 112 tokens) 574 -> 547 ms, at the GRPO
update's (128 x 136) 2,894 -> 2,825 ms, the bf16-compute one under `RLJAX_CPU_DOTS=eigen` 589 ->
570 ms; the whole float32 DPO train step (one process per setting, alternated) 677-683 -> 652-660
ms, its compile 3.0 -> 2.55 s. YNNPACK's element-wise fusions as well were slower (the DPO step
713-721 ms). Forward-only passes (scoring) keep the empty option: there YNNPACK's reduction fusions
take in the attention's softmax-weighted product (softmax and product in one YNNPACK fusion, one per
layer), which was mixed (the float32 forward at 32 x 112 tokens 190.6 -> 180.8 ms, at 128 x 136
992 -> 1,077 ms). A jaxlib that does not know the reduction fusion type gets the empty option for
train steps too (`eigen_products_option`).
The train steps of models that recompute their activations (`TransformerConfig.remat` "full" or
"dots": `compile_step(remat=True)`) are also compiled with XLA:CPU's loop emitters
(`LOOP_EMITTERS`: `xla_cpu_use_fusion_emitters` off) instead of its MLIR fusion emitters, whose
compile holds far more memory until it ends: the offline DPO step (d256 x 4 layers, 16 pairs with
shared prompts, float32) +230-300 MiB of resident memory while compiling against +48 MiB, a 2-layer
d128 step ~160 MiB against ~2 MiB. Without remat the step's own buffer (280 MiB there) sets the
run's peak; with remat the buffer is smaller (124 MiB "full", 197 MiB "dots") and the compile did.
`benchmarks.offline --trainer dpo --precompute-ref --share-prompt --pad longest --remat full`: peak
RSS 686-707 -> 575-577 MiB (0.57x TRL's 1,010 MiB without gradient checkpointing), "dots" 689-723 ->
664-666 MiB; the GRPO benchmark with `--remat full` 1,541 -> 1,494 MiB (its update's buffer sets
that peak); step times alike (in one process, alternated 8 rounds: "full" 752.5 / 755.6 ms, "dots"
639.3 / 647.7 ms, "full" in bf16 717.1 / 736.3 ms), the first step 0.6-1.4 s longer (the loop
emitters compile slower). Without remat the loop emitters' DPO step ran 2% slower (609.5 / 622.3 ms)
for a peak it does not set, so other programs keep the fusion emitters. AVX2 EPYC, 2026-12-05. A
`xla_cpu_use_fusion_emitters` in XLA_FLAGS is kept, as is a jaxlib without the option.
Train steps are also compiled with LLVM at optimisation level 1 (`FAST_CODEGEN`:
`xla_backend_optimization_level` 1 instead of XLA:CPU's default 3), which shortens their compile
and leaves their speed alike and their results the same up to float rounding (the generated code
may order or fuse a few float operations differently: a tiny float32 step's parameters within
4.5e-7 of level 3's, its bf16-compute twin equal bit for bit; `tests/test_cpu_dots.py`). On a
2-core AMD EPYC of family 26 (Zen 5, avx512_bf16), 2026-12-06, each setting compiled from a fresh
lowering 3 times, alternated, then run alternated 6 rounds of 3 calls: the bf16 GRPO update's step
compiled in 1.51 against 1.89 s (run 1,087.8 / 1,087.2 ms), the bf16 DPO step 1.61 against 1.88 s
(179.9 / 180.6 ms), the float32 DPO step 1.38 against 1.65 s (272.4 / 277.4 ms), the float32 GRPO
update 1.52 against 1.51 s (1,616.9 / 1,632.4 ms); at that size the DPO step's parameters and
optimizer state after a step came out bitwise equal in both dtypes. With remat
(`TransformerConfig.remat` "full", the loop emitters) the DPO step compiled in 1.50 against 1.85 s
in float32 (351.9 / 353.4 ms) and 1.75 against 2.20 s in bf16 (220.8 / 219.2 ms). Sampling keeps
the default: its compile shortened too (2.25 against 2.91 s in bf16) but its decode loop ran 1.5-2%
slower (752.4 / 735.9 ms), and so may forward-only passes (not measured): they keep it as well. On a
2-core AVX2-only EPYC (Zen 3, 2026-12-06) level 1 shortened nothing (DPO 2.05-2.20 against
2.02-2.32 s, the GRPO update 2.19 against 2.00 s) and ran alike (DPO 789-828 against 767-828 ms,
GRPO update 4,458 against 4,554 ms, within that machine's drift), so it applies on every CPU. An
`xla_backend_optimization_level` in XLA_FLAGS is kept.
An `xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS is the user's own choice and is kept. GPU
and TPU programs get no option at all. The results differ from XLA's default in float rounding
only (the products sum in another order).
"""
from __future__ import annotations

import functools
import os
import re
from typing import Callable, Mapping

import jax
import numpy as np

ENV = "RLJAX_CPU_DOTS"
CHOICES = ("auto", "eigen", "ynn")
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"  # the kinds of fusion XLA:CPU hands to YNNPACK
# train steps: YNNPACK for reductions only, the products go to Eigen (module doc); "" (no YNNPACK
# fusions, what forward-only passes get) where the jaxlib lacks the value
EIGEN_PRODUCTS = "LIBRARY_FUSION_TYPE_REDUCE"
# XLA:CPU's loop emitters instead of its MLIR fusion emitters, for the train steps of rematerialised
# models (module doc): the compile's peak memory, not the program's
FUSION_EMITTERS_OPTION = "xla_cpu_use_fusion_emitters"
LOOP_EMITTERS = {FUSION_EMITTERS_OPTION: False}
# LLVM's optimisation level for the train steps' generated code: a shorter compile at the same speed,
# the same results up to float rounding (module doc)
CODEGEN_LEVEL_OPTION = "xla_backend_optimization_level"
FAST_CODEGEN = {CODEGEN_LEVEL_OPTION: 1}


@functools.lru_cache(maxsize=4)  # read once per process: every compile_step asks
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first processor's flags in /proc/cpuinfo; None where there is no such file."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def dot_library(env: Mapping[str, str] | None = None, flags: frozenset[str] | None = None,
                dtype="float32") -> str:
    """'eigen' or 'ynn': the library for full-sequence CPU programs whose products compute in
    `dtype` (the model's `TransformerConfig.dtype`) under RLJAX_CPU_DOTS (module doc).

    env defaults to os.environ, flags to `cpu_flags()`. Raises ValueError naming RLJAX_CPU_DOTS
    for a value other than auto, eigen or ynn.
    """
    env = os.environ if env is None else env
    choice = env.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={env[ENV]!r}: expected one of {', '.join(CHOICES)}")
    if choice != "auto":
        return choice
    if YNN_OPTION in env.get("XLA_FLAGS", ""):
        return "ynn"  # the user's own setting stays in force
    flags = cpu_flags() if flags is None else flags
    if not flags or "avx2" not in flags:
        return "ynn"  # not x86 with AVX2, or flags unknown
    if "avx512f" not in flags:
        return "eigen"
    if "avx512_bf16" in flags and jax.numpy.dtype(dtype) == jax.numpy.float32:
        return "eigen"
    return "ynn"


def full_sequence_compiler_options(platform: str | None = None, dtype="float32", train: bool = False,
                                   remat: bool = False) -> dict | None:
    """`jax.jit(compiler_options=...)` for a program over whole sequences on `platform`
    (default: jax's default backend) computing its products in `dtype`: Eigen's products where
    `dot_library(dtype=dtype)` says so; for a train step (`train`: a backward pass) YNNPACK keeps the
    reductions (`eigen_products_option()`), a forward-only pass gets no YNNPACK fusion at all (module
    doc). `remat` (a train step of a model that recomputes its activations, `TransformerConfig.remat`):
    on CPU also XLA's loop emitters, whose compile holds far less memory (`LOOP_EMITTERS`). Every
    train step on CPU also gets LLVM's optimisation level 1 (`FAST_CODEGEN`: a shorter compile,
    results equal up to float rounding). None where no option applies (GPU, TPU)."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return None
    options = eigen_compiler_options(train) if dot_library(dtype=dtype) == "eigen" else {}
    if remat and loop_emitters_available():
        options = dict(options, **LOOP_EMITTERS)
    if train and fast_codegen_available():
        options = dict(options, **FAST_CODEGEN)
    return options or None


def eigen_compiler_options(train: bool) -> dict[str, str]:
    """XLA:CPU's compiler options for Eigen's products in a train step (`train`: YNNPACK keeps the
    reductions) or in a forward-only program (no YNNPACK fusion), whatever the CPU."""
    return {YNN_OPTION: eigen_products_option() if train else ""}


def _cpu_accepts(options: dict) -> bool:
    """Whether this jaxlib's XLA:CPU compiles a small sum with `options` (an unknown option or value
    is a JaxRuntimeError); checked on the CPU even where another backend is the default."""
    x = jax.device_put(np.zeros(2, np.float32), jax.devices("cpu")[0])
    try:
        jax.jit(jax.numpy.sum).lower(x).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def eigen_products_option() -> str:
    """The value of `YNN_OPTION` that gives Eigen's products: `EIGEN_PRODUCTS` where this jaxlib's
    XLA:CPU accepts it (checked once per process), else ""."""
    return EIGEN_PRODUCTS if _cpu_accepts({YNN_OPTION: EIGEN_PRODUCTS}) else ""


def _applies(options: dict) -> bool:
    """Whether rljax may pass `options`: XLA_FLAGS sets none of them (the user's
    own choice stays in force) and this jaxlib's XLA:CPU knows them."""
    flags = os.environ.get("XLA_FLAGS", "")
    return not any(name in flags for name in options) and _cpu_accepts(options)


@functools.lru_cache(maxsize=1)
def loop_emitters_available() -> bool:
    """Whether `LOOP_EMITTERS` applies (`_applies`; checked once per process)."""
    return _applies(LOOP_EMITTERS)


@functools.lru_cache(maxsize=1)
def fast_codegen_available() -> bool:
    """Whether `FAST_CODEGEN` applies (`_applies`; checked once per process)."""
    return _applies(FAST_CODEGEN)


def jit_full_sequence(fn: Callable, *, dtype="float32", train: bool = False, remat: bool = False,
                      **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` with `full_sequence_compiler_options(dtype=dtype, train=train,
    remat=remat)`: for forward passes (scoring) or, with `train`, train steps over whole sequences
    (products in `dtype`, the model's compute dtype), not for decoding loops."""
    options = full_sequence_compiler_options(dtype=dtype, train=train, remat=remat)
    return jax.jit(fn, compiler_options=options, **jit_kwargs)


def ynn_product_fusions(hlo: str) -> int:
    """How many of a compiled program's YNNPACK fusions run a matrix product: `hlo` is its
    optimised HLO text (`compiled.as_text()`). 0 means Eigen (or XLA's own code) runs every product;
    with `EIGEN_PRODUCTS` the program still has YNNPACK fusions, of reductions."""
    bodies = {}
    for block in re.split(r"\n(?=%|ENTRY )", hlo):
        name = re.match(r"(?:ENTRY )?%([\w.\-]+)", block)
        if name:
            bodies[name.group(1)] = block
    calls = re.findall(r"calls=%([\w.\-]+)[^\n]*\"kind\":\"__ynn_fusion\"", hlo)
    return sum(bool(re.search(r" dot\(", bodies.get(c, ""))) for c in calls)
