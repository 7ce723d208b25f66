"""Faults inside run_loop: SIGTERM/SIGINT preemption (finish the step, checkpoint, exit 143/130),
an exception mid-run (the last finished step is saved first), and resumed metrics without
duplicated steps. Every rerun is compared with an uninterrupted run, number for number."""
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from rljax.checkpoint import Checkpointer
from rljax.metrics import MetricsWriter, read_metrics
from rljax.phases import LoopConfig, Preempted, run_loop
from rljax.state import OptimizerConfig, TrainState, make_optimizer, make_train_step, owned_copy

# A linear regression trained by the library's own jitted, donating AdamW step: run_loop sees what a
# phase gives it, and the test compiles in a moment instead of the seconds a transformer takes.
OPT = OptimizerConfig(lr=0.1, total_steps=6, warmup_steps=0)
STEPS = 6
_STEP = []


def _batch(position):
    x = np.random.default_rng(position).normal(size=(8, 3)).astype(np.float32)
    return x, x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.25


class _Data:
    def batch_at(self, position):
        return _batch(position)


def _state():
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=make_optimizer(OPT).init(params),
                      rng=jax.random.key(0), skipped_steps=jnp.array(0, jnp.int32))


def _loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2), {}


def train(run_dir, *, kill_at=0, sig=signal.SIGTERM, fail_at=0):
    """STEPS AdamW steps in run_dir (resuming what is there). kill_at=k: the process signals
    itself `sig` while step k runs; fail_at=k: step k raises before it starts (as a reward
    function would, so the state it was given is not donated)."""
    if not _STEP:
        _STEP.append(make_train_step(_loss, OPT))  # one compile per process

    def step(state, batch):
        k = int(state.step) + 1
        if k == fail_at:
            raise RuntimeError(f"reward function failed at step {k}")
        out = _STEP[0](state, batch)
        if k == kill_at:
            os.kill(os.getpid(), sig)  # delivered now, in the middle of step k
        return out

    return run_loop(_state(), step, _Data(), LoopConfig(steps=STEPS, log_every=1, progress=False),
                    run_dir=run_dir, name="sft")


@dataclass
class _Cli:
    run_dir: str = ""
    kill_at: int = 0


