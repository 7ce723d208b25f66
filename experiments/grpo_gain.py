"""Does RL beat its SFT start by more than run-to-run noise? SFT once, then RL from it with several seeds.

    python -m experiments.grpo_gain                        # what `make quickstart` runs: ~9 minutes on 2 CPU cores
    python -m experiments.grpo_gain --seeds 0 1 2          # the README's study (run-to-run noise over seeds)
    python -m experiments.grpo_gain --algo rloo --lr 1e-5
    python -m experiments.grpo_gain --smoke

Runs the SFT study (`rljax.recipes.arithmetic_runs.train_sft`, skipped when its final checkpoint
is already in <run-dir>/sft), then the RL study (`train_rl`) once per seed from that checkpoint,
and reports held-out accuracy, greedy and sampled (temperature 1, the policy RL
trains; mean over `eval_samples` per problem): after SFT, after RL per seed, and
each gain's mean and standard deviation over seeds (the run-to-run noise), in
<run-dir>/results-<algo>-lr<lr>.json. The seed changes the prompt order and every
sampling key; the SFT model and the test set stay fixed. The defaults are sized
for a CPU: the tiny preset, stopped early in SFT so that RL has room to improve.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from rljax.cli import apply_preset, make_run_dir, run
from rljax.eval import finished_run
from rljax.recipes.arithmetic_runs import RLArithmeticConfig, SFTArithmeticConfig, train_rl, train_sft


@dataclass
class Config:
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


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, levels=(1,), n_train=256, n_test=16, sft_steps=12, sft_batch=8, iterations=2,
                     prompts_per_iteration=4, n=4, max_new_tokens=16, seeds=(0, 1))
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, f"grpo_gain-{cfg.algo}")
    os.makedirs(run_dir, exist_ok=True)
    sft_dir = os.path.join(run_dir, "sft")
    sft_cfg = SFTArithmeticConfig(preset=cfg.preset, levels=cfg.levels, n_train=cfg.n_train, n_test=cfg.n_test,
                                  steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr,
                                  checkpoint_every=max(cfg.sft_steps // 4, 1), log_every=max(cfg.sft_steps // 50, 1),
                                  max_new_tokens=cfg.max_new_tokens, run_dir=sft_dir, progress=cfg.progress,
                                  evaluate=False, force_config=cfg.force_config)
    if cfg.smoke:
        sft_cfg.preset, sft_cfg.warmup_steps = "tiny", 2
    if finished_run(sft_dir, cfg.sft_steps):
        print(f"grpo_gain: using the finished SFT run in {sft_dir}")
    else:
        train_sft(sft_cfg)
    runs, tag = [], f"{cfg.algo}-lr{cfg.lr:g}"  # several RL settings can share one SFT run
    for seed in cfg.seeds:
        rl_cfg = RLArithmeticConfig(algo=cfg.algo, iterations=cfg.iterations,
                                    prompts_per_iteration=cfg.prompts_per_iteration, n=cfg.n,
                                    max_new_tokens=cfg.max_new_tokens, lr=cfg.lr, head_lr=cfg.head_lr,
                                    epochs=cfg.epochs, minibatches=cfg.minibatches,
                                    kl_coef=cfg.kl_coef,
                                    step_reward=cfg.step_reward, eval_samples=cfg.eval_samples,
                                    track_kl=cfg.track_kl,
                                    sft_run_dir=sft_dir, run_dir=os.path.join(run_dir, f"rl-{tag}-seed{seed}"),
                                    seed=seed, progress=cfg.progress, force_config=cfg.force_config)
        runs.append(train_rl(rl_cfg))
        print(f"grpo_gain: seed {seed}: greedy {runs[-1]['accuracy_sft']:.1%} -> {runs[-1]['accuracy_rl']:.1%}, "
              f"sampled {runs[-1]['sampled_accuracy_sft']:.1%} -> {runs[-1]['sampled_accuracy_rl']:.1%}", flush=True)
    results = dict(config=asdict(cfg), run_dir=run_dir,
                   train_accuracy_first=[r["train_accuracy_first"] for r in runs],
                   train_accuracy_last=[r["train_accuracy_last"] for r in runs],
                   rl_wall_seconds=[r["wall_seconds"] for r in runs])
    table = (f"\n| {cfg.algo} from one SFT checkpoint, {cfg.n_test} held-out problems, levels {cfg.levels} "
             f"| greedy | sampled (T = 1, {cfg.eval_samples} per problem) |\n|---|---|---|\n")
    rows = [f"after SFT ({cfg.sft_steps} steps)"] + [f"after {cfg.iterations} RL iterations, seed {s}" for s in cfg.seeds]
    cols = []
    for kind, prefix in (("greedy", ""), ("sampled", "sampled_")):
        before = runs[0][f"{prefix}accuracy_sft"]
        after = np.array([r[f"{prefix}accuracy_rl"] for r in runs])
        gains = after - before
        std = float(gains.std(ddof=1)) if len(gains) > 1 else None
        results[kind] = dict(accuracy_sft=before, accuracy_rl=after.tolist(), gain_mean=float(gains.mean()),
                             gain_std=std)
        cols.append([f"{before:.1%}"] + [f"{a:.1%}" for a in after]
                    + [f"{gains.mean():+.1%}" + (f" ± {std:.1%}" if std is not None else "")])
    rows.append("gain" + (" (mean ± std over seeds)" if len(runs) > 1 else ""))
    table += "".join(f"| {name} | {g} | {s} |\n" for name, g, s in zip(rows, *cols))
    print(table)
    with open(os.path.join(run_dir, f"results-{tag}.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
