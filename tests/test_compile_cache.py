"""rljax.compile_cache: where the cache goes, and that a second compile of a program loads it."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT
from rljax.compile_cache import ENV, default_cache_dir, enable_compilation_cache


@pytest.fixture
def restore_jax_cache_config():
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_compilation_cache_max_size")
    saved = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    cc.reset_cache()


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == os.path.join(str(tmp_path), "rljax", "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "rljax", "jax")
    for off in ("off", "0", "False", "none", ""):
        monkeypatch.setenv(ENV, off)
        assert default_cache_dir() is None
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")


def test_off_leaves_jax_alone(monkeypatch, restore_jax_cache_config):
    monkeypatch.setenv(ENV, "off")
    jax.config.update("jax_compilation_cache_dir", None)
    assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_a_directory_that_cannot_be_made_is_named(tmp_path, monkeypatch, restore_jax_cache_config):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"compilation cache: cannot use .*file/cache' \(from path\)"):
        enable_compilation_cache(str(blocker / "cache"))
    monkeypatch.setenv(ENV, str(blocker / "env-cache"))
    jax.config.update("jax_compilation_cache_dir", None)
    with pytest.raises(OSError, match=r"file/env-cache' \(from \$RLJAX_COMPILATION_CACHE\).*=off"):
        enable_compilation_cache()


def test_an_unwritable_directory_is_named_and_the_default_one_skipped(tmp_path, monkeypatch,
                                                                     restore_jax_cache_config):
    # JAX takes a lock file even to read: a read-only cache warned at every compile and was never read
    # (os.access stubbed: the tests may run as root, who can write anywhere)
    monkeypatch.setattr("rljax.compile_cache.os.access", lambda path, mode: False)
    with pytest.raises(OSError, match=r"cannot use .*ro' \(from path\): not writable \(JAX writes a lock file"):
        enable_compilation_cache(str(tmp_path / "ro"))
    # the default directory (a read-only or missing home): the run goes on without the cache, said once
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    jax.config.update("jax_compilation_cache_dir", None)
    with pytest.warns(UserWarning, match=r"compilation cache: cannot use .*home-cache/rljax/jax' \(from the "
                                         r"default\): not writable.*running without it"):
        assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_the_environments_jax_settings_stay(tmp_path, monkeypatch, restore_jax_cache_config):
    """JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS / JAX_COMPILATION_CACHE_MAX_SIZE (read by JAX at import) are
    the user's: enable_compilation_cache keeps them unless its call gives values; otherwise 0.5 s and 4 GiB."""
    from rljax.compile_cache import DEFAULT_MAX_BYTES, MIN_COMPILE_S

    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    enable_compilation_cache(str(tmp_path / "a"))
    assert (jax.config.jax_persistent_cache_min_compile_time_secs, jax.config.jax_compilation_cache_max_size) == (
        MIN_COMPILE_S, DEFAULT_MAX_BYTES)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "1000")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # as JAX read them at import
    jax.config.update("jax_compilation_cache_max_size", 1000)
    enable_compilation_cache(str(tmp_path / "b"))
    assert (jax.config.jax_persistent_cache_min_compile_time_secs, jax.config.jax_compilation_cache_max_size) == (
        0.0, 1000)
    enable_compilation_cache(str(tmp_path / "c"), min_compile_s=2.0)  # the call's own value wins
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0


def test_second_compile_loads_from_the_cache(tmp_path, restore_jax_cache_config):
    """A program compiled once is written to the directory; after the in-memory caches are
    cleared (as in a new process), compiling it again is a persistent-cache hit and gives the
    same result."""
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    path = enable_compilation_cache(str(tmp_path / "xla"), min_compile_s=0.0)
    assert path == str(tmp_path / "xla") and jax.config.jax_compilation_cache_dir == path

    def f(x):
        return jnp.tanh(x @ x.T).sum(axis=0) * 3.0 + 1.25

    x = jnp.arange(12.0).reshape(3, 4) / 7
    first = jax.jit(f)(x)
    assert os.listdir(path)  # written
    jax.clear_caches()
    events.clear()
    second = jax.jit(f)(x)
    assert "/jax/compilation_cache/cache_hits" in events
    assert jnp.array_equal(first, second)


def test_experiment_entry_point_uses_the_cache(tmp_path):
    """`rljax.cli.run` (every experiment's __main__) turns the cache on at $RLJAX_COMPILATION_CACHE
    before main runs, and leaves it off with RLJAX_COMPILATION_CACHE=off; either way it installs
    rljax.host_memory's listener (one)."""
    code = ("import dataclasses, jax\n"
            "from rljax.cli import run\n"
            "from rljax.host_memory import _listener\n"
            "@dataclasses.dataclass\n"
            "class C:\n    n: int = 3\n"
            "def main(c):\n    print(c.n, jax.config.jax_compilation_cache_dir, len(_listener))\n"
            "run(main, C, ['--n', '5'])\n")
    for value, expected in ((str(tmp_path / "cache"), str(tmp_path / "cache")), ("off", "None")):
        env = dict(os.environ, RLJAX_COMPILATION_CACHE=value, PYTHONPATH=ROOT)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["5", expected, "1"]


def test_a_path_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch, restore_jax_cache_config):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert enable_compilation_cache("~/rljax-cache") == str(tmp_path / "home" / "rljax-cache")
    assert (tmp_path / "home" / "rljax-cache").is_dir() and not (tmp_path / "~").exists()
