"""Does RL beat its SFT start by more than run-to-run noise? SFT once, then RL from it with several seeds.

    python -m experiments.grpo_gain                        # what `make quickstart` runs: ~8 minutes on 2 CPU cores
    python -m experiments.grpo_gain --seeds 0 1 2          # the README's study (run-to-run noise over seeds)
    python -m experiments.grpo_gain --algo rloo --lr 1e-5
    python -m experiments.grpo_gain --smoke
    python -m experiments.grpo_gain --wandb                # also log to Weights & Biases (offline, in each run dir)
    python -m experiments.grpo_gain --task countdown --max-new-tokens 56   # another task (rljax.tasks)

Runs the SFT study (`rljax.recipes.arithmetic_runs.train_sft`, skipped when its final checkpoint
is already in <run-dir>/sft), then the RL study (`train_rl`) once per seed from that checkpoint,
and reports held-out accuracy, greedy and sampled (temperature 1, the policy RL
trains; mean over `eval_samples` per problem): after SFT, after RL per seed, and
each gain's mean and standard deviation over seeds (the run-to-run noise), in
<run-dir>/results-<algo>-lr<lr>.json. The seed changes the prompt order and every
sampling key; the SFT model and the test set stay fixed. The defaults are sized
for a CPU: the tiny preset, stopped early in SFT so that RL has room to improve.

What it prints, for someone running it the first time: one line saying what it will do and
about how long that takes (`plan`), each evaluation as it starts and its time, the progress
bars (SFT: loss; RL: reward and accuracy), and at the end one table with the gains and what
they mean against the reference runs' noise (`summary`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from rljax.cli import LoggingFlags, apply_preset, make_run_dir, run
from rljax.eval import finished_run
from rljax.recipes.arithmetic_runs import RLArithmeticConfig, SFTArithmeticConfig, train_rl, train_sft
from rljax.tasks import get_task, task_slug

# The reference runs (README; 2 CPU cores, default settings, seeds 0 1 2; the Xeon with AMX, 2026-12-07, at 97afe30,
# the code since weight decay spares the stacked layers' norm scales, 9bff96e): held-out accuracy after SFT and the
# gain of GRPO over it, in percentage points, mean and standard deviation over the seeds.
REFERENCE = dict(sft_greedy=41.4, sft_sampled=28.0, gain_greedy=(5.2, 0.5), gain_sampled=(4.2, 0.1), seeds=3)
# one seed, default settings: the outcome to expect, in points (three seeds each gained +4.2 ± 0.1 sampled points
# on the AMX Xeon; before 9bff96e +4.0 ± 0.2 there and +4.1 ± 0.5 on a Zen 4 EPYC)
EXPECTED_SAMPLED_GAIN = (3.0, 5.0)

@dataclass
class Config(LoggingFlags):
    task: str = "arithmetic"  # rljax.tasks.get_task: arithmetic, sorting, countdown, rg:<generator>
    # SFT: levels 1-2 with many problems, so that held-out problems test arithmetic, not recall
    preset: str = "tiny"
    levels: tuple[int, ...] = (1, 2)
    n_train: int = 30_000
    n_test: int = 512
    sft_steps: int = 1000
    sft_batch: int = 64
    sft_lr: float = 1e-3
    # RL
    algo: str = "grpo"
    iterations: int = 300
    prompts_per_iteration: int = 16
    n: int = 8
    max_new_tokens: int = 40
    lr: float = 2e-5
    head_lr: float = 1e-3  # a2c, ppo: learning rate of the value head
    epochs: int = 1  # passes over each iteration's samples
    minibatches: int = 1  # updates per pass
    kl_coef: float = 0.0
    step_reward: float = 0.0
    eval_samples: int = 8
    track_kl: bool = False  # KL metrics cost a reference forward per iteration (~15%); results are identical
    seeds: tuple[int, ...] = (0,)
    run_dir: str | None = None
    run_root: str = "runs"
    progress: bool = True
    smoke: bool = False
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


# Seconds on 2 CPU cores (the reference machine), for the tiny preset: measured totals (README: 246 s of SFT,
# 210-237 s of RL per seed, 8 min 14 s in all) split into compile and per-example costs, the compile
# costs read off --smoke runs (about 2 minutes, most of it compiling).
_COST = dict(start=8.0, sft_compile=15.0, sft_example=0.0036, rl_compile_first=45.0, rl_compile_next=15.0,
             rl_sample=0.0043, eval_compile=10.0, eval_sequence=0.0012)


def estimate_seconds(cfg: Config, *, sft_done: bool = False, rl_done: tuple[bool, ...] = ()) -> float | None:
    """About how long `main(cfg)` takes on 2 CPU cores, or None for a preset other than tiny or a task other
    than arithmetic (not measured). sft_done / rl_done[i]: the SFT run / seed i's RL run is already finished
    (only evaluated)."""
    if cfg.preset != "tiny" or cfg.task != "arithmetic":
        return None
    c = _COST
    t = c["start"] + (0.0 if sft_done else c["sft_compile"] + c["sft_example"] * cfg.sft_steps * cfg.sft_batch)
    evals = 0
    for i, _ in enumerate(cfg.seeds):
        evals += 1 if i else 2  # the SFT policy is evaluated once, each RL policy once
        if not (rl_done[i] if i < len(rl_done) else False):
            t += c["rl_compile_next" if i else "rl_compile_first"]
            t += c["rl_sample"] * cfg.iterations * cfg.prompts_per_iteration * cfg.n
    t += evals * (c["eval_compile"] + c["eval_sequence"] * cfg.n_test * (1 + cfg.eval_samples))
    return t


def _iterations(cfg: Config) -> str:
    return f"{cfg.iterations} iteration{'' if cfg.iterations == 1 else 's'}"


def _duration(seconds: float) -> str:
    return f"about {max(1, round(seconds / 60))} minute{'s' if round(seconds / 60) > 1 else ''}"


def plan(cfg: Config, *, sft_done: bool = False, rl_done: tuple[bool, ...] = ()) -> str:
    """The first line `main` prints: what the command will do and about how long it takes."""
    name = cfg.algo.upper()
    seeds = f"seed {cfg.seeds[0]}" if len(cfg.seeds) == 1 else f"seeds {', '.join(map(str, cfg.seeds))}"
    sft = (f"reuse the finished SFT run ({cfg.sft_steps:,} steps)" if sft_done else
           f"SFT of the {cfg.preset} model on {cfg.task} ({cfg.sft_steps:,} steps)")
    what = (f"grpo_gain{' --smoke' if cfg.smoke else ''}: {sft}, then {name} from it ({_iterations(cfg)}, "
            f"{seeds}), then held-out accuracy before vs after {name}")
    if cfg.smoke:
        what += " (smoke sizes: a check that everything runs, the accuracies mean nothing)"
    seconds = estimate_seconds(cfg, sft_done=sft_done, rl_done=rl_done)
    when = (f"{_duration(seconds)} on 2 free CPU cores" if seconds is not None
            else f"time not measured for the {cfg.preset} preset on {cfg.task}")
    return f"{what}; {when}."


# Fields that do not change what the study computes (where it lives, how it is shown; track_kl only adds metrics)
_PRESENTATION = {"seeds", "run_dir", "run_root", "progress", "smoke", "force_config", "track_kl",
                 *(f.name for f in fields(LoggingFlags))}


def changed_settings(cfg: Config) -> dict:
    """{field: value} of the settings that differ from the quickstart's (the reference runs')."""
    default = Config()
    return {f.name: getattr(cfg, f.name) for f in fields(Config)
            if f.name not in _PRESENTATION and getattr(cfg, f.name) != getattr(default, f.name)}


def _flag(value) -> str:
    """A value as its command-line flag takes it."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _points(x: float) -> str:
    return f"{x:+.1f}"


