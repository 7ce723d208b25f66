"""SFT on an embedded task (arithmetic by default): held-out exact-match accuracy before and after.

    python -m experiments.sft_arithmetic                  # small preset, level 1, about 5 minutes on 2 CPU cores
    python -m experiments.sft_arithmetic --smoke          # seconds
    python -m experiments.sft_arithmetic --run-dir runs/x # resume (or start) in a fixed directory
    python -m experiments.sft_arithmetic --task countdown --max-new-tokens 56   # sorting, countdown, rg:<generator>

--task names a task of `rljax.tasks` (its problems, reference completions and answer check); the
default run directory is runs/sft_<task>-<time> (":" of rg:<generator> written "-").

Writes config.json, metrics.jsonl, checkpoints/, loss.png and results.json under
the run directory. Running the same command with the same --run-dir after a crash
resumes from the last checkpoint and ends with the same parameters.

The run itself is `rljax.recipes.arithmetic_runs.train_sft` (other studies start from it);
held-out accuracy is `rljax.eval.exact_match`.
"""
from __future__ import annotations

from rljax.cli import run
from rljax.recipes.arithmetic_runs import SFTArithmeticConfig as Config
from rljax.recipes.arithmetic_runs import train_sft


def main(cfg: Config) -> dict:
    return train_sft(cfg)


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
