"""Several runs of one pipeline (one per seed, say) as one table, mean ± sd per stage, and their plot across stages:

    python -m experiments.stage_summary --runs runs/r1-seed0 runs/r1-seed1 runs/r1-seed2 --out runs/r1-summary

Reads each run directory's results.jsonl (written by every pipeline of `rljax.pipelines`: r1_pipeline,
expert_iteration, ...), writes summary.md, summary.jsonl and summary.png (each run's line and the mean) into --out
(`rljax.pipelines.summarise_runs`) and prints the table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from rljax.cli import run
from rljax.pipelines import SUMMARY_FILES, summarise_runs


@dataclass
class Config:
    runs: tuple[str, ...] = ()
    out: str | None = None  # default: the first run's directory's parent, summary-<first run's name>
    columns: tuple[str, ...] = ()  # the columns drawn in summary.png (default: accuracy, reward, length, KL, gold*)


def main(cfg: Config) -> list[dict]:
    if not cfg.runs:
        raise SystemExit("stage_summary: give the run directories with --runs DIR [DIR ...]")
    out = cfg.out or os.path.join(os.path.dirname(os.path.normpath(cfg.runs[0])),
                                  "summary-" + os.path.basename(os.path.normpath(cfg.runs[0])))
    rows = summarise_runs(cfg.runs, out, columns=cfg.columns or None)
    print(open(os.path.join(out, SUMMARY_FILES[1])).read())
    print(f"written: {', '.join(os.path.join(out, f) for f in SUMMARY_FILES if os.path.exists(os.path.join(out, f)))}")
    return rows


if __name__ == "__main__":
    run(main, Config)