def summary(cfg: Config, results: dict) -> str:
    """The final screen: one table (held-out accuracy after SFT and after RL, greedy and sampled, and the
    gain in percentage points) and what the gain means against the run-to-run noise. results: as `main`
    returns them ({"greedy": {"accuracy_sft", "accuracy_rl": [per seed]}, "sampled": {...}}, "run_dir")."""
    name = cfg.algo.upper()
    g, s = results["greedy"], results["sampled"]
    g_gain = [100 * (a - g["accuracy_sft"]) for a in g["accuracy_rl"]]
    s_gain = [100 * (a - s["accuracy_sft"]) for a in s["accuracy_rl"]]
    n = len(s_gain)
    table = [f"| held-out accuracy ({cfg.n_test} problems) | greedy "
             f"| sampled (T = 1, {cfg.eval_samples} per problem) |",
             "|---|---|---|",
             f"| after SFT ({cfg.sft_steps:,} steps) | {g['accuracy_sft']:.1%} | {s['accuracy_sft']:.1%} |"]
    for seed, ga, sa in zip(cfg.seeds, g["accuracy_rl"], s["accuracy_rl"]):
        table.append(f"| after {name} ({_iterations(cfg)}), seed {seed} | {ga:.1%} | {sa:.1%} |")
    if n == 1:
        table.append(f"| gain, percentage points | {_points(g_gain[0])} | {_points(s_gain[0])} |")
    else:
        table.append(f"| gain, points, mean ± std over {n} seeds | {_points(np.mean(g_gain))} ± "
                     f"{np.std(g_gain, ddof=1):.1f} | {_points(np.mean(s_gain))} ± {np.std(s_gain, ddof=1):.1f} |")
    paragraphs = []
    command = None
    ref_g, ref_s = REFERENCE["gain_greedy"], REFERENCE["gain_sampled"]
    changed = changed_settings(cfg)
    if cfg.smoke:
        paragraphs.append(f"--smoke: sizes that check that SFT, RL and the evaluations run end to end; a "
                          f"{cfg.sft_steps}-step SFT model gets almost nothing right, so these accuracies mean "
                          f"nothing. Run without --smoke for the study.")
    else:
        what = (f"What this means: {name} trains the sampled policy (temperature 1), so the sampled column is the "
                f"one to read. ")
        if changed:
            listed = ", ".join(f"--{k.replace('_', '-')} {_flag(v)}" for k, v in changed.items())
            what += (f"These settings differ from the quickstart's ({listed}), so its reference runs (GRPO gained "
                     f"{_points(ref_s[0])} ± {ref_s[1]} points sampled and "
                     f"{_points(ref_g[0])} ± {ref_g[1]} greedy over {REFERENCE['seeds']} seeds) are no yardstick; "
                     f"only several seeds tell a gain from noise.")
        else:
            what += (f"With these settings, {REFERENCE['seeds']} reference seeds on 2 CPU cores gained "
                     f"{_points(ref_s[0])} ± {ref_s[1]} points sampled and {_points(ref_g[0])} ± {ref_g[1]} greedy "
                     f"(mean ± std over seeds); a greedy accuracy a point or two from that means nothing.")
        paragraphs.append(what)
        paragraphs.append(_verdict(name, s_gain, reference=not changed))
        # a greedy gain beyond the reference seeds' spread (and a point or two of machine noise) is named
        if n == 1 and not changed and abs(g_gain[0] - ref_g[0]) > max(2 * ref_g[1], 2.0):
            did = f"Greedy {'gained' if g_gain[0] > 0 else 'lost'} {abs(g_gain[0]):.1f} points"
            ref = f"the reference seeds' {_points(ref_g[0])} ± {ref_g[1]}"
            paragraphs.append(f"{did}, more than {ref}: a bonus, not something to expect every time."
                              if g_gain[0] > ref_g[0] else
                              f"{did}, against {ref}: on one seed that can be chance; more seeds (below) tell.")
        start = (f" (reference: {REFERENCE['sft_greedy']}% greedy, {REFERENCE['sft_sampled']}% sampled)"
                 if cfg.task == "arithmetic" else "")
        paragraphs.append(f"Exact figures vary with the machine by a few points, the SFT start included{start}: "
                          f"the CPU's vector instructions and its matrix-product library (rljax.cpu_dots) change "
                          f"float rounding, and with it every sampled path.")
        if n == 1:
            seeds = tuple(cfg.seeds[0] + k for k in range(3))
            extra = estimate_seconds(dataclasses.replace(cfg, seeds=seeds), sft_done=True,
                                     rl_done=(True, False, False))
            paragraphs.append(f"To measure the run-to-run noise on this machine (reuses this SFT run and seed "
                              f"{cfg.seeds[0]}{f'; {_duration(extra)} more' if extra is not None else ''}):")
            flags = "".join(f" --{k.replace('_', '-')} {_flag(v)}" for k, v in changed.items())
            command = (f"    python -m experiments.grpo_gain --seeds {_flag(seeds)} --run-dir {results['run_dir']}"
                       f"{flags}")
    text = "\n".join(["", *table, ""] + [textwrap.fill(p, 100) for p in paragraphs])
    return text + ("\n" + command if command else "")


