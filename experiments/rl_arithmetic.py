"""RL on an embedded task (arithmetic by default), starting from the SFT study's checkpoint.

    python -m experiments.rl_arithmetic --algo grpo --train-sft   # trains SFT first if --sft-run-dir is missing
    python -m experiments.rl_arithmetic --algo grpo --sft-run-dir runs/sft   # from an existing SFT run
    python -m experiments.rl_arithmetic --algo rloo --iterations 40
    python -m experiments.rl_arithmetic --smoke
    python -m experiments.rl_arithmetic --task countdown --sft-run-dir runs/<countdown SFT run>

--algo is any entry of rljax.algorithms.ALGORITHMS (reinforce, rloo, scst, mrt,
grpo, dr_grpo, dapo, a2c, ppo, trpo; A3C is a2c with --staleness 1 or more). Reward (--task's checks,
`rljax.tasks.Task`): 1 for the right final answer + 0.1 for the task's format (arithmetic:
step;...;answer:N), + --step-reward times the step credit (the fraction of right steps; a task with
steps only). --task must be the SFT run's task.
Reports held-out accuracy before/after (greedy, and sampled at temperature 1),
mean reward, KL to the SFT policy and wall time; outputs under the run directory.

The run itself is `rljax.recipes.arithmetic_runs.train_rl`; the SFT checkpoint is read with
`rljax.recipes.arithmetic_runs.load_sft`.
"""
from __future__ import annotations

from rljax.cli import run
from rljax.recipes.arithmetic_runs import RLArithmeticConfig as Config
from rljax.recipes.arithmetic_runs import train_rl


def main(cfg: Config) -> dict:
    return train_rl(cfg)


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
