"""A persistent XLA compilation cache, so a rerun does not compile again.

On CPU most of an experiment's first step is XLA compiling the train step (4-7 s for a 4-layer
model at the offline benchmark's shapes, against ~1 s for torch's first step). JAX can keep
compiled programs on disk and load them in the next process with the same program, jax version
and machine; `enable_compilation_cache` switches that on:

    from rljax.compile_cache import enable_compilation_cache
    enable_compilation_cache()            # ~/.cache/rljax/jax (or $XDG_CACHE_HOME/rljax/jax)
    enable_compilation_cache("/scratch/xla-cache")

Every experiment's entry point (`rljax.cli.run`) calls it, so reruns and resumes of
`python -m experiments.…` skip the compile. Where:

- `path` if given;
- else JAX's own setting (`JAX_COMPILATION_CACHE_DIR`, or `jax.config` updated by the caller) if any;
- else `$RLJAX_COMPILATION_CACHE`: a directory, or `off` (also `0`, `false`, `none`, empty) to keep
  the cache off;
- else `$XDG_CACHE_HOME/rljax/jax`, `~/.cache/rljax/jax` without XDG_CACHE_HOME.

Programs that compile in under `min_compile_s` are not stored (they cost more to look up than
to build). The directory is capped at `max_bytes` (least recently used entries go first). Each
is JAX's own setting where the environment gives one (`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`,
`JAX_COMPILATION_CACHE_MAX_SIZE`) and the call does not. The directory must be writable (JAX
takes a lock file in it even to read): one chosen by `path`, JAX or `$RLJAX_COMPILATION_CACHE`
that is not is an error naming it and what chose it; the default one is skipped with a warning
(the cache is an optimisation, and a read-only or missing home directory should not stop a run).
Like any compilation cache it is trusted code: do not point it at a directory others may write.
"""
from __future__ import annotations

import os
import warnings

ENV = "RLJAX_COMPILATION_CACHE"
OFF = ("", "0", "off", "false", "none")
DEFAULT_MAX_BYTES = 4 << 30


def default_cache_dir() -> str | None:
    """The directory `enable_compilation_cache()` uses when JAX has none set (None: off)."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rljax", "jax")


MIN_COMPILE_S = 0.5
_JAX_ENV = {"min_compile_s": "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "max_bytes": "JAX_COMPILATION_CACHE_MAX_SIZE"}


def enable_compilation_cache(path: str | None = None, *, min_compile_s: float | None = None,
                             max_bytes: int | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache; returns the directory in use (None: left off).

    It applies to every compile after the call (programs this process compiled before stay in
    its memory and are not written). A directory that cannot be created or written is an error
    naming it and what chose it, except the default one, which is skipped with a warning.
    min_compile_s, max_bytes: None keeps the environment's JAX setting (see the module), else
    MIN_COMPILE_S = 0.5 s and DEFAULT_MAX_BYTES = 4 GiB.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    source = "path"
    if path is None:
        source = "jax_compilation_cache_dir" if jax.config.jax_compilation_cache_dir else (
            f"${ENV}" if os.environ.get(ENV) is not None else "the default")
        path = jax.config.jax_compilation_cache_dir or default_cache_dir()
        if path is None:
            return None
    path = os.path.expanduser(os.fspath(path))  # "~/cache" as the environment variable's value reads it
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError("not writable (JAX writes a lock file there even to read)")
    except OSError as e:
        message = f"compilation cache: cannot use {path!r} (from {source}): {e}"
        if source == "the default":
            warnings.warn(f"{message}; running without it (set {ENV} to a writable directory, or {ENV}=off to "
                          "silence this)", stacklevel=2)
            return None
        raise OSError(f"{message}; set {ENV}=off to run without it") from e
    for name, value, default, key, cast in (
            ("min_compile_s", min_compile_s, MIN_COMPILE_S, "jax_persistent_cache_min_compile_time_secs", float),
            ("max_bytes", max_bytes, DEFAULT_MAX_BYTES, "jax_compilation_cache_max_size", int)):
        if value is not None or os.environ.get(_JAX_ENV[name]) is None:  # the environment's own setting stays
            jax.config.update(key, cast(default if value is None else value))
    if jax.config.jax_compilation_cache_dir != path:
        cc.set_cache_dir(path)
        cc.reset_cache()  # a cache opened at another directory is dropped, the next compile opens this one
    return path
