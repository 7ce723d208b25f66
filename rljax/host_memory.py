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

Huge pages for XLA's per-execution buffers (opt-in: RLJAX_HUGE_PAGES=1). XLA:CPU allocates a
compiled program's temporary buffer (the activations a train step keeps for its backward pass: 431
MiB for the offline DPO step) afresh on every call and frees it at the end. glibc serves an
allocation that large with `mmap` and returns it with `munmap`, so every step touches 110,000 new
4 KiB pages: as many page faults, each zeroing its page, 0.3 s of kernel time a step on a 2-core
EPYC. With glibc's tunable `glibc.malloc.hugetlb=1` such mappings are advised to use transparent
2 MiB pages (about 530 faults a step in all): on that EPYC the offline trainers' steps ran 5-18%
faster, the peak memory the same. On a 2-core Intel Xeon with AMX (a virtual machine whose freed
memory goes back to the host: free page reporting) the same tunable made every fresh 2 MiB page
expensive: the offline trainers' first step took 1.0-2.6 s longer (DPO 5.1-5.2 -> 7.4-7.7 s), the
GRPO benchmark's first iteration 22-25 s against 13-14 s, and its update 3.0-3.3 s a step against
2.2 (docs/performance.md). Which way it goes depends on the host, so it is opt-in. glibc reads
tunables only when a process starts, so

    RLJAX_HUGE_PAGES=1 python -m experiments.<name> ...   # and python -m benchmarks.<name>: re-executed
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 jupyter lab     # a notebook's kernel: set it yourself

`exec_with_malloc_tunables()` (called by the `experiments` and `benchmarks` packages when run with
`python -m`, before jax is imported) replaces the process by the same command with the tunable
added to GLIBC_TUNABLES: the same PID, arguments and interpreter flags. It does so only on Linux
with glibc, only where the kernel's transparent huge pages are in `madvise` mode (with `always`
every large mapping gets them already; with `never` none can) and the user has not set it.