def _verdict(name: str, s_gain: list[float], *, reference: bool) -> str:
    """What the sampled gains (points, one per seed) say: against the expected range of the reference
    runs for one seed with the quickstart's settings, against their own spread for several seeds."""
    n = len(s_gain)
    if n == 1:
        gain = round(s_gain[0], 1)
        if not reference:
            return f"Sampled gain {_points(gain)} points, on one seed."
        lo, hi = EXPECTED_SAMPLED_GAIN
        text = (f"With one seed, a sampled gain of about {lo:+g} to {hi:+g} points is the expected "
                f"outcome; yours is {_points(gain)}: ")
        if lo <= gain <= hi:
            return text + "in that range, so your install behaves as the reference runs did."
        if 0 < gain <= hi + 2:
            return text + (f"a little outside that range, within what seed-to-seed noise (± "
                           f"{REFERENCE['gain_sampled'][1]} points) and the machine (a point or two) produce; "
                           f"nothing to worry about.")
        if gain > hi + 2:
            return text + (f"more than any reference seed gained. Not a problem in itself: a lower SFT start than "
                           f"the reference's ({REFERENCE['sft_sampled']}% sampled) leaves RL more room.")
        return text + ("no gain, which none of the reference seeds showed. Run more seeds (below) before concluding: "
                       "if their mean gain is near zero too, something differs from the reference setup.")
    mean, std = float(np.mean(s_gain)), float(np.std(s_gain, ddof=1))
    up = sum(x > 0 for x in s_gain)
    text = f"Sampled gain {_points(mean)} ± {std:.1f} points over {n} seeds ({up} of {n} gained"
    if std > 0:
        text += f"; the mean is {abs(mean) / std:.1f} standard deviations {'above' if mean >= 0 else 'below'} zero"
    text += "): "
    if up == n and (std == 0 or mean / std >= 2):
        return text + f"{name} beats its SFT start by more than the run-to-run noise."
    if mean > 0:
        return text + "positive, but not clearly above the run-to-run noise."
    return text + f"{name} did not beat its SFT start."


