import os
import subprocess
import sys
import textwrap

# Tests never reach the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Experiments started by the tests (in process or as subprocesses) keep their compiled programs
# out of the user's ~/.cache (rljax.compile_cache); tests of the cache pass their own directory.
os.environ.setdefault("RLJAX_COMPILATION_CACHE", "off")
# XLA compilation, not execution, dominates these tiny-model tests: skipping LLVM's costly
# optimisation passes makes the default run about a quarter faster; the programs compute the
# same thing (no fast-math is involved), so every numeric check still applies.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax
import numpy as np
import pytest

from rljax.models import Model, preset

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


def run_with_devices(code: str, n_devices: int = 8, timeout: int = 600) -> str:
    """Run `code` in a fresh Python whose JAX sees `n_devices` simulated CPU devices.

    XLA_FLAGS must be set before JAX starts, hence the subprocess. Returns stdout;
    fails the test with the subprocess's output on a non-zero exit.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices} {FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc.stdout
