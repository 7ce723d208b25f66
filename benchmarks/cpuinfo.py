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


def cpu_description(path: str = "/proc/cpuinfo") -> str:
    """'<model name>, family F model M (<the VECTOR_FLAGS present>)' from ``path`` (the first
    processor's entries), or platform's processor string. Family and model tell apart parts that a
    virtual machine names alike (AMD's "AMD EPYC" is Zen 3, 4 or 5: families 25 and 26)."""
    info, flags = {}, None
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and flags is None:
                    flags = set(value.split())
                elif key in ("model name", "cpu family", "model") and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        model += f", family {info['cpu family']} model {info['model']}"
    present = [f for f in VECTOR_FLAGS if f in (flags or ())]
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
