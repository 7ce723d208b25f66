"""rljax.host_memory: glibc's malloc_trim after each backend compile that took long enough."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from rljax.host_memory import BACKEND_COMPILE_EVENT, _listener, glibc_malloc_trim, release_compiler_memory


@pytest.fixture
def restore_listener():
    yield
    while _listener:
        monitoring.unregister_event_duration_listener(_listener.pop())


def test_trims_after_each_compile_at_least_the_threshold(restore_listener):
    calls = []
    assert release_compiler_memory(0.0, trim=lambda: calls.append(1))
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    f(np.arange(7.0, dtype=np.float32)).block_until_ready()  # a new program: one backend compile
    assert len(calls) == 1
    f(np.arange(7.0, dtype=np.float32)).block_until_ready()  # cached in memory: no compile, no trim
    assert len(calls) == 1
    # the threshold: a compile shorter than it does not trim; the events are JAX's own
    release_compiler_memory(60.0, trim=lambda: calls.append(2))
    assert len(_listener) == 1  # the second call replaced the first listener
    f(np.arange(9.0, dtype=np.float32)).block_until_ready()
    assert calls == [1]
    monitoring.record_event_duration_secs(BACKEND_COMPILE_EVENT, 61.0)
    monitoring.record_event_duration_secs("/jax/some/other_event", 61.0)
    assert calls == [1, 2]
    with pytest.raises(ValueError, match="min_compile_s"):
        release_compiler_memory(-1.0, trim=lambda: None)


def test_glibc_trim_returns_freed_heap_pages():
    """On glibc: memory freed in the heap (many small blocks, as a compiler frees them) stays resident
    until malloc_trim returns it; the resident size falls by most of what was freed."""
    import ctypes

    trim = glibc_malloc_trim()
    if trim is None:
        pytest.skip("the C library has no malloc_trim (not glibc)")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    blocks = []
    for _ in range(100_000):  # 100,000 x 1 KiB: below the mmap threshold, so they live in the heap
        p = libc.malloc(1024)
        ctypes.memset(p, 1, 1024)
        blocks.append(p)
    keep = blocks[-1]  # one live block at the top stops free() from shrinking the heap by itself
    for p in blocks[:-1]:
        libc.free(p)
    before = resident_mib()
    trim()
    after = resident_mib()
    libc.free(keep)
    assert before - after > 0.5 * 100_000 * 1024 / 2**20  # most of the ~98 MiB freed went back
