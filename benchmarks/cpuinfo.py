"""The CPU's model and vector extensions, for every benchmark's banner (rljax's and the peers').

No third-party imports: the peer scripts (`benchmarks/peers/`) run in an environment without jax.
"""
from __future__ import annotations

import platform

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
