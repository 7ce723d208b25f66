"""Give the host memory XLA's compiler frees back to the operating system.

On Linux, glibc's allocator keeps what the compiler frees (LLVM's working memory: about 200 MiB
for the offline benchmark's 4-layer train step) in the process's heap instead of returning it,
and a train step's own buffers (a few hundred MiB, allocated fresh) then come on top of it: the
process's peak resident memory is the compiler's and the step's added together. Calling glibc's
`malloc_trim(0)` after a compile returns those pages, so the step reuses the room:

    from rljax.host_memory import release_compiler_memory
    release_compiler_memory()      # every experiment's entry point (rljax.cli.run) calls it

Measured (`benchmarks.offline --trainer dpo --pad longest --release-memory false|true`,
docs/performance.md): peak RSS 1,093 -> 912 MiB on a cold start, the same programs and results.
It changes nothing but where freed memory lives; where the C library is not glibc (macOS, musl)
it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

# the duration event JAX records after each backend compile (jax._src.dispatch.BACKEND_COMPILE_EVENT)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_listener: list = []  # the one installed listener, so a second call replaces it instead of adding one


def glibc_malloc_trim() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)` as a callable, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def release_compiler_memory(min_compile_s: float = 0.1, *, trim: Callable[[], None] | None = None) -> bool:
    """After every backend compile of at least `min_compile_s` seconds, return freed heap memory to
    the operating system (`trim`, default glibc's malloc_trim(0): a few milliseconds). Quicker
    compiles free too little to matter. Returns whether it is on; calling again replaces the
    previous setting."""
    from jax import monitoring

    trim = trim or glibc_malloc_trim()
    if trim is None:
        return False
    if min_compile_s < 0:
        raise ValueError(f"min_compile_s must be >= 0, got {min_compile_s}")

    def listener(event: str, duration: float, **_):
        if event == BACKEND_COMPILE_EVENT and duration >= min_compile_s:
            trim()

    while _listener:
        monitoring.unregister_event_duration_listener(_listener.pop())
    monitoring.register_event_duration_secs_listener(listener)
    _listener.append(listener)
    return True