Keeping XLA's per-execution buffers in the heap (opt-in: RLJAX_KEEP_BUFFERS=1, or `keep_buffers()`).
Huge pages make the fresh mapping cheaper where they are cheap; keeping it avoids it. With glibc's
`mallopt(M_MMAP_MAX, 0)` (no block is served by mmap) and `mallopt(M_TRIM_THRESHOLD, -1)` (the
heap's top is never given back on free; only malloc_trim returns it), the buffer a step frees
stays mapped and the next step reuses it: no page faults and no kernel zeroing for the blocks it
gets back whole (a small allocation may split a freed buffer, and the heap then grows by another:
with shapes that change from step to step, as SFT's length buckets, it keeps growing; below).
glibc only does this for its main arena, the one the process's first thread allocates from
(other threads' arenas fall back to mmap for blocks this large whatever the setting says), so the
process also runs CPU computations on the calling thread
(`jax_cpu_enable_async_dispatch` off, `inline_cpu_dispatch`): XLA then allocates the buffer there.
Both are set while the process runs, so `keep_buffers()` works anywhere before the first
computation, a notebook's kernel included; they are the same settings as glibc's tunables
`glibc.malloc.mmap_max=0` and `glibc.malloc.trim_threshold`, which earlier versions set by
re-executing the process (measured alike, AMX Xeon, 2026-12-05: the offline DPO step with a
precomputed reference in bf16 0.310 / 0.301 s with `mallopt` against 0.301 / 0.291 with the
tunables and 0.366 / 0.372 by default, the GRPO iteration 3.77 / 3.70 against 3.89 / 3.84 and
4.50 / 4.30 s, the same peak memory; docs/performance.md). On a 2-core Intel Xeon with AMX, the GRPO
update's bf16 step (1.76 GiB temporary buffer) took 0.9 s of kernel time a step with huge pages;
with the buffers kept, none, and the GRPO iteration at TRL's configuration ran 3.26-3.27 s against
3.73-4.09 s (update 1.67-1.68 against 2.17-2.49 s; huge pages on in both), the same peak memory.
The cost: the heap keeps what the process once used (the compiler's freed memory still goes back
after each compile), so where several programs of different sizes take turns their buffers all
stay, and freed blocks are not always reused whole: the offline DPO benchmark peaked at 1,199 MiB
against 791, at about the same speed, and the KTO step ran slower, while their live reference was
a program of its own (it now runs inside the train step: 786-802 against 789-803 MiB on an AVX2
EPYC, docs/performance.md); an RL iteration's sampling, scoring and update still take turns.
Over a whole multi-stage run (`python -m experiments.r1_pipeline`, eight stages, AVX2 EPYC,
2026-12-05, alternated): 0.82-0.99x the default's wall time at 1.25-1.40x its peak resident
memory (1,534-1,656 against 1,182-1,227 MiB), the same results; glibc's own count (`mallinfo2`)
showed 290-650 MiB in use while the heap held 0.5-1.0 GiB more, freed and resident. A 500-step
SFT stage from scratch ran 0.86x the default's time while its heap grew from 1.0 to 2.0 GiB at a
flat 680 MiB in use (the default's resident memory: 1.0 to 1.7 GiB). Trimming the heap before
every compile as well as after took the multi-stage peak only to 1,480 MiB (142 trims, 1.2-1.6 s
of them); a trim returns exactly the freed blocks whose reuse is the point. Hence opt-in
(`make quickstart`, an RL run, sets it):

    RLJAX_KEEP_BUFFERS=1 python -m experiments.<name> ...   # and python -m benchmarks.<name>

    import rljax.host_memory                                # a notebook or your own script:
    rljax.host_memory.keep_buffers()                        # first, before any computation

The opposite trade (opt-in: RLJAX_FIXED_MALLOC_THRESHOLDS=1, or `fixed_malloc_thresholds()`):
glibc's thresholds fixed so that what XLA's worker threads free on every call goes back at once
instead of staying resident in their arenas, which `malloc_trim` does not shrink: 20-30 MiB less
at the offline DPO trainers' peak for steps up to ~4% slower (figures in its docstring).
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
_fixed: list = []  # True once fixed_malloc_thresholds() has set its thresholds (for banners)


def _libc_function(name: str, argtypes: list, restype):
    """The C library's function `name` through ctypes, or None where the library has none."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def glibc_malloc_trim() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)` as a callable, or None where the C library has none."""
    trim = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    return None if trim is None else (lambda: trim(0))


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


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
# blocks below 32 MiB from the arenas, as glibc's moving threshold ends up anyway (its ceiling on
# 64-bit); a free that leaves more than 1 MiB unused at an arena's top returns it
FIXED_THRESHOLDS_MALLOPT = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 20))


def fixed_malloc_thresholds(*, mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Fix glibc's mmap and trim thresholds at FIXED_THRESHOLDS_MALLOPT (`mallopt`, default glibc's):
    a block below 32 MiB comes from an arena, and a free that leaves more than 1 MiB unused at the
    top of an arena gives it back to the operating system at once. Opt-in: less resident memory
    for steps up to a few percent slower (`RLJAX_FIXED_MALLOC_THRESHOLDS=1 python -m ...`, or a
    call anywhere, a notebook's kernel included: glibc applies the thresholds from then on).

    Why: glibc moves both thresholds up as a process frees mmap-served blocks, to 32 MiB for mmap
    and 64 MiB for trimming. XLA:CPU's worker threads (one glibc arena each) allocate and free their
    scratch memory on every call of a program, and what they free at their arena's top then stays
    resident, since `malloc_trim` (`release_compiler_memory`) shrinks only the main arena's top. The
    offline DPO step with `--remat full` left 21-23 MiB so in three worker arenas after its first
    call, 3 MiB with the thresholds fixed (AVX2 EPYC, 2026-12-06). The cost is the other side of it:
    each call faults that scratch memory in again. Measured there (`benchmarks.offline --pad longest
    --share-prompt`, alternated, docs/performance.md): peak resident memory with `--trainer dpo
    --precompute-ref --remat full` 494-499 MiB against 520-535 (0.50x TRL's 996 MiB in the sitting
    beside it), at 0.735-0.786 against 0.713-0.752 s a step; without remat DPO live 708-711 against
    735-740 MiB at the same speed, DPO precomputed 679-682 against 698-711 MiB at 0.650-0.679
    against 0.635-0.712 s (about 4% slower by the median), KTO 630-635 against 623-651 MiB, the
    reward model 622-634 against 640-663 MiB at 0.515-0.558 against 0.502-0.529 s. The GRPO
    benchmark's iteration (the same thresholds as GLIBC_TUNABLES): 5.82-5.90 against 5.96-6.32 s,
    peak 2,281-2,297 against 2,304-2,310 MiB. Returns False (and changes nothing) where the C
    library is not glibc or where `keep_buffers()` has set its own thresholds, which keep the
    opposite."""
    if buffers_kept():
        return False
    mallopt = mallopt or glibc_mallopt()
    if mallopt is None:
        return False
    for param, value in FIXED_THRESHOLDS_MALLOPT:
        if mallopt(param, value) != 1:
            raise RuntimeError(f"glibc's mallopt({param}, {value}) failed")
    _fixed[:] = [True]
    return True


def thresholds_fixed() -> bool:
    """Whether `fixed_malloc_thresholds()` has taken effect in this process (and kept buffers have
    not replaced it since)."""
    return bool(_fixed) and not buffers_kept()


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES = "RLJAX_HUGE_PAGES"  # "1": add the huge-page tunable (opt-in, module doc)
KEEP_BUFFERS = "RLJAX_KEEP_BUFFERS"  # "1": keep XLA's per-execution buffers in the heap (module doc)
FIXED_THRESHOLDS = "RLJAX_FIXED_MALLOC_THRESHOLDS"  # "1": fixed_malloc_thresholds() (opt-in)
# no mmap-served blocks; -1 never trims the heap's top on free
KEEP_BUFFERS_MALLOPT = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
_kept: list = []  # True once keep_buffers() has set KEEP_BUFFERS_MALLOPT in this process (for banners)
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


def _switch(environ: Mapping[str, str], name: str) -> bool:
    """An opt-in switch: "1" on, "0" or unset off; anything else is a ValueError naming the variable."""
    value = environ.get(name, "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name}={environ[name]!r}: expected 0 or 1")
    return value == "1"


def keep_buffers_requested(environ: Mapping[str, str]) -> bool:
    """Whether `environ` asks for XLA's per-execution buffers to stay in the heap (RLJAX_KEEP_BUFFERS:
    "1" yes, "0" or unset no; anything else is a ValueError naming the variable)."""
    return _switch(environ, KEEP_BUFFERS)


def huge_pages_requested(environ: Mapping[str, str]) -> bool:
    """Whether `environ` asks for glibc's huge-page tunable (RLJAX_HUGE_PAGES: "1" yes, "0" or unset
    no; anything else is a ValueError naming the variable)."""
    return _switch(environ, HUGE_PAGES)


def malloc_tunables_env(environ: Mapping[str, str], *, thp: str | None, libc: str) -> dict[str, str] | None:
    """`environ` with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES (its other tunables kept, colon-
    separated) where RLJAX_HUGE_PAGES=1 and the THP mode (`thp`, see `thp_mode`) is "madvise", or
    None when a restart would change nothing: not asked for, the tunable already set (to any
    value: the user's choice), or a C library that is not glibc (`libc`, as
    `platform.libc_ver()[0]` names it). Kept buffers need no restart (`keep_buffers`)."""
    huge = huge_pages_requested(environ)  # a bad value raises on any C library
    if libc != "glibc" or not huge or thp != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES_TUNABLE.split("=")[0] in {t.split("=")[0] for t in tunables.split(":") if t}:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([tunables] * bool(tunables) + [HUGE_PAGES_TUNABLE])
    return env


def exec_with_malloc_tunables(*, execve: Callable = os.execve) -> bool:
    """Re-execute this process (`execve`: same PID, `sys.orig_argv`: same arguments and interpreter
    flags) with glibc's huge-page tunable set, when `malloc_tunables_env` says it would change anything.
    Call it before anything worth keeping has run: the `experiments` and `benchmarks` packages call it
    on `python -m` before jax is imported. It costs one more interpreter start, about 50 ms
    (`python -m benchmarks.cpuinfo`: 63-88 ms without it, 111-150 ms with it). Returns False when it
    does not re-execute; with the default `execve` it does not return otherwise."""
    env = malloc_tunables_env(os.environ, thp=thp_mode(), libc=platform.libc_ver()[0])
    if env is None:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, sys.orig_argv, env)
    return True


def inline_cpu_dispatch() -> None:
    """Run CPU computations on the thread that calls them (`jax_cpu_enable_async_dispatch` off), so
    that XLA allocates their buffers from glibc's main arena, where `keep_buffers`' settings keep
    them (module doc). Call it before the first computation: JAX reads the setting when it creates its
    CPU client. Python then waits for each CPU computation it starts; rljax's loops wait for every
    step's metrics anyway."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt(param, value)` (1 on success), or None where the C library is not glibc
    (musl and macOS have none, or one that ignores these parameters)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    return _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)