def _cli_main():
    """Entry point of the subprocess: the experiments' `rljax.cli.run` around `train`."""
    from rljax.cli import run

    run(lambda cfg: train(cfg.run_dir, kill_at=cfg.kill_at), _Cli)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its final state and its per-step losses."""
    d = str(tmp_path_factory.mktemp("reference"))
    state = train(d)
    return state, [r["sft/loss"] for r in read_metrics(d)]


def _same_state(a, b):
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.step)),
                    jax.tree.leaves((b.params, b.opt_state, b.step)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _checkpoints(run_dir):
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ck:
        return ck.all_steps()


def test_sigterm_mid_run_checkpoints_that_step_exits_143_and_the_rerun_loses_nothing(tmp_path, reference):
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), JAX_PLATFORMS="cpu")
    code = "import test_preemption; test_preemption._cli_main()"
    proc = subprocess.run([sys.executable, "-c", code, "--run-dir", run_dir, "--kill-at", "3"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    said, hint = proc.stderr.strip().splitlines()[-2:]
    assert said == (f"[sft] preempted by SIGTERM after step 3: checkpoint at step 3 in "
                    f"{os.path.join(run_dir, 'checkpoints')}; the phase resumes from it when run again in this run "
                    "directory")
    assert hint == "rerun the same command to resume"  # --run-dir was given
    assert _checkpoints(run_dir) == [3]  # the step running when the signal came was finished and saved
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]  # and logged

    ref_state, ref_losses = reference
    assert ref_losses[-1] < 0.9 * ref_losses[0]  # it learns: the comparison is not between constants
    _same_state(train(run_dir), ref_state)  # the rerun, bit for bit the uninterrupted run
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # every step logged once
    assert [r["sft/loss"] for r in rows] == ref_losses
    events = [r for r in read_metrics(run_dir, events=True) if "event" in r]
    assert [(e["step"], e["event"], e["phase"]) for e in events] == [(3, "resumed", "sft/")]


def test_an_exception_at_step_k_saves_step_k_minus_1_and_the_rerun_matches(tmp_path, reference):
    run_dir = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="reward function failed at step 4"):
        train(run_dir, fail_at=4)
    assert _checkpoints(run_dir) == [3]  # no checkpoint was due; the 3 finished steps were saved anyway
    ref_state, ref_losses = reference
    _same_state(train(run_dir), ref_state)
    assert [r["sft/loss"] for r in read_metrics(run_dir)] == ref_losses


def _counting_step(state, batch):
    """A cheap step: new arrays (as a donating jit would return), step + 1, loss = the batch."""
    return owned_copy(state).replace(step=state.step + 1), {"loss": np.float32(batch), "skipped": np.int32(0)}


class _Positions:
    def batch_at(self, position):
        return float(position)


def test_sigint_in_process_raises_preempted_130_and_restores_the_handlers(tmp_path):
    state = _state()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def step(state, batch):
        if batch == 1.0:  # step 2
            os.kill(os.getpid(), signal.SIGINT)  # without run_loop's handler: KeyboardInterrupt here
        return _counting_step(state, batch)

    with pytest.raises(Preempted) as info:
        run_loop(state, step, _Positions(), LoopConfig(steps=5, log_every=10, progress=False),
                 run_dir=str(tmp_path), name="rm")
    e = info.value
    assert (e.step, e.signum, e.exit_code, e.name) == (2, signal.SIGINT, 130, "rm")
    assert str(e).startswith("[rm] preempted by SIGINT after step 2: checkpoint at step 2 in ")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert _checkpoints(str(tmp_path)) == [2]
    assert [(r["step"], r["rm/loss"]) for r in read_metrics(str(tmp_path))] == [(2, 1.0)]  # logged though not due


def test_a_second_signal_stops_at_once_and_still_saves_the_last_finished_step(tmp_path):
    state = _state()

    def step(state, batch):
        if batch == 2.0:  # step 3: the second SIGTERM interrupts it before it returns
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return _counting_step(state, batch)

    with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
        run_loop(state, step, _Positions(), LoopConfig(steps=5, progress=False), run_dir=str(tmp_path))
    assert _checkpoints(str(tmp_path)) == [2]


def test_a_step_that_consumed_its_state_before_failing_leaves_the_last_checkpoint(tmp_path, capsys):
    state = _state()

    def step(state, batch):
        if batch == 3.0:  # step 4 donates (deletes) its input, then fails
            jax.tree.map(lambda x: x.delete(), state)
            raise FloatingPointError("failed after donating")
        return _counting_step(state, batch)

    with pytest.raises(FloatingPointError, match="failed after donating"):
        run_loop(state, step, _Positions(), LoopConfig(steps=6, checkpoint_every=2, progress=False),
                 run_dir=str(tmp_path))
    assert _checkpoints(str(tmp_path)) == [2]
    assert "consumed the state; the latest checkpoint (step 2)" in capsys.readouterr().out


def test_outside_the_main_thread_no_handlers_are_installed():
    state = _state()
    before = signal.getsignal(signal.SIGTERM)
    seen, out = [], {}

    def step(state, batch):
        seen.append(signal.getsignal(signal.SIGTERM))
        return _counting_step(state, batch)

    worker = threading.Thread(target=lambda: out.update(
        state=run_loop(state, step, _Positions(), LoopConfig(steps=2, progress=False))))
    worker.start()
    worker.join()
    assert int(out["state"].step) == 2 and seen == [before, before]


def test_a_resumed_run_drops_the_killed_runs_lines_past_its_checkpoint(tmp_path):
    """A run killed hard (SIGKILL) after logging steps 5 and 6 but checkpointing only step 4:
    the rerun logs 5 and 6 again, so metrics.jsonl must keep them once, with the rerun's values."""
    state = _state()
    cfg = LoopConfig(steps=8, log_every=1, checkpoint_every=2, progress=False)
    run_loop(state, _counting_step, _Positions(), cfg, run_dir=str(tmp_path / "ref"), name="sft")

    run_dir = str(tmp_path / "run")
    run_loop(state, _counting_step, _Positions(), LoopConfig(steps=4, log_every=1, progress=False),
             run_dir=run_dir, name="sft")
    with MetricsWriter(run_dir) as w:  # what the killed run wrote after its last checkpoint
        for s in (5, 6):
            w.write(s, {"loss": -1.0}, prefix="sft/")
        w.write(6, {"score": 0.5}, prefix="sft/eval/")
        w.write(6, {"loss": 9.0}, prefix="other/")  # another phase sharing the file: kept
    run_loop(state, _counting_step, _Positions(), cfg, run_dir=run_dir, name="sft")

    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "sft/tokens_per_s")}  # noqa: E731
                          for r in rows if "other/loss" not in r]
    assert strip(read_metrics(run_dir)) == strip(read_metrics(str(tmp_path / "ref")))
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 6, 5, 6, 7, 8]  # "other/" kept at 6
    assert [r["other/loss"] for r in read_metrics(run_dir) if "other/loss" in r] == [9.0]
