"""Shared helpers for benchmarks: timing, matmul peak, environment banner."""
from __future__ import annotations

import os
import resource
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp

from benchmarks.cpuinfo import cpu_description, host_memory_description
from rljax.sampling import usable_cores


def banner(title: str, cfg) -> None:
    dev = jax.devices()[0]
    print(f"== {title}")
    print(f"jax {jax.__version__} | backend {jax.default_backend()} | {jax.device_count()} x {dev.device_kind} | "
          f"{usable_cores()} cpus | "
          f"{cpu_description()}")
    print(f"host memory: {host_memory_description()}")
    if jax.default_backend() == "cpu":
        from rljax.cpu_dots import ENV, dot_library

        print(f"products in train steps and scoring passes: {dot_library()} for float32 compute, "
              f"{dot_library(dtype='bfloat16')} for bfloat16 ({ENV}={os.environ.get(ENV, 'auto')}; sampling keeps "
              f"XLA's default, rljax.cpu_dots)")
    print(f"config: {cfg}")


def cpu_dots_env(choice: str):
    """A context with RLJAX_CPU_DOTS=choice while rljax's jits are built inside (`rljax.cpu_dots`
    reads it when a step or scoring pass is jitted); the environment is restored after."""
    from rljax.cpu_dots import ENV

    return mock.patch.dict(os.environ, {ENV: choice})


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if isinstance(a, jax.Array) else a, x)


def timeit(fn, *, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds per call of fn() (results blocked on), after `warmup` calls."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def matmul_peak(dtype=jnp.float32, n: int | None = None, reps: int = 10) -> float:
    """Measured matmul FLOP/s of this machine for square [n, n] matmuls.

    bfloat16 inputs accumulate in float32 (preferred_element_type), the way the
    model computes.
    """
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    s = timeit(lambda: f(a, a), reps=reps, warmup=2)
    return 2 * n**3 / s


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def iteration_medians(rows: list[dict], stages: tuple[str, ...]) -> dict:
    """Medians over RL iterations: ``rows`` are `make_rl_iteration`'s metrics, each with the
    iteration's wall time under "total"; returns {"total", each stage, "other"} in seconds, where a
    stage reads ``time_{stage}_s`` and "other" is each iteration's time outside the stages (so >= 0;
    a difference of medians can go negative). Each is its own median: the parts need not add up to
    the median total exactly."""
    def med(f):
        return statistics.median(f(r) for r in rows)

    out = {"total": med(lambda r: r["total"])}
    out.update({s: med(lambda r, s=s: r[f"time_{s}_s"]) for s in stages})
    out["other"] = med(lambda r: r["total"] - sum(r[f"time_{s}_s"] for s in stages))
    return out
