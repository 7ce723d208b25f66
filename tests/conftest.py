import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

# Tests never reach the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One compilation cache for the whole run, in a temporary directory the first process (the xdist
# controller, whose environment the workers and every subprocess inherit) makes and removes: the
# tests compile the same tiny programs in many files and processes, and a program found there is
# loaded instead of compiled again. Experiments started by the tests use it too (rljax.compile_cache
# reads RLJAX_COMPILATION_CACHE), so nothing lands in the user's ~/.cache; tests of the cache pass
# their own directory. RLJAX_COMPILATION_CACHE=off before pytest runs everything uncached.
if "RLJAX_TEST_CACHE_OWNER" not in os.environ and "RLJAX_COMPILATION_CACHE" not in os.environ:
    os.environ["RLJAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="rljax-test-xla-")
    os.environ["RLJAX_TEST_CACHE_OWNER"] = str(os.getpid())
# XLA compilation, not execution, dominates these tiny-model tests. Skipping LLVM's costly
# optimisation passes made the default run about a quarter faster; XLA:CPU's loop emitters instead
# of its MLIR fusion emitters then halved the compile time left (all tests in one run on a 2-core
# AVX2 EPYC: 1,242 -> 496 s of XLA compiles, 17.4 -> 10.2-11.2 min of wall time). The programs
# compute the same thing (no fast-math is involved; the emitters are compared on a train step in
# test_cpu_dots.py), so every numeric check still applies.
FAST_CODEGEN_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LOOP_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters=false"
FAST_COMPILE = f"{FAST_CODEGEN_FLAGS} {LOOP_EMITTERS_FLAG}"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax
import numpy as np
import pytest

from rljax.compile_cache import enable_compilation_cache
from rljax.models import Model, preset

# Programs that compile in 0.5 s or more, the library's default threshold: storing every program was
# slower than compiling the quick ones again (six RL test files: 278 s against 188 s).
enable_compilation_cache(min_compile_s=0.5)


def pytest_unconfigure(config):
    if os.environ.get("RLJAX_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["RLJAX_COMPILATION_CACHE"], ignore_errors=True)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny():
    """(model, params) for the tiny preset, float32."""
    model = Model(preset("tiny"))
    return model, model.init(jax.random.key(0))


def left_padded(lengths, width, vocab, seed=0, low=3):
    """Random left-padded prompts: tokens, mask [len(lengths), width] int32."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(low, vocab, n)
        mask[i, width - n:] = 1
    return tokens, mask


def run_with_devices(code: str, n_devices: int = 8, timeout: int = 600, xla_flags: str = FAST_COMPILE) -> str:
    """Run `code` in a fresh Python whose JAX sees `n_devices` simulated CPU devices, with
    `xla_flags` besides (the tests' own by default).

    XLA_FLAGS must be set before JAX starts, hence the subprocess. Returns stdout;
    fails the test with the subprocess's output on a non-zero exit.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices} {xla_flags}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc.stdout
