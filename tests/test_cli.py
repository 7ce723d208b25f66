import dataclasses
import json
import os
from dataclasses import dataclass

import pytest

from rljax.cli import parse_config


@dataclass
class Cfg:
    steps: int = 10
    lr: float = 1e-3
    preset: str = "tiny"
    smoke: bool = False
    sizes: tuple[int, ...] = (1, 2)
    note: str | None = None
    scan: bool | None = None


def test_defaults_and_overrides():
    assert parse_config(Cfg, []) == Cfg()
    c = parse_config(Cfg, ["--steps", "3", "--lr", "0.5", "--smoke", "--sizes", "4", "5", "6", "--note", "x"])
    assert c == Cfg(steps=3, lr=0.5, smoke=True, sizes=(4, 5, 6), note="x")
    assert parse_config(Cfg, ["--smoke", "false"]).smoke is False
    assert parse_config(Cfg, ["--scan", "false"]).scan is False and parse_config(Cfg, []).scan is None


@dataclass
class Commented:
    steps: int = 10  # optimizer steps, 100% of them
    schedule: tuple[str, ...] = ("warmup",
                                 "cosine")  # one entry a phase
    quiet: bool = False


def test_help_shows_each_fields_comment_and_default_and_the_modules_usage(capsys):
    """--help: the comment beside a field (a literal % kept) and its default; a dataclass without
    a docstring (whose __doc__ is then its signature) shows its module's docstring instead."""
    with pytest.raises(SystemExit):
        parse_config(Commented, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--steps STEPS optimizer steps, 100% of them (default: 10)" in out
    assert "one entry a phase (default: ('warmup', 'cosine'))" in out
    assert "--quiet [BOOL] (default: False)" in out
    assert "Commented(" not in out
    from experiments import grpo_gain

    with pytest.raises(SystemExit):
        parse_config(grpo_gain.Config, ["--help"])
    out = capsys.readouterr().out
    assert grpo_gain.__doc__.splitlines()[0] in out and "Config(" not in out
    assert "    python -m experiments.grpo_gain --seeds 0 1 2" in out  # the usage lines keep their layout
    assert "(default: 'offline')" in " ".join(out.split())  # a base class's (LoggingFlags) fields too


def test_bad_values_exit_with_usage():
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--steps", "many"])
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--unknown-flag", "1"])


def test_flags_must_be_spelled_out(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--step", "5"])  # a prefix of --steps: an error, not steps=5
    assert "unrecognized arguments: --step 5" in capsys.readouterr().err


def test_a_preset_leaves_explicit_values_alone():
    from rljax.cli import apply_preset, explicit_fields

    # --steps 10 equals the default: only the record of the command line tells it was given
    cfg = parse_config(Cfg, ["--smoke", "--steps", "10"])
    assert explicit_fields(cfg) == {"smoke", "steps"}
    assert apply_preset(cfg, steps=2, lr=0.5, preset="micro") == {"steps"}
    assert (cfg.steps, cfg.lr, cfg.preset) == (10, 0.5, "micro")
    built = Cfg(smoke=True, lr=0.1)  # built in Python: a value other than the default was set
    apply_preset(built, steps=2, lr=0.5)
    assert (built.steps, built.lr) == (2, 0.1)
    with pytest.raises(ValueError, match=r"has no field\(s\) \['stepz'\]"):
        apply_preset(built, stepz=1)


def test_an_experiments_smoke_sizes_yield_to_its_flags():
    from rljax.recipes.arithmetic_runs import SFTArithmeticConfig, apply_sft_smoke

    cfg = parse_config(SFTArithmeticConfig, ["--smoke", "--steps", "500", "--batch-size", "4"])
    apply_sft_smoke(cfg)
    smoke = SFTArithmeticConfig(smoke=True)
    apply_sft_smoke(smoke)
    assert (cfg.steps, cfg.batch_size) == (500, 4)  # given (500 is also the default)
    assert (cfg.preset, cfg.n_train, cfg.warmup_steps) == (smoke.preset, smoke.n_train, smoke.warmup_steps) == (
        "tiny", 256, 2)


def test_a_run_dir_refuses_another_configuration_unless_forced(tmp_path):
    import json

    from rljax.cli import CONFIG_CHANGES_FILE, ConfigMismatchError, save_config

    save_config(Cfg(steps=3), str(tmp_path))
    path = tmp_path / "config.json"
    first = path.read_bytes()
    assert json.loads(first)["sizes"] == [1, 2]
    save_config(Cfg(steps=3), str(tmp_path))  # the same run again: fine
    with pytest.raises(ConfigMismatchError) as info:
        save_config(Cfg(steps=4, sizes=(1, 2, 3)), str(tmp_path))
    msg = str(info.value)
    assert str(path) in msg and "sizes: [1, 2] -> [1, 2, 3]; steps: 3 -> 4" in msg and "--force-config" in msg
    assert path.read_bytes() == first and not (tmp_path / CONFIG_CHANGES_FILE).exists()

    save_config(Cfg(steps=4), str(tmp_path), allow_change=True)
    assert json.loads(path.read_text())["steps"] == 4
    (change,) = [json.loads(x) for x in (tmp_path / CONFIG_CHANGES_FILE).read_text().splitlines()]
    assert change["changes"] == {"steps": [3, 4]}


@dataclasses.dataclass
class _Where:
    steps: int = 1
    run_dir: str | None = None
    progress: bool = True


def test_where_a_run_lives_and_how_it_shows_may_change_on_resume(tmp_path):
    from rljax.cli import save_config

    from rljax.cli import ConfigMismatchError, config_differences

    save_config(_Where(), str(tmp_path))
    first = (tmp_path / "config.json").read_text()
    save_config(_Where(run_dir=str(tmp_path), progress=False), str(tmp_path))  # no error
    # the same run: config.json is kept as first written and no change is recorded
    assert (tmp_path / "config.json").read_text() == first
    assert not (tmp_path / "config_changes.jsonl").exists()
    assert config_differences(json.loads(first), dataclasses.asdict(_Where(run_dir="x", progress=False))) == {}
    with pytest.raises(ConfigMismatchError, match=r"steps: 1 -> 2"):  # a field that is not ignored still refuses
        save_config(_Where(steps=2, progress=False), str(tmp_path))


def test_an_experiment_refuses_a_changed_configuration_before_writing_anything(tmp_path):
    from rljax.cli import ConfigMismatchError, save_config
    from rljax.recipes.arithmetic_runs import SFTArithmeticConfig, apply_sft_smoke, train_sft

    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    first = SFTArithmeticConfig(smoke=True, run_dir=run_dir, lr=1e-3)
    apply_sft_smoke(first)
    save_config(first, run_dir)
    saved = open(os.path.join(run_dir, "config.json")).read()
    with pytest.raises(ConfigMismatchError, match=r"lr: 0\.001 -> 0\.003"):
        train_sft(SFTArithmeticConfig(smoke=True, run_dir=run_dir))
    assert os.listdir(run_dir) == ["config.json"] and open(os.path.join(run_dir, "config.json")).read() == saved


def test_a_missing_input_run_dir_is_an_error_unless_asked_to_create_it(tmp_path):
    from rljax.cli import check_input_dir
    from rljax.recipes.arithmetic_runs import RLArithmeticConfig, load_sft, train_rl
    from rljax.tokenizer import CharTokenizer

    missing, rl_dir = str(tmp_path / "sft-typo"), str(tmp_path / "rl")
    # --smoke would train the SFT run; an explicit --train-sft false wins over the preset
    cfg = parse_config(RLArithmeticConfig, ["--smoke", "--train-sft", "false", "--sft-run-dir", missing,
                                            "--run-dir", rl_dir])
    with pytest.raises(FileNotFoundError, match=f"--sft-run-dir: no directory '{missing}'; pass --train-sft"):
        train_rl(cfg)
    assert os.listdir(tmp_path) == []  # nothing written, not even the RL run's directory
    with pytest.raises(FileNotFoundError, match="--sft-run-dir"):
        load_sft(missing, CharTokenizer(), run_if_missing=True)
    assert check_input_dir(missing, "--x", create=True) is False and check_input_dir(str(tmp_path), "--x")


@dataclass
class Optional_:
    kl: float | None = 0.1
    dtype: str | None = "bfloat16"
    levels: tuple[int, ...] | None = (1, 2)
    flag: bool | None = True
    n: int = 3


def test_an_optional_field_is_set_back_to_none_by_none():
    assert parse_config(Optional_, ["--kl", "none", "--dtype", "None", "--levels", "none", "--flag", "NONE"]) == \
        Optional_(kl=None, dtype=None, levels=None, flag=None)
    assert parse_config(Optional_, ["--kl", "0.5", "--levels", "3", "4"]) == Optional_(kl=0.5, levels=(3, 4))
    with pytest.raises(SystemExit):
        parse_config(Optional_, ["--n", "none"])  # not optional: an int
    with pytest.raises(SystemExit):
        parse_config(Optional_, ["--levels", "3", "none"])


def test_bad_settings_are_refused_before_the_run_directory_records_them(tmp_path):
    """A bad preset, or minibatches that do not split an iteration's rows, fail before config.json is
    written (a corrected rerun in the same directory would otherwise be a configuration mismatch)."""
    from rljax.recipes.arithmetic_runs import RLArithmeticConfig, SFTArithmeticConfig, train_rl, train_sft

    sft_dir = tmp_path / "sft"
    with pytest.raises(KeyError, match="bogus"):
        train_sft(SFTArithmeticConfig(smoke=True, preset="bogus", run_dir=str(sft_dir), progress=False))
    assert not (sft_dir / "config.json").exists()
    sft_dir.mkdir(exist_ok=True)
    rl_dir = tmp_path / "rl"
    with pytest.raises(ValueError, match=r"^--minibatches 3: the 4 prompts x n = 4 = 16 sampled rows of an "
                                         r"iteration do not split into 3 minibatches$"):
        train_rl(RLArithmeticConfig(smoke=True, minibatches=3, sft_run_dir=str(sft_dir), run_dir=str(rl_dir)))
    assert not rl_dir.exists()


def test_flags_an_algorithm_does_not_use_are_warned_of():
    from rljax.algorithms import get_algorithm
    from rljax.recipes.arithmetic_runs import RLArithmeticConfig, rl_config
    from rljax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    cfg = parse_config(RLArithmeticConfig, ["--algo", "ppo", "--max-kl", "0.5", "--critic-epochs", "2"])
    with pytest.warns(UserWarning, match=r"^--max-kl, --critic-epochs: ppo does not use them"):
        rl = rl_config(cfg, get_algorithm("ppo"), tok)
    assert rl.critic_optimizer is None or rl.critic_epochs != 2  # not passed on
    trpo = parse_config(RLArithmeticConfig, ["--algo", "trpo", "--max-kl", "0.5", "--critic-epochs", "2"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl = rl_config(trpo, get_algorithm("trpo"), tok)
    assert rl.algo.loss.config.max_kl == 0.5 and rl.critic_epochs == 2


def test_a_smoke_run_trains_its_own_sft_run_and_a_full_run_refuses_one(tmp_path):
    """--smoke's default SFT folder is its own (runs/sft_arithmetic-smoke), not the full studies'
    default; a full study pointed at a smoke SFT run is refused naming it."""
    from experiments import expert_iteration, oreo_arithmetic, preference_arithmetic, reward_models
    from rljax.recipes.arithmetic_runs import (DEFAULT_SFT_RUN_DIR, SMOKE_SFT_RUN_DIR, RLArithmeticConfig,
                                               SFTArithmeticConfig, load_sft)
    from rljax.cli import apply_preset
    from rljax.tokenizer import CharTokenizer

    assert SMOKE_SFT_RUN_DIR != DEFAULT_SFT_RUN_DIR
    for cls in (RLArithmeticConfig, expert_iteration.Config, oreo_arithmetic.Config, preference_arithmetic.Config,
                reward_models.Config):
        assert cls().sft_run_dir == DEFAULT_SFT_RUN_DIR
    cfg = parse_config(RLArithmeticConfig, ["--smoke"])
    apply_preset(cfg, sft_run_dir=SMOKE_SFT_RUN_DIR)  # what the smoke preset does; an explicit flag would win
    assert cfg.sft_run_dir == SMOKE_SFT_RUN_DIR
    smoke_sft = tmp_path / "sft"
    smoke_sft.mkdir()
    saved = dataclasses.asdict(SFTArithmeticConfig(smoke=True, preset="tiny", steps=12, n_test=16))
    (smoke_sft / "config.json").write_text(json.dumps(saved, default=list))
    with pytest.raises(ValueError, match=rf"^--sft-run-dir: {smoke_sft} holds a --smoke SFT run \(preset tiny, 12 "
                                         r"steps, 16 test problems\), and this run is not a smoke run"):
        load_sft(str(smoke_sft), CharTokenizer(), smoke=False)


def test_a_preempted_study_says_how_to_resume_it(tmp_path):
    """Without --run-dir a study makes a new directory on every run, so "rerun the same command" would start
    over: the hint names the run's directory (the folder above the checkpoints that holds config.json)."""
    from rljax.cli import resume_hint
    from rljax.recipes.arithmetic_runs import RLArithmeticConfig

    run = tmp_path / "expert_iteration-20261207-040000"
    (run / "policy" / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    ckpt = str(run / "policy" / "checkpoints")
    assert resume_hint(RLArithmeticConfig(), ckpt) == (
        f"to resume, rerun the command with --run-dir {run} (without it a new run directory is made)")
    assert resume_hint(RLArithmeticConfig(run_dir=str(run)), ckpt) == "rerun the same command to resume"
    assert resume_hint(RLArithmeticConfig(), None) is None


def test_a_resume_may_log_and_save_at_other_intervals(tmp_path):
    from rljax.cli import ConfigMismatchError, save_config
    from rljax.recipes.arithmetic_runs import SFTArithmeticConfig

    save_config(SFTArithmeticConfig(log_every=10, checkpoint_every=50), str(tmp_path))
    save_config(SFTArithmeticConfig(log_every=5, checkpoint_every=20), str(tmp_path))  # no mismatch
    with pytest.raises(ConfigMismatchError, match="steps: 500 -> 400"):
        save_config(SFTArithmeticConfig(steps=400), str(tmp_path))


def test_a_study_started_on_several_processes_runs_only_when_written_for_them(monkeypatch, tmp_path):
    """`run` connects the processes the environment names before `main`; one not marked processes=True exits
    naming itself and the process count, before `main` runs (two real processes: tests/test_grpo_math.py).
    make_run_dir on one process makes its directory as before."""
    import jax

    from rljax import cli, distributed

    monkeypatch.setattr(distributed, "initialize", lambda: True)  # as if RLJAX_NUM_PROCESSES=2 were set
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    from rljax import compile_cache, host_memory

    monkeypatch.setattr(compile_cache, "enable_compilation_cache", lambda: None)  # no process-wide settings
    monkeypatch.setattr(host_memory, "release_compiler_memory", lambda: None)
    ran = []

    def main(cfg):
        ran.append(cfg)

    with pytest.raises(SystemExit) as e:
        cli.run(main, Cfg, ["--steps", "3"])
    assert ran == [] and str(e.value).startswith(f"{__name__}: runs on one process, but 2 were started")
    assert cli.run(lambda cfg: cfg.steps, Cfg, ["--steps", "3"], processes=True) == 3
    monkeypatch.undo()
    made = cli.make_run_dir(str(tmp_path), "study")
    assert os.path.isdir(made) and os.path.basename(made).startswith("study-")
    assert cli.make_run_dir(str(tmp_path), "study") != made  # a second one the same second gets a suffix
    with pytest.raises(ValueError, match="process 0 passed no text"):
        distributed.share_text(None)
