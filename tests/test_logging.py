"""Where the training loop's metrics go: TensorBoard and Weights & Biases through LoopConfig, the recipes'
TaskConfig and the experiments' flags, and what the progress bar shows."""
import json
import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest

from event_files import same_value, tb_scalars
from rljax.cli import LoggingFlags, parse_config, save_config
from rljax.metrics import WANDB_ID_FILE, WandbConfig, read_metrics
from rljax.phases import RL_PROGRESS, LoopConfig, run_loop
from rljax.state import OptimizerConfig, create_state


class FakeWandb:
    """A stand-in `wandb` module: records init's keyword arguments, each run's logs and finishes."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        calls = self.calls

        class Run:
            def log(self, data, step=None):
                calls.append(("log", dict(data), step))

            def finish(self):
                calls.append(("finish",))

        return Run()

    def logs(self):
        return [(step, data) for kind, *rest in self.calls if kind == "log" for data, step in [rest]]


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def _metrics_at(step):
    """A step's made-up metrics, distinct at every step (float32-exact, as TensorBoard stores them)."""
    return {"loss": np.float32(1.0 / step), "reward_mean": np.float32(step / 8), "accuracy": np.float32(step / 16),
            "tokens": 10}


def _step(state, batch):
    step = int(state.step) + 1
    return state.replace(step=state.step + 1), _metrics_at(step)


class _Data:
    def batch_at(self, position):
        return position


def test_run_loop_logs_to_tensorboard_and_wandb_and_a_resume_continues_both(tiny, tmp_path, fake_wandb):
    """LoopConfig(tensorboard=True, wandb=WandbConfig()): every logged row reaches TensorBoard (event files read
    back) and W&B (values and steps) as written to metrics.jsonl. A rerun resumed from an earlier checkpoint
    than the killed run logged (checkpoint 4 lost) continues the same W&B run, and TensorBoard's view drops
    the killed run's points past the checkpoint, as metrics.jsonl does."""
    model, _ = tiny
    state = create_state(model, OptimizerConfig(), jax.random.key(0))
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"what": "test"}, f)
    loop = LoopConfig(steps=4, log_every=1, checkpoint_every=2, progress=False, tensorboard=True,
                      wandb=WandbConfig(project="rljax-test"))
    run_loop(state, _step, _Data(), loop, run_dir=run_dir, name="rl")
    (kind, init), *_ = fake_wandb.calls
    run_id = open(os.path.join(run_dir, WANDB_ID_FILE)).read().strip()
    assert kind == "init" and init["mode"] == "offline" and init["dir"] == run_dir and init["id"] == run_id
    assert init["project"] == "rljax-test" and init["config"] == {"what": "test"} and init["resume"] == "allow"
    assert [s for s, _ in fake_wandb.logs()] == [1, 2, 3, 4] and fake_wandb.calls[-1] == ("finish",)

    shutil.rmtree(os.path.join(run_dir, "checkpoints", "4"))  # killed after logging step 4, before checkpointing it
    fake_wandb.calls.clear()
    run_loop(state, _step, _Data(), LoopConfig(**{**loop.__dict__, "steps": 6}), run_dir=run_dir, name="rl")
    assert fake_wandb.calls[0][1]["id"] == run_id  # the same W&B run, resumed
    assert [s for s, _ in fake_wandb.logs()] == [3, 4, 5, 6] and fake_wandb.calls[-1] == ("finish",)

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3, 4 of the killed run dropped, logged again
    for step, data in fake_wandb.logs():
        (row,) = [r for r in rows if r["step"] == step]
        assert data == {k: v for k, v in row.items() if k not in ("step", "time")}
        assert data["rl/reward_mean"] == float(_metrics_at(step)["reward_mean"])
    shown = tb_scalars(os.path.join(run_dir, "tb"))
    assert sorted(shown) == sorted(k for k in rows[0] if k not in ("step", "time"))
    for tag, points in shown.items():
        assert [s for s, _ in points] == [1, 2, 3, 4, 5, 6], tag
        assert all(same_value(v, float(np.float32(r[tag]))) for (_, v), r in zip(points, rows)), tag
    # without the restart marker, TensorBoard would show steps 3 and 4 twice
    assert [s for s, _ in tb_scalars(os.path.join(run_dir, "tb"), purge=False)["rl/loss"]] == [1, 2, 3, 4, 3, 4, 5, 6]


