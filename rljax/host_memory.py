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

Huge pages for XLA's per-execution buffers. XLA:CPU allocates a compiled program's temporary
buffer (the activations a train step keeps for its backward pass: 431 MiB for the offline DPO
step) afresh on every call and frees it at the end. glibc serves an allocation that large with
`mmap` and returns it with `munmap`, so every step touches 110,000 new 4 KiB pages: as many page
faults, each zeroing its page, 0.3 s of kernel time a step on a 2-core EPYC. With glibc's tunable
`glibc.malloc.hugetlb=1` such mappings are advised to use transparent 2 MiB pages (about 530
faults a step in all): the offline trainers' steps ran 5-18% faster, the peak memory the same
(docs/performance.md). glibc reads tunables only when a process starts, so

    python -m experiments.<name> ...    # and python -m benchmarks.<name>: re-executed with it set
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 jupyter lab         # a notebook's kernel: set it yourself

`exec_with_huge_pages()` (called by the `experiments` and `benchmarks` packages when run with
`python -m`, before jax is imported) replaces the process by the same command with the tunable
added to GLIBC_TUNABLES: the same PID, arguments and interpreter flags. It does so only on Linux
with glibc, when the kernel's transparent huge pages are in `madvise` mode (with `always` every
large mapping gets them already; with `never` none can), when the tunable is not set yet, and
unless RLJAX_HUGE_PAGES=0.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import Callable, Mapping

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


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_OPT_OUT = "RLJAX_HUGE_PAGES"  # "0": never re-execute
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode, the bracketed word of `path` ("always", "madvise" or
    "never"), or None where there is no such file (not Linux, or a kernel without THP)."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    return next((w[1:-1] for w in words if w.startswith("[") and w.endswith("]")), None)


def huge_pages_env(environ: Mapping[str, str], *, thp: str | None, libc: str) -> dict[str, str] | None:
    """`environ` with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES (its other tunables kept, colon-
    separated), or None when a restart would change nothing: the C library is not glibc (`libc`, as
    `platform.libc_ver()[0]` names it), the THP mode (`thp`, see `thp_mode`) is not "madvise", the
    environment already sets glibc.malloc.hugetlb (to any value: the user's choice stands), or
    RLJAX_HUGE_PAGES=0."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (libc != "glibc" or thp != "madvise" or environ.get(HUGE_PAGES_OPT_OUT, "1") == "0"
            or any(t.split("=")[0] == "glibc.malloc.hugetlb" for t in tunables.split(":"))):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    return env


def exec_with_huge_pages(*, execve: Callable = os.execve) -> bool:
    """Re-execute this process (`execve`: same PID, `sys.orig_argv`: same arguments and interpreter
    flags) with glibc's huge-page tunable set, when `huge_pages_env` says it would change anything.
    Call it before anything worth keeping has run: the `experiments` and `benchmarks` packages call it
    on `python -m` before jax is imported. It costs one more interpreter start, about 50 ms
    (`python -m benchmarks.cpuinfo`: 63-88 ms without it, 111-150 ms with it). Returns False when it
    does not re-execute; with the default `execve` it does not return otherwise."""
    env = huge_pages_env(os.environ, thp=thp_mode(), libc=platform.libc_ver()[0])
    if env is None:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, sys.orig_argv, env)
    return True