def main(cfg: Config) -> dict:
    t_start = time.perf_counter()
    if cfg.smoke:
        apply_preset(cfg, levels=(1,), n_train=256, n_test=16, sft_steps=12, sft_batch=8, iterations=2,
                     prompts_per_iteration=4, n=4, max_new_tokens=16, seeds=(0, 1))
    get_task(cfg.task)  # an unknown task fails before a run directory is made
    name = "grpo_gain" if cfg.task == "arithmetic" else f"grpo_gain-{task_slug(cfg.task)}"
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, f"{name}-{cfg.algo}")
    os.makedirs(run_dir, exist_ok=True)
    sft_dir = os.path.join(run_dir, "sft")
    tag = f"{cfg.algo}-lr{cfg.lr:g}"  # several RL settings can share one SFT run
    rl_dirs = [os.path.join(run_dir, f"rl-{tag}-seed{seed}") for seed in cfg.seeds]
    sft_done = finished_run(sft_dir, cfg.sft_steps)
    print(plan(cfg, sft_done=sft_done, rl_done=tuple(finished_run(d, cfg.iterations) for d in rl_dirs)), flush=True)
    print(f"run directory: {run_dir}", flush=True)
    logging = cfg.logging_flags()
    if cfg.wandb and logging["wandb_group"] is None:
        logging["wandb_group"] = os.path.basename(os.path.normpath(run_dir))  # the study's runs side by side
    sft_cfg = SFTArithmeticConfig(task=cfg.task, preset=cfg.preset, levels=cfg.levels, n_train=cfg.n_train,
                                  n_test=cfg.n_test,
                                  steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr,
                                  checkpoint_every=max(cfg.sft_steps // 4, 1), log_every=max(cfg.sft_steps // 50, 1),
                                  max_new_tokens=cfg.max_new_tokens, run_dir=sft_dir, progress=cfg.progress,
                                  evaluate=False, force_config=cfg.force_config, **logging)
    if cfg.smoke:
        sft_cfg.preset, sft_cfg.warmup_steps = "tiny", 2
    if sft_done:
        print(f"grpo_gain: using the finished SFT run in {sft_dir}")
    else:
        train_sft(sft_cfg)
    runs, sft_accuracy = [], None
    for seed, rl_dir in zip(cfg.seeds, rl_dirs):
        rl_cfg = RLArithmeticConfig(task=cfg.task, algo=cfg.algo, iterations=cfg.iterations,
                                    prompts_per_iteration=cfg.prompts_per_iteration, n=cfg.n,
                                    max_new_tokens=cfg.max_new_tokens, lr=cfg.lr, head_lr=cfg.head_lr,
                                    epochs=cfg.epochs, minibatches=cfg.minibatches,
                                    kl_coef=cfg.kl_coef,
                                    step_reward=cfg.step_reward, eval_samples=cfg.eval_samples,
                                    track_kl=cfg.track_kl,
                                    sft_run_dir=sft_dir, run_dir=rl_dir,
                                    seed=seed, progress=cfg.progress, force_config=cfg.force_config, **logging)
        runs.append(train_rl(rl_cfg, report=False, sft_accuracy=sft_accuracy))
        sft_accuracy = (runs[-1]["accuracy_sft"], runs[-1]["sampled_accuracy_sft"])  # the same for every seed
        if len(cfg.seeds) > 1:
            print(f"grpo_gain: seed {seed}: greedy {runs[-1]['accuracy_sft']:.1%} -> {runs[-1]['accuracy_rl']:.1%}, "
                  f"sampled {runs[-1]['sampled_accuracy_sft']:.1%} -> {runs[-1]['sampled_accuracy_rl']:.1%}",
                  flush=True)
    results = dict(config=asdict(cfg), run_dir=run_dir,
                   train_accuracy_first=[r["train_accuracy_first"] for r in runs],
                   train_accuracy_last=[r["train_accuracy_last"] for r in runs],
                   rl_wall_seconds=[r["wall_seconds"] for r in runs])
    for kind, prefix in (("greedy", ""), ("sampled", "sampled_")):
        before = runs[0][f"{prefix}accuracy_sft"]
        gains = np.array([r[f"{prefix}accuracy_rl"] for r in runs]) - before
        std = float(gains.std(ddof=1)) if len(gains) > 1 else None
        results[kind] = dict(accuracy_sft=before, accuracy_rl=[r[f"{prefix}accuracy_rl"] for r in runs],
                             gain_mean=float(gains.mean()), gain_std=std)
    path = os.path.join(run_dir, f"results-{tag}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(summary(cfg, results))
    wall = time.perf_counter() - t_start
    print(f"\nfinished in {int(wall // 60)} min {wall % 60:.0f} s; results in {path}", flush=True)
    return results


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