def test_wandb_needs_a_run_dir():
    with pytest.raises(ValueError, match="LoopConfig.wandb needs a run_dir"):
        run_loop(None, _step, _Data(), LoopConfig(steps=1, wandb=WandbConfig()))


def test_progress_bar_shows_the_phases_metrics(tiny, capsys):
    """The bar shows the metrics its phase names, when the step reports them, then tokens/s: loss by
    default, reward / accuracy / KL for RL (RL_PROGRESS; no KL here: the step reports none)."""
    model, _ = tiny
    state = create_state(model, OptimizerConfig(), jax.random.key(0))
    run_loop(state, _step, _Data(), LoopConfig(steps=2, log_every=1), name="rl", progress_metrics=RL_PROGRESS)
    err = capsys.readouterr().err
    assert "reward=0.25 acc=0.125 tok/s=" in err and "loss=" not in err and "kl=" not in err
    run_loop(state, _step, _Data(), LoopConfig(steps=2, log_every=1), name="sft")
    err = capsys.readouterr().err
    assert "loss=0.5 tok/s=" in err and "reward=" not in err


def test_the_rl_phase_asks_for_reward_and_accuracy_on_its_bar(monkeypatch):
    import rljax.phases as phases
    import rljax.rl

    seen = {}
    monkeypatch.setattr(rljax.rl, "make_rl_iteration", lambda *a, **k: object())
    monkeypatch.setattr(phases, "run_loop", lambda *a, **k: seen.update(k))
    phases.rl(None, None, None, types.SimpleNamespace(max_refills=0, staleness=0), model=None, decode=None,
              loop=LoopConfig(steps=1))
    assert seen["name"] == "rl" and seen["progress_metrics"] == RL_PROGRESS
    assert RL_PROGRESS == {"reward": "reward_mean", "acc": "accuracy", "kl": "kl_k3"}


def test_the_recipes_pass_tensorboard_and_wandb_to_the_loop(tmp_path, fake_wandb):
    """`SFTTaskConfig(tensorboard=..., wandb=...)`: one real SFT run whose W&B logs and TensorBoard events
    equal its history; the W&B config is the run's config.json; an offline W&B run needs a run_dir."""
    from test_recipes_tasks import SFT_ROWS, small_model

    from rljax.recipes import SFTTaskConfig, sft

    cfg = SFTTaskConfig(steps=2, batch_size=4, lr=3e-3, progress=False, tensorboard=True,
                        wandb=WandbConfig(group="g"))
    result = sft(small_model(), SFT_ROWS, cfg, run_dir=str(tmp_path / "run"))
    init = fake_wandb.calls[0][1]
    assert init["group"] == "g" and init["config"]["task"] == "sft"
    assert init["config"]["config"]["wandb"]["group"] == "g"  # the run's config.json, the task's config in it
    logged = fake_wandb.logs()
    assert [s for s, _ in logged] == [h["step"] for h in result.history] == [1, 2]
    for (step, data), h in zip(logged, result.history):
        assert data["sft/loss"] == h["loss"]
    shown = tb_scalars(tmp_path / "run" / "tb")
    assert [p for _, p in shown["sft/loss"]] == [float(np.float32(h["loss"])) for h in result.history]
    with pytest.raises(ValueError, match="offline W&B run"):
        sft(small_model(), SFT_ROWS, cfg)  # no run_dir: the offline files would go to a deleted directory


def test_the_experiments_logging_flags(tmp_path):
    from experiments import rl_arithmetic

    Config = rl_arithmetic.Config
    cfg = parse_config(Config, ["--wandb", "--wandb-project", "p", "--no-tensorboard", "--no-progress"])
    assert (cfg.tensorboard, cfg.progress) == (False, False)
    assert cfg.loop_logging() == dict(tensorboard=False, wandb=WandbConfig(project="p", mode="offline"))
    assert parse_config(Config, []).loop_logging() == dict(tensorboard=None, wandb=None)
    assert parse_config(Config, ["--tensorboard"]).tensorboard is True
    with pytest.raises(ValueError, match="--wandb-mode"):
        parse_config(Config, ["--wandb-mode", "offlin"])
    # how a run is logged is not what it computes: a resume may switch the flags
    save_config(Config(lr=1e-5), str(tmp_path))
    before = (tmp_path / "config.json").read_bytes()
    save_config(Config(lr=1e-5, wandb=True, wandb_mode="online", tensorboard=False), str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == before
    assert {f for f in LoggingFlags.__dataclass_fields__} <= set(json.loads(before))
