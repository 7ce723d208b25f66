"""The two training runs on an embedded task (`rljax.tasks`: arithmetic by default, sorting, countdown,
rg:<generator>), shared by the studies in experiments/:

  train_sft(SFTArithmeticConfig)  SFT from scratch, held-out exact match before and after
                                  (`python -m experiments.sft_arithmetic [--task countdown]`)
  load_sft(sft_run_dir, tok)      the model, final params and config of a finished SFT run
  sft_split(sft_cfg)              (task, train, test): the SFT run's task and problems
  train_rl(RLArithmeticConfig)    RL with any rljax.algorithms entry from a finished SFT run
                                  (`python -m experiments.rl_arithmetic`); on_policy_distill's teacher
                                  is the final policy of the SFT run in teacher_run_dir

The configs' `task` field names the task (`rljax.tasks.get_task`); "arithmetic" gives exactly the
problems, rewards and numbers of the runs before tasks existed, and a saved config.json without the
field is an arithmetic run (`rljax.cli.ADDED_FIELDS`). An RL run (or a study) on an SFT run of
another task is an error naming both.

Each run writes config.json, metrics.jsonl, checkpoints/ and results.json under its run directory;
running it again with the same run_dir resumes from the last checkpoint, provided the configuration
is the same (`rljax.cli.save_config`; force_config=True records a change instead). An RL run's
sft_run_dir must exist unless train_sft=True (or --smoke) asks to train the SFT run there first.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass

import jax

from rljax.algorithms import get_algorithm
from rljax.cli import (IGNORED_FIELDS, LoggingFlags, apply_preset, check_input_dir, explicit_fields, make_run_dir,
                       save_config)
from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.eval import exact_match, finished_run, load_finished
from rljax.losses import TRPOConfig
from rljax.losses.actor_critic import with_value_head
from rljax.metrics import plot_metrics, read_metrics
from rljax.models import Model, preset
from rljax.phases import LoopConfig, PromptBatch, SFTPhaseConfig, rl, sft
from rljax.rewards import weighted_sum
from rljax.rl import RLConfig, create_rl_state
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig, create_state
from rljax.tasks import Task, get_task, task_slug
from rljax.tokenizer import CharTokenizer

__all__ = ["SFTArithmeticConfig", "RLArithmeticConfig", "RL_IGNORED_FIELDS", "apply_sft_smoke", "sft_optimizer",
           "build_model", "train_sft", "read_sft_config", "load_sft", "sft_split", "check_same_task", "check_sft_task",
           "needs_steps", "rule_reward", "train_rl"]


# ----------------------------------------------------------------------------- SFT
# The SFT run the studies start from when --sft-run-dir is not given; --smoke runs train and use their own
# (a smoke run's tiny model in the default folder would become every later full study's start)
DEFAULT_SFT_RUN_DIR = "runs/sft_arithmetic-default"
SMOKE_SFT_RUN_DIR = "runs/sft_arithmetic-smoke"

@dataclass
class SFTArithmeticConfig(LoggingFlags):
    """SFT on an embedded task (arithmetic by default): held-out exact-match accuracy before and after."""

    task: str = "arithmetic"  # rljax.tasks.get_task: arithmetic, sorting, countdown, rg:<generator>
    preset: str = "small"
    dtype: str = "float32"
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    levels: tuple[int, ...] = (1,)
    n_train: int = 1000
    n_test: int = 128
    max_new_tokens: int = 48
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    run_dir: str | None = None
    run_root: str = "runs"
    progress: bool = True
    evaluate: bool = True
    smoke: bool = False
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


def sft_optimizer(cfg: SFTArithmeticConfig) -> OptimizerConfig:
    return OptimizerConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=max(cfg.steps, 1),
                           schedule="cosine", weight_decay=0.01)


def build_model(cfg: SFTArithmeticConfig, tok) -> Model:
    return Model(preset(cfg.preset, vocab_size=tok.vocab_size, dtype=cfg.dtype))


def apply_sft_smoke(cfg: SFTArithmeticConfig) -> None:
    """With cfg.smoke, the seconds-long sizes, except for fields the user set (`rljax.cli.apply_preset`)."""
    if cfg.smoke:
        apply_preset(cfg, preset="tiny", steps=12, batch_size=8, n_train=256, n_test=16, checkpoint_every=6,
                     log_every=4, max_new_tokens=24, warmup_steps=2)


def needs_steps(task: Task, what: str) -> Task:
    """`task` when it has steps (a step checker and a separator), else a ValueError naming the task and
    `what` (the option or part that needs them)."""
    if not task.has_steps or not task.separator:
        raise ValueError(f"{what} needs a task with steps, and task {task.name!r} has none (no step checker); "
                         f"use a task with steps (arithmetic, sorting, countdown) or leave {what} out")
    return task


def rule_reward(task: Task, step_reward: float = 0.0):
    """The rule reward RL optimises on `task`: fn(prompts, completions, *, problems) -> float32[B] =
    1 * task.check + 0.1 * task.well_formed (when the task has a format check) + step_reward * task.credit
    (the step credit; step_reward > 0 needs a task with steps). On arithmetic this is exactly
    arithmetic_answer_reward + 0.1 * arithmetic_format_reward + step_reward * arithmetic_step_reward."""
    terms = [(1.0, task.answer_reward())] + ([(0.1, task.format_reward())] if task.well_formed is not None else [])
    if step_reward:
        terms.append((step_reward, needs_steps(task, f"--step-reward {step_reward:g}").step_reward()))
    return weighted_sum(*terms)


def sft_split(sft_cfg: SFTArithmeticConfig) -> tuple[Task, list, list]:
    """(task, train, test) of the SFT run `sft_cfg`: `task.split(n_train, n_test, levels, seed)`, which for
    the arithmetic task is `rljax.data.arithmetic.make_split` with the same arguments."""
    task = get_task(sft_cfg.task)
    train, test = task.split(sft_cfg.n_train, sft_cfg.n_test, levels=sft_cfg.levels, seed=sft_cfg.seed)
    return task, train, test


def check_same_task(task: str, sft_cfg: SFTArithmeticConfig) -> None:
    """A study's --task must be its SFT run's task (whose split and model it uses): else a ValueError naming both."""
    if task != sft_cfg.task:
        raise ValueError(f"--task {task!r}, but the SFT run in {sft_cfg.run_dir} was trained on task "
                         f"{sft_cfg.task!r}: pass --task {sft_cfg.task} or an SFT run of {task!r} as --sft-run-dir")


def check_sft_task(task: str, sft_run_dir: str) -> None:
    """Before a study makes its run directory: when `sft_run_dir` holds a saved SFT config, its task must be
    `task` (`check_same_task`); a directory without one is left to `load_sft`."""
    if os.path.exists(os.path.join(sft_run_dir, "config.json")):
        check_same_task(task, read_sft_config(sft_run_dir))


def _greedy_eval(which: str, params, model, tok, task: Task, test, max_new_tokens: int, *, texts: bool = False):
    """Held-out greedy exact match, announced with its size and timed: accuracy (and the texts with `texts`)."""
    print(f"evaluating {which} policy on {len(test)} held-out problems (greedy) ...", end=" ", flush=True)
    t = time.perf_counter()
    accuracy, outputs = exact_match(params, model, tok, test, max_new_tokens, check=task.check, prompt=task.prompt)
    print(f"{accuracy:.1%} ({time.perf_counter() - t:.0f} s)", flush=True)
    return (accuracy, outputs) if texts else accuracy


def train_sft(cfg: SFTArithmeticConfig) -> dict:
    """Train (or resume) the SFT run of `cfg` in cfg.run_dir (default: a new directory under run_root);
    held-out greedy exact match before and after (cfg.evaluate). Writes config.json, metrics.jsonl,
    checkpoints/, loss.png and results.json; returns the results."""
    apply_sft_smoke(cfg)
    task = get_task(cfg.task)  # an unknown name fails here, before a run directory is made
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, f"sft_{task_slug(cfg.task)}")
    tok = CharTokenizer()
    # the model, data and optimizer check the settings: a bad one is refused before config.json records it
    model = build_model(cfg, tok)
    _, train, test = sft_split(cfg)
    data = BatchIterator([(task.prompt(p), task.reference(p)) for p in train], cfg.batch_size,
                         lambda rows: collate_prompt_completion(tok, rows, max_length=model.config.max_seq_len),
                         seed=cfg.seed)
    opt = sft_optimizer(cfg)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir, allow_change=cfg.force_config)
    state = create_state(model, opt, jax.random.key(cfg.seed))
    print(f"sft_arithmetic: task {cfg.task}, preset {cfg.preset} ({model.config.num_params()/1e6:.2f}M params), "
          f"{len(train)} train / {len(test)} test problems, levels {cfg.levels}, {cfg.steps} steps x "
          f"{cfg.batch_size}; run dir {run_dir}")

    before = _greedy_eval("the initial", state.params, model, tok, task, test, cfg.max_new_tokens) \
        if cfg.evaluate else None
    t0 = time.perf_counter()
    phase = SFTPhaseConfig(optimizer=opt, loop=LoopConfig(steps=cfg.steps, log_every=cfg.log_every,
                                                          checkpoint_every=cfg.checkpoint_every,
                                                          progress=cfg.progress, **cfg.loop_logging()))
    state = sft(state, data, phase, model=model, run_dir=run_dir)
    train_s = time.perf_counter() - t0
    results = dict(config=asdict(cfg), run_dir=run_dir, params=model.config.num_params(), train_seconds=train_s)
    if cfg.evaluate:
        after, texts = _greedy_eval("the SFT", state.params, model, tok, task, test, cfg.max_new_tokens, texts=True)
        results.update(accuracy_before=before, accuracy_after=after,
                       examples=[dict(prompt=task.prompt(p), target=task.reference(p), output=t)
                                 for p, t in zip(test[:5], texts[:5])])
        print(f"\n| held-out exact match ({len(test)} problems) | accuracy |\n|---|---|\n"
              f"| before SFT | {before:.1%} |\n| after {cfg.steps} SFT steps | {after:.1%} |\n")
        for e in results["examples"][:3]:
            print(f"  {e['prompt']!r} -> {e['output']!r}  (target {e['target']!r})")
    try:
        results["plot"] = plot_metrics(run_dir, ["sft/loss"], os.path.join(run_dir, "loss.png"), smooth=3)
    except (ValueError, ImportError) as e:  # too few points or no matplotlib: the run itself is fine
        print(f"(no plot: {e})")
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"train time {train_s:.0f} s; wrote {run_dir}")
    return results


def read_sft_config(sft_run_dir: str, *, smoke: bool = False, progress: bool = True,
                    logging: dict | None = None, task: str = "arithmetic") -> SFTArithmeticConfig:
    """The SFT run's config: from its config.json when there (unknown fields ignored; it was saved with
    its smoke sizes already applied; no `task` field: "arithmetic"), else the defaults (with `smoke` and
    its sizes, and `task`); run_dir = sft_run_dir.
    logging: LoggingFlags fields (the caller's `logging_flags()`) that replace the saved ones."""
    saved = os.path.join(sft_run_dir, "config.json")
    shown = {"progress": progress, **(logging or {})}
    if os.path.exists(saved):
        with open(saved) as f:
            fields = {k: v for k, v in json.load(f).items() if k in SFTArithmeticConfig.__dataclass_fields__}
        fields["levels"] = tuple(fields.get("levels", (1,)))
        return SFTArithmeticConfig(**{**fields, "run_dir": sft_run_dir, **shown})
    cfg = SFTArithmeticConfig(run_dir=sft_run_dir, smoke=smoke, task=task, **shown)
    apply_sft_smoke(cfg)
    return cfg


def load_sft(sft_run_dir: str, tok, *, smoke: bool | None = None, progress: bool = True, run_if_missing: bool = False,
             create: bool = False, logging: dict | None = None, task: str | None = None):
    """(model, params, sft_cfg) of the SFT run in `sft_run_dir` at its final step; its config.json (when
    there) gives the model and the train/test split (`read_sft_config`). A run without its final
    checkpoint raises rljax.eval.UnfinishedRunError naming the directory, unless `run_if_missing`:
    then the SFT run is trained (or resumed) there first, with a message saying so. A directory that
    does not exist is FileNotFoundError naming --sft-run-dir (a mistyped path must not start a new
    run) unless `create`, which trains a new SFT run there. logging: as in `read_sft_config`, for that run.
    task: the caller's task; a new SFT run is on it, and an existing one on another task is a ValueError
    naming both (`check_same_task`), before anything trains. None: whatever task the run has.
    smoke: whether the caller is a --smoke run (the studies pass theirs): False refuses a --smoke SFT run,
    whose tiny model must not start a full study unnoticed; None (library use) loads any run."""
    check_input_dir(sft_run_dir, "--sft-run-dir", create=create, create_flag="--train-sft")
    sft_cfg = read_sft_config(sft_run_dir, smoke=bool(smoke), progress=progress, logging=logging,
                              task=task or "arithmetic")
    if sft_cfg.smoke and smoke is False:  # a throwaway model must not become a real study's start unnoticed
        raise ValueError(f"--sft-run-dir: {sft_run_dir} holds a --smoke SFT run (preset {sft_cfg.preset}, "
                         f"{sft_cfg.steps} steps, {sft_cfg.n_test} test problems), and this run is not a smoke "
                         "run: pass a full SFT run (e.g. the quickstart's <run>/sft, or train one with "
                         "`python -m experiments.sft_arithmetic`), or add --smoke")
    if task is not None:
        check_same_task(task, sft_cfg)
    if run_if_missing and not finished_run(sft_run_dir, sft_cfg.steps):
        print(f"no finished SFT checkpoint in {sft_run_dir}: running the SFT study first")
        train_sft(sft_cfg)
    model = build_model(sft_cfg, tok)
    target = create_state(model, sft_optimizer(sft_cfg), jax.random.key(0))
    return model, load_finished(sft_run_dir, target, steps=sft_cfg.steps).params, sft_cfg


# ----------------------------------------------------------------------------- RL
@dataclass
class RLArithmeticConfig(LoggingFlags):
    """RL on an embedded task (arithmetic by default) from the SFT run's final checkpoint (run first when missing)."""

    task: str = "arithmetic"  # the SFT run's task (rljax.tasks.get_task)
    algo: str = "grpo"
    iterations: int = 30
    prompts_per_iteration: int = 16
    n: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    lr: float = 2e-5
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    kl_coef: float = 0.0
    step_reward: float = 0.0  # weight of the fraction of right steps (partial credit) in the reward
    epochs: int = 1
    minibatches: int = 1
    max_refills: int = 0  # dynamic sampling (dapo): refill batches with informative groups
    staleness: int = 0  # A3C (with algo a2c): actor threads sample this many iterations ahead of the learner
    actors: int = 2  # A3C: actor threads
    max_kl: float = 0.01  # trpo: the trust region δ
    head_lr: float = 1e-3  # value head's learning rate (a2c, ppo: on the policy's backbone; trpo: the critic's)
    critic_lr: float = 1e-4  # trpo: the separate critic's learning rate
    critic_epochs: int = 4  # trpo: critic regression passes per iteration
    sft_run_dir: str = DEFAULT_SFT_RUN_DIR
    # on_policy_distill: the finished SFT run whose final policy is the teacher (its own preset, same tokenizer)
    teacher_run_dir: str | None = None
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    progress: bool = True
    track_kl: bool = True  # KL to the SFT policy every iteration (one reference forward; training is unchanged)
    eval_samples: int = 8  # held-out accuracy is also measured on this many samples per problem at temperature 1
    smoke: bool = False
    train_sft: bool = False  # sft_run_dir does not exist: train the SFT run there first (--smoke sets it)
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


def rl_config(cfg: RLArithmeticConfig, algo, tok) -> RLConfig:
    """The RLConfig of `cfg` for the registry entry `algo` (its kl_coef; TRPO's max_kl; a separate critic's
    optimizer and epochs where the algorithm has one); every setting checked (a batch of prompts x n rows
    that the minibatches do not split is a ValueError naming them). A flag the algorithm does not use
    (--max-kl without TRPO, --critic-lr / --critic-epochs without a separate critic) is warned of."""
    rows = cfg.prompts_per_iteration * cfg.n
    if rows % cfg.minibatches:
        raise ValueError(f"--minibatches {cfg.minibatches}: the {cfg.prompts_per_iteration} prompts x n = {cfg.n} "
                         f"= {rows} sampled rows of an iteration do not split into {cfg.minibatches} minibatches")
    given = explicit_fields(cfg)
    algo = algo.with_kl_coef(cfg.kl_coef)
    trpo, critic = isinstance(algo.loss.config, TRPOConfig), algo.needs().critic
    unused = [f"--{f.replace('_', '-')}" for f, used in (("max_kl", trpo), ("critic_lr", critic),
                                                         ("critic_epochs", critic)) if f in given and not used]
    if unused:
        warnings.warn(f"{', '.join(unused)}: {cfg.algo} does not use {'it' if len(unused) == 1 else 'them'} "
                      "(--max-kl is TRPO's trust region; --critic-lr and --critic-epochs train a separate critic, "
                      "which only trpo has)", stacklevel=3)
    if trpo:
        algo = algo.with_config(max_kl=cfg.max_kl)
    return RLConfig(algorithm=algo,
                    sampling=SampleConfig(max_new_tokens=cfg.max_new_tokens, n=cfg.n, temperature=cfg.temperature,
                                          eos_id=tok.eos_id, pad_id=tok.pad_id),
                    optimizer=OptimizerConfig(lr=cfg.lr, schedule="constant", b2=cfg.adam_b2, eps=cfg.adam_eps,
                                              head_lr=cfg.head_lr),
                    epochs=cfg.epochs, track_kl=cfg.track_kl,
                    minibatches=cfg.minibatches, max_refills=cfg.max_refills, staleness=cfg.staleness,
                    actors=cfg.actors,
                    # a separate critic's settings, only where there is one (make_rl_iteration warns otherwise)
                    **({} if not critic else dict(
                        critic_epochs=cfg.critic_epochs,
                        critic_optimizer=OptimizerConfig(lr=cfg.critic_lr, schedule="constant", head_lr=cfg.head_lr))))


# train_sft only says what to do when the input is missing, not what the run computes
RL_IGNORED_FIELDS = (*IGNORED_FIELDS, "train_sft")


def train_rl(cfg: RLArithmeticConfig, *, report: bool = True, sft_accuracy: tuple[float, float] | None = None) -> dict:
    """RL with cfg.algo from the SFT run in cfg.sft_run_dir (finished there first when it has no final
    checkpoint; trained there first when the directory does not exist only with cfg.train_sft);
    held-out accuracy of the SFT and RL policies, greedy and sampled (mean over
    cfg.eval_samples per problem at temperature 1, key 7 for every run). Writes config.json (checked
    against an existing one before anything runs) and results.json under cfg.run_dir; returns the results.
    report: print the run's summary table (a study that prints its own passes False). sft_accuracy:
    the SFT policy's (greedy, sampled) accuracy, when the caller measured it already for the same SFT
    run and evaluation settings (it depends only on those: another RL run from the same start)."""
    if cfg.smoke:
        apply_preset(cfg, iterations=3, prompts_per_iteration=4, n=4, max_new_tokens=16, train_sft=True,
                     sft_run_dir=SMOKE_SFT_RUN_DIR)
    task = get_task(cfg.task)
    if cfg.step_reward:
        needs_steps(task, f"--step-reward {cfg.step_reward:g}")
    check_input_dir(cfg.sft_run_dir, "--sft-run-dir", create=cfg.train_sft, create_flag="--train-sft")
    if get_algorithm(cfg.algo).needs().teacher:  # before anything runs
        if cfg.teacher_run_dir is None:
            raise ValueError(f"--teacher-run-dir: {cfg.algo} distils from a teacher; name the finished SFT run whose "
                             "final policy is the teacher")
        check_input_dir(cfg.teacher_run_dir, "--teacher-run-dir")
    elif cfg.teacher_run_dir is not None:
        raise ValueError(f"--teacher-run-dir: {cfg.algo} uses no teacher (only on_policy_distill does); drop it")
    check_sft_task(cfg.task, cfg.sft_run_dir)
    tok = CharTokenizer()
    algo = get_algorithm(cfg.algo)
    rl_cfg = rl_config(cfg, algo, tok)  # checks the settings before config.json records the run
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, f"rl_{task_slug(cfg.task)}-{cfg.algo}")
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=RL_IGNORED_FIELDS)
    model, params, sft_cfg = load_sft(cfg.sft_run_dir, tok, smoke=cfg.smoke, progress=cfg.progress,
                                      run_if_missing=True, create=cfg.train_sft, logging=cfg.logging_flags(),
                                      task=cfg.task)
    teacher_model = teacher_params = None
    if algo.needs().teacher:  # on_policy_distill: the teacher is the final policy of another finished SFT run
        teacher_model, teacher_params, _ = load_sft(cfg.teacher_run_dir, tok, smoke=cfg.smoke, progress=cfg.progress,
                                                    task=cfg.task)
    critic_model = critic_params = None
    if algo.needs().critic:  # trpo: a separate critic, initialised from the policy (V = 0 at first)
        critic_model, critic_params = with_value_head(model, params)
    elif algo.needs().values:  # a2c, ppo: a value head on the policy's backbone, V = 0 at first
        model, params = with_value_head(model, params)
    _, train, test = sft_split(sft_cfg)

    def collate(problems):
        tokens, mask = tok.encode_batch([task.prompt(p) for p in problems], padding_side="left")
        return PromptBatch(tokens=tokens, mask=mask, metadata={"problems": list(problems)})

    prompts = BatchIterator(train, cfg.prompts_per_iteration, collate, seed=cfg.seed + 1)
    accuracy_fn = task.answer_reward()
    reward = rule_reward(task, cfg.step_reward)
    state = create_rl_state(model, params, rl_cfg, jax.random.key(cfg.seed), critic_model=critic_model,
                            critic_params=critic_params, teacher_params=teacher_params, teacher_model=teacher_model)

    def evaluate(which: str, p) -> tuple[float, float]:
        """Held-out (greedy, sampled) accuracy; the sampled one is the mean over eval_samples at temperature 1,
        with one fixed key for every run, so runs differ only by their params."""
        print(f"evaluating {which} policy on {len(test)} held-out problems: greedy, then {cfg.eval_samples} samples "
              f"each at temperature 1 ...", end=" ", flush=True)
        t = time.perf_counter()
        greedy = exact_match(p, model, tok, test, sft_cfg.max_new_tokens, check=task.check, prompt=task.prompt)[0]
        sampled = exact_match(p, model, tok, test, sft_cfg.max_new_tokens, n=cfg.eval_samples, temperature=1.0,
                              key=jax.random.key(7), check=task.check, prompt=task.prompt)[0]
        print(f"greedy {greedy:.1%}, sampled {sampled:.1%} ({time.perf_counter() - t:.0f} s)", flush=True)
        return greedy, sampled

    print(f"rl_arithmetic: {cfg.algo} on {cfg.task} from the SFT run in {cfg.sft_run_dir}, {cfg.iterations} "
          f"iterations x "
          f"{cfg.prompts_per_iteration} prompts x {cfg.n} samples, seed {cfg.seed}; run dir {run_dir}", flush=True)
    if sft_accuracy is None:
        before, before_sampled = evaluate("the SFT", params)
    else:
        before, before_sampled = sft_accuracy
    t0 = time.perf_counter()
    state = rl(state, prompts, reward, rl_cfg, model=model, decode=tok.decode_batch, run_dir=run_dir,
               accuracy_fn=accuracy_fn, critic_model=critic_model, teacher_model=teacher_model,
               loop=LoopConfig(steps=cfg.iterations, log_every=1, checkpoint_every=50, progress=cfg.progress,
                               **cfg.loop_logging()))
    wall = time.perf_counter() - t0
    after, after_sampled = evaluate(f"the {cfg.algo.upper()}", state.policy.params)
    rows = [r for r in read_metrics(run_dir) if "rl/reward_mean" in r]
    first, last = rows[0], rows[-1]
    results = dict(config=asdict(cfg), run_dir=run_dir, accuracy_sft=before, accuracy_rl=after,
                   sampled_accuracy_sft=before_sampled, sampled_accuracy_rl=after_sampled,
                   reward_first=first["rl/reward_mean"], reward_last=last["rl/reward_mean"],
                   train_accuracy_first=first["rl/accuracy"], train_accuracy_last=last["rl/accuracy"],
                   kl_k3_last=last.get("rl/kl_k3"), wall_seconds=wall)
    if report:
        print(f"\n| {cfg.algo}, {cfg.iterations} iterations x {cfg.prompts_per_iteration} prompts x {cfg.n} | value |\n"
              f"|---|---|\n| held-out exact match after SFT, greedy | {before:.1%} |\n"
              f"| after RL, greedy | {after:.1%} |\n"
              f"| after SFT, sampled (T = 1, {cfg.eval_samples} per problem) | {before_sampled:.1%} |\n"
              f"| after RL, sampled | {after_sampled:.1%} |\n"
              f"| mean reward first / last iteration | {results['reward_first']:.3f} / {results['reward_last']:.3f} |\n"
              f"| wall time of RL | {wall:.0f} s |\n")
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results