def keep_buffers(*, mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Keep XLA's per-execution buffers in the heap from one call to the next (module doc): glibc's
    `mallopt` with KEEP_BUFFERS_MALLOPT, and `inline_cpu_dispatch`. Call it before the first
    computation: JAX reads the dispatch setting when it creates its CPU client, and without it the
    buffers come from other threads' arenas, which glibc serves with mmap whatever the setting.
    Returns False (and changes nothing) where the C library is not glibc (`mallopt`, default
    `glibc_mallopt()`); raises RuntimeError once JAX's CPU client exists and dispatches
    asynchronously, since the call would then only half work (restart the process or notebook
    kernel and call it first)."""
    mallopt = mallopt or glibc_mallopt()
    if mallopt is None:
        return False
    if "jax" in sys.modules and _cpu_client_dispatches_asynchronously():
        raise RuntimeError("keep_buffers() must run before the first computation: JAX's CPU client already "
                           "exists and dispatches asynchronously, so XLA's buffers would come from other "
                           "threads' arenas, which glibc serves with mmap; restart the process (or the "
                           "notebook's kernel) and call it first")
    # before jax is imported where it is not yet (the `python -m` hooks): its import's large blocks
    # then come from the heap too, as with the tunables set at start-up; mapped beside the heap
    # instead, they kept the heap from growing in place, and it took more calls to settle
    for param, value in KEEP_BUFFERS_MALLOPT:
        if mallopt(param, value) != 1:
            raise RuntimeError(f"glibc's mallopt({param}, {value}) failed")
    inline_cpu_dispatch()
    _kept[:] = [True]
    return True


def _cpu_client_dispatches_asynchronously() -> bool:
    """Whether JAX's CPU client already exists and runs computations on its own threads."""
    import jax

    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # a jax without it: nothing to check against
        return False
    return backends_are_initialized() and jax.config.values.get("jax_cpu_enable_async_dispatch") is not False


def buffers_kept() -> bool:
    """Whether `keep_buffers()` has taken effect in this process."""
    return bool(_kept)


def setup_host_memory() -> None:
    """What `python -m experiments.*` and `python -m benchmarks.*` do before anything else: re-execute
    with glibc's huge-page tunable where RLJAX_HUGE_PAGES=1 asks for it (`exec_with_malloc_tunables`),
    then, with RLJAX_KEEP_BUFFERS=1, `keep_buffers()`, or with RLJAX_FIXED_MALLOC_THRESHOLDS=1,
    `fixed_malloc_thresholds()` (either does nothing where the C library is not glibc; asking for
    both is a ValueError: they set the same thresholds opposite ways)."""
    keep = keep_buffers_requested(os.environ)
    fixed = _switch(os.environ, FIXED_THRESHOLDS)
    if keep and fixed:
        raise ValueError(f"{KEEP_BUFFERS}=1 and {FIXED_THRESHOLDS}=1: kept buffers never give freed memory "
                         "back, fixed thresholds give it back at once; choose one")
    exec_with_malloc_tunables()
    if keep:
        keep_buffers()
    elif fixed:
        fixed_malloc_thresholds()
