"""The CPU's model and vector extensions, for every benchmark's banner (rljax's and the peers').

No third-party imports: the peer scripts (`benchmarks/peers/`) run in an environment without jax
(they import this file and `rljax.host_memory`, which imports nothing outside the standard library
until it is used with jax, from the source tree).

    python -m benchmarks.cpuinfo    # the two banner lines, and what `python -m` does about huge pages
"""
from __future__ import annotations

import os
import platform
import sys

# The vector extensions that change CPU matmul speed (and float rounding): figures from machines
# that differ in these do not compare.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_description() -> str:
    """'<model name> (<the VECTOR_FLAGS present>)' from /proc/cpuinfo, or platform's processor string."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    present = [f for f in VECTOR_FLAGS if f in flags]
    return f"{model} ({' '.join(present) or 'vector flags unknown'})"


def host_memory_description() -> str:
    """The kernel's transparent-huge-page mode and GLIBC_TUNABLES: whether XLA's (and torch's) large
    buffers get 2 MiB pages (`rljax.host_memory`), which moves CPU step times by 5-35% here; whether
    they stay in the heap between steps (`rljax.host_memory.keep_buffers`) or freed memory goes back
    from every thread's arena (`fixed_malloc_thresholds`); and whether jax runs CPU computations on
    the calling thread."""
    from rljax.host_memory import buffers_kept, thp_mode, thresholds_fixed

    jax = sys.modules.get("jax")  # not imported by the peers' scripts
    inline = jax is not None and jax.config.values.get("jax_cpu_enable_async_dispatch") is False
    return (f"transparent huge pages {thp_mode() or 'n/a'}, "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '') or '(unset)'}"
            + (", buffers kept in the heap (mallopt)" if buffers_kept() else "")
            + (", malloc thresholds fixed (mmap 32 MiB, trim 1 MiB)" if thresholds_fixed() else "")
            + (", CPU computations inline (no async dispatch)" if inline else ""))


if __name__ == "__main__":
    print(cpu_description())
    print(host_memory_description())
