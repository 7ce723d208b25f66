"""Pipelines: "collect with the current models → train one or more components → checkpoint
everything", repeated, resumable after a kill at any point.

A pipeline is a list of `Stage`s, plain data: a name (its directory under the run
directory), an optional collect function, a train function and where collect's output
is stored. `run_stages` threads one state, a pytree of every trained component (a
TrainState, an OREOState, or e.g. {"policy": RLState, "reward_model": TrainState}),
through them:

    stage i:  data = collect(state, ctx)          # saved atomically to run_dir/<name>/<data_file>
              state = train(state, data, ctx)     # phases checkpoint into ctx.component_dir(...)
              checkpoint(state) at run_dir/stages, step i + 1

so the checkpoint after a stage holds everything (params and optimizer states of all
components). A stage's `args` (the JSON-able arguments its output depends on) are saved as
run_dir/<name>/stage.json; a rerun whose arguments differ is refused naming the stage and
the file (`allow_change=True` records the change and applies it to the stages still to run),
as is a finished stage whose saved data went missing. Each stage may record one
results row (`StageContext.record`: accuracy, reward, length, KL to the stage's start, ...):
run_dir/<name>/results.json, and the pipeline's table over every stage, run_dir/results.jsonl
and results.md, drawn across the stages in results.png (with matplotlib). `summarise_runs` (and
`python -m experiments.stage_summary`) turns several runs of one pipeline, one per seed, into one
table of mean ± sd per stage and their plot. A killed run, started again with the same arguments, restores the latest
stage checkpoint and skips the finished stages (their collect is never called again);
the interrupted stage reuses its saved data and its phases resume from their own
checkpoints in the component directories, so the result is bit-identical to an
uninterrupted run. Stages with different models and phases (SFT → reward model → PPO,
or R1's SFT → GRPO → rejection sampling + SFT → RL) are just different train functions
over different parts of the state.

The three uses here:

    # online DPO: sample K with the current policy, rank by a scorer, train DPO on best/worst pairs
    state, stats = online_dpo(state, prompts, scorer, OnlineDPOConfig(rounds=3), model=model, tokenizer=tok,
                              collate=functools.partial(collate_preferences, tok), run_dir="runs/odpo")

    # iterative OREO: collect trajectories with the current policy -> OREO phase, per round
    state = iterative_oreo(state, prompts, reward_fn, IterativeOREOConfig(rounds=3), model=model, tokenizer=tok,
                           run_dir="runs/ioreo", key=key, problems=problems)

    # iterative RLHF: RL against a reward model refreshed on gold-ranked samples of the current policy
    state = create_rlhf_state(model, sft_params, rm_state, rl_cfg, key)   # {"policy": RLState, "reward_model": ...}
    state, stats = iterative_rlhf(state, prompt_batches, rank_samples, make_reward, IterativeRLHFConfig(...),
                                  rl_cfg, model=model, rm_model=rm, decode=tok.decode_batch, collate=collate_lists,
                                  initial_lists=lists, run_dir="runs/rlhf")

A custom pipeline:

    stages = [Stage("sft", train=lambda s, _, ctx: {**s, "policy": sft(s["policy"], data, cfg, model=model,
                                                                        run_dir=ctx.component_dir("sft"))}),
              Stage("round-0", collect=collect_fn, train=train_fn), ...]
    state, outputs = run_stages(state, stages, run_dir="runs/recipe")

Every RL call goes through `rl_state` and `train_rl` (one place to adapt to the RL API).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rljax.checkpoint import Checkpointer, atomic_path, write_json
from rljax.data.collate import BatchIterator
from rljax.distributed import on_main, say, sync, to_host
from rljax.losses.preference import DPOConfig
from rljax.losses.reward_model import RankingConfig
from rljax.metrics import WandbConfig
from rljax.oreo_training import (CollectConfig, OREOPhaseConfig, OREOState, check_trajectories, collate_trajectories,
                                 collect_trajectories, oreo, prompts_with_steps)
from rljax.phases import LoopConfig, PreferencePhaseConfig, RewardModelPhaseConfig, preference, train_reward_model
from rljax.reference import best_worst_pairs, cached_reference_logps, with_reference
from rljax.sampling import SampleConfig, filled_prompts, sample
from rljax.state import OptimizerConfig

STAGES_DIR = "stages"  # the stage checkpoints: step i = stages 0..i-1 done
STAGE_ARGS_FILE = "stage.json"  # a stage's arguments, checked on reruns
STAGE_CHANGES_FILE = "stage_changes.jsonl"  # changes to them a rerun with allow_change made
RESULTS_FILE = "results.json"  # a stage's results row
TABLE_FILES = ("results.jsonl", "results.md")  # the pipeline's table: one row per stage that recorded one
PLOT_FILE = "results.png"  # the table's columns drawn across the stages (with matplotlib installed)
SUMMARY_FILES = ("summary.jsonl", "summary.md", "summary.png")  # `summarise_runs`: several runs' tables, mean ± sd
# the columns drawn across stages (those a table has, in this order), then every column named gold*
PLOT_COLUMNS = ("accuracy_greedy", "accuracy_sampled", "reward_mean", "completion_length", "kl_to_start",
                "kl_to_teacher")


class StageArgumentsError(ValueError):
    """A stage's directory holds the output of other arguments than the ones given."""

# ----------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class Stage:
    """One stage (or round) of a pipeline.

    name: unique; its directory is run_dir/<name>. collect(state, ctx) -> data (None:
    no collection, data = None). train(state, data, ctx) -> state. data_file: the JSON
    file in the stage directory where the driver stores collect's result atomically and
    from which an interrupted stage reloads it (data must be JSON-able; it is passed to
    train as read back from JSON, so a resumed and an uninterrupted run see the same
    values); None: collect stores its data itself under ctx.dir and must be resumable
    (it is called again when an interrupted stage restarts). args: the JSON-able arguments
    the stage's output depends on (configs, digests of its inputs), saved to
    run_dir/<name>/stage.json when the stage first runs; a rerun with other args raises
    StageArgumentsError naming the stage, the file and the fields (None: not checked)."""

    name: str
    train: Callable[[Any, Any, "StageContext"], Any]
    collect: Callable[[Any, "StageContext"], Any] | None = None
    data_file: str | None = "data.json"
    args: dict | None = None


@dataclass
class StageContext:
    """What collect and train see: the stage's index and name, its directory (run_dir/name,
    created; None without a run directory) and the run directory."""

    index: int
    name: str
    dir: str | None
    run_dir: str | None
    _outputs: dict = field(default_factory=dict, repr=False)
    _stages: dict = field(default_factory=dict, repr=False)
    _results: dict = field(default_factory=dict, repr=False)

    def component_dir(self, component: str) -> str | None:
        """run_dir/<component>: where a phase training that component writes metrics.jsonl and
        checkpoints/, shared by the stages that train it (its step must only grow across them,
        so the latest checkpoint there is always the furthest progress); None without run_dir."""
        return None if self.run_dir is None else os.path.join(self.run_dir, component)

    def data(self, name: str):
        """The data an earlier stage collected (read back from its data_file when that stage
        finished in an earlier run; a missing file is FileNotFoundError naming both stages)."""
        if name not in self._outputs:
            if name not in self._stages:
                raise KeyError(f"stage {self.name!r}: no stage {name!r} in this pipeline ({list(self._stages)})")
            self._outputs[name] = _load(self.run_dir, self._stages[name], reader=self.name)
        return self._outputs[name]

    def record(self, row: dict) -> dict:
        """Record this stage's results row (JSON-able numbers and strings; e.g. `rljax.eval.
        evaluate_policy`'s): run_dir/<name>/results.json, then the pipeline's table,
        run_dir/results.jsonl and results.md (one row per stage that recorded one, in stage
        order), both rewritten, so a rerun of the stage leaves the same files. Returns
        {"stage": name, **row}. On several processes every process calls it (process 0 writes,
        `rljax.distributed.on_main`: a failed write stops every process)."""
        row = {"stage": self.name, **row}
        json.dumps(row)  # fail here, naming nothing half-written, when the row is not JSON-able
        self._results[self.name] = row
        if self.dir is not None:
            on_main(f"stage {self.name!r}: writing its results row", self._write_results, row)
        return row

    def _write_results(self, row: dict) -> None:
        _write_json(os.path.join(self.dir, RESULTS_FILE), row)
        write_results_table(self.run_dir, list(self._stages))


def _data_path(run_dir: str | None, stage: Stage) -> str | None:
    if run_dir is None or stage.data_file is None:
        return None
    return os.path.join(run_dir, stage.name, stage.data_file)


def _saved_data_path(run_dir, stage: Stage, reader: str | None = None) -> str | None:
    """Where the stage's saved data are (None when it collects nothing or keeps its data itself); a
    stage that collects into a data_file whose file is missing is FileNotFoundError naming it."""
    path = _data_path(run_dir, stage)
    if path is None or stage.collect is None:
        return None
    if not os.path.exists(path):
        by = "" if reader is None or reader == stage.name else f" (read by stage {reader!r})"
        raise FileNotFoundError(f"stage {stage.name!r}: its data {path} is missing{by}; the stage finished in an "
                                "earlier run, so its output was removed after it was written. Use a new run "
                                "directory")
    return path


def _load(run_dir, stage: Stage, reader: str | None = None):
    """The stage's saved data (`_saved_data_path`: None, or FileNotFoundError when missing)."""
    path = _saved_data_path(run_dir, stage, reader)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def _round_args(cfg, *, extendable: bool, **more) -> dict:
    """A round pipeline's stage arguments: its config's fields (`config_args`), `rounds` aside when more
    rounds only extend the run (each round's work does not depend on it), and `more`."""
    from rljax.pipeline_steps import config_args

    args = config_args(cfg)
    if extendable:
        args.pop("config.rounds", None)
    return dict(args, **more)


def _write_json(path: str, value) -> None:
    write_json(path, value, indent=1)


def _write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _check_args(run_dir: str, stage: Stage, *, allow_change: bool = False, finished: bool = False) -> None:
    """Save the stage's args on its first run; refuse other args on a rerun (naming the fields), or with
    allow_change overwrite stage.json, append the change to stage_changes.jsonl beside it and say what
    it means: a finished stage is not run again (its output stands), an unfinished one runs with them."""
    if stage.args is None:
        return
    from rljax.cli import config_differences, flat_fields, json_value, listed_changes, read_before_rewrite, write_config

    stage_dir = os.path.join(run_dir, stage.name)
    path = os.path.join(stage_dir, STAGE_ARGS_FILE)
    new = json.loads(json.dumps(stage.args, default=json_value))  # functions by name: the same in every process
    changed = {}
    old = read_before_rewrite(path)  # by every process before process 0 may rewrite it
    if old is not None:
        changed = config_differences(flat_fields(old), flat_fields(new), ignore=())  # nested fields by their path
        if not changed:
            return
        if not allow_change:
            raise StageArgumentsError(f"stage {stage.name!r}: {path} was written by other arguments "
                                      f"({listed_changes(changed)}); rerun with the saved arguments, use a new "
                                      "run directory, or allow_change=True (the studies' --force-config) to go on "
                                      "with the new ones")
        if finished:
            say(f"stage {stage.name!r} finished under its saved arguments and is not run again: its output "
                "stands, and the changed ones apply to the stages still to run")
    os.makedirs(stage_dir, exist_ok=True)
    on_main(f"stage {stage.name!r}: writing {path}", write_config, stage_dir, new, changed, file=STAGE_ARGS_FILE,
            changes_file=STAGE_CHANGES_FILE)


def read_results(run_dir: str) -> list[dict]:
    """The pipeline's results table (run_dir/results.jsonl): one row per stage that recorded one."""
    path = os.path.join(run_dir, TABLE_FILES[0])
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_results_table(run_dir: str, names: Sequence[str]) -> list[dict]:
    """Rebuild run_dir/results.jsonl and results.md from run_dir/<name>/results.json of the
    stages `names` (in that order; stages without a row are left out). Returns the rows."""
    from rljax.metrics import format_number

    rows = []
    for name in names:
        path = os.path.join(run_dir, name, RESULTS_FILE)
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(os.path.join(run_dir, TABLE_FILES[0])) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else format_number(row[c])
                                       if isinstance(row[c], (int, float)) else str(row[c]) for c in columns) + " |")
    with atomic_path(os.path.join(run_dir, TABLE_FILES[1])) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot_table({os.path.basename(os.path.normpath(run_dir)): rows}, os.path.join(run_dir, PLOT_FILE))
    return rows


def markdown_table(rows: Sequence[dict], columns: Sequence[str], cell: Callable[[dict, str], str] | None = None) -> str:
    """The rows as a markdown table of `columns` (those some row has, in that order) for printing: cell(row,
    column) -> text (default: "" when absent, strings as they are, numbers to 3 decimals)."""
    def default(row, column):
        v = row.get(column)
        return "" if v is None else v if isinstance(v, str) else f"{v:.3f}"

    cell = cell or default
    shown = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
    return "\n".join(lines + ["| " + " | ".join(cell(r, c) for c in shown) + " |" for r in rows])


def report_results(cfg, run_dir: str, rows: Sequence[dict], columns: Sequence[str], wall_seconds: float) -> dict:
    """What a pipeline experiment does at its end: print its stage table (`markdown_table` of `columns`) and wall
    time, and write run_dir/results.json = {config: asdict(cfg), run_dir, rows, wall_seconds} (atomically).
    Returns that dict. On several processes process 0 prints and writes (`rljax.distributed.on_main`)."""
    results = dict(config=dataclasses.asdict(cfg), run_dir=run_dir, rows=list(rows), wall_seconds=wall_seconds)
    say("\n" + markdown_table(rows, columns))
    say(f"\nwall time {wall_seconds:.0f} s; the full table: {os.path.join(run_dir, TABLE_FILES[1])}")
    path = os.path.join(run_dir, "results.json")
    on_main(f"writing {path}", write_json, path, results, default=str)
    return results


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_columns(rows: Sequence[dict]) -> list[str]:
    """The columns of `rows` drawn across stages: PLOT_COLUMNS that some row has as a number, then gold*."""
    present = [c for c in dict.fromkeys(k for r in rows for k in r) if any(_number(r.get(c)) for r in rows)]
    return [c for c in PLOT_COLUMNS if c in present] + [c for c in present if c.startswith("gold")]


def _plot_table(runs: dict, out_png: str, columns: Sequence[str] | None = None) -> str | None:
    """`rljax.metrics.plot_stages` of `columns` (default: the runs' plot_columns) into out_png (atomically);
    None when there is nothing to draw or matplotlib is not installed (an optional extra: the tables are
    the results)."""
    from rljax.metrics import plot_stages

    columns = plot_columns([r for rows in runs.values() for r in rows]) if columns is None else list(columns)
    if not columns:
        return None
    try:
        with atomic_path(out_png) as tmp:
            plot_stages(runs, columns, tmp)
    except ImportError:
        return None
    return out_png


def summarise_runs(run_dirs: Sequence[str], out_dir: str | None = None, *,
                   columns: Sequence[str] | None = None) -> list[dict]:
    """Several runs of one pipeline (e.g. one per seed) as one table: per stage (in the order the runs
    list them), for every numeric column c, its mean over the runs that have it, c_sd (the sample
    standard deviation, ddof = 1; 0 for one run) and c_n (how many runs have it); "runs": how many runs
    reached the stage. With out_dir: summary.jsonl, summary.md ("mean ± sd", "(n=k)" after a value that
    fewer than the stage's runs have) and summary.png (each run's
    line and the mean, `plot_stages`, of `columns`; default `plot_columns`) there. A run directory without a results table is FileNotFoundError
    naming it."""
    runs = {}
    for d in run_dirs:
        rows = read_results(d)
        if not rows:
            raise FileNotFoundError(f"summarise_runs: {os.path.join(d, TABLE_FILES[0])} is missing or empty: that run "
                                    "recorded no stage")
        label = os.path.basename(os.path.normpath(d))
        runs[label if label not in runs else d] = rows
    stages = list(dict.fromkeys(r["stage"] for rows in runs.values() for r in rows))
    summary = []
    for stage in stages:
        got = [r for rows in runs.values() for r in rows if r["stage"] == stage]
        row = {"stage": stage, "runs": len(got)}
        for c in dict.fromkeys(k for r in got for k in r if k != "stage"):
            values = np.array([r[c] for r in got if _number(r.get(c))], np.float64)
            if len(values):
                row[c] = float(values.mean())
                row[f"{c}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                row[f"{c}_n"] = len(values)
        summary.append(row)
    if out_dir is not None:
        from rljax.metrics import format_number

        os.makedirs(out_dir, exist_ok=True)
        with atomic_path(os.path.join(out_dir, SUMMARY_FILES[0])) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in summary)
        shown = [c for c in dict.fromkeys(k for row in summary for k in row)
                 if c not in ("stage", "runs") and not c.endswith(("_sd", "_n"))]

        def cell(row, c):  # mean ± sd over the runs that have c; "(n=k)" when fewer than the stage's runs
            if c not in row:
                return ""
            text = format_number(row[c]) if row[f"{c}_n"] == 1 else \
                f"{format_number(row[c])} ± {format_number(row[f'{c}_sd'])}"
            return text if row[f"{c}_n"] == row["runs"] else f"{text} (n={row[f'{c}_n']})"

        lines = ["| stage | runs | " + " | ".join(shown) + " |", "|" + " --- |" * (len(shown) + 2)]
        for row in summary:
            lines.append(f"| {row['stage']} | {row['runs']} | " + " | ".join(cell(row, c) for c in shown) + " |")
        with atomic_path(os.path.join(out_dir, SUMMARY_FILES[1])) as tmp, open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        _plot_table(runs, os.path.join(out_dir, SUMMARY_FILES[2]), columns)  # None: plot_columns
    return summary


def run_stages(state, stages: Sequence[Stage], *, run_dir: str | None = None, keep: int = 2,
               results: dict | None = None, allow_change: bool = False):
    """Run `stages` in order from `state` (a pytree of every trained component); returns
    (state, outputs), outputs[i] = stage i's collected data (None when it has none or
    stores it itself). results: a dict to fill with {stage name: its results row} for every
    stage that recorded one (`StageContext.record`; read back from run_dir for the stages
    finished in an earlier run).

    With run_dir the state is checkpointed after every stage (run_dir/stages, step = the
    number of stages done, the last `keep` kept) and a rerun resumes: finished stages are
    skipped (their data read back from their data_file), the first unfinished one reuses
    its saved data, and its phases resume from their checkpoints (StageContext.component_dir).
    A stage's args are checked against its saved stage.json, the finished stages' too
    (StageArgumentsError), before anything runs; allow_change=True instead records each
    changed stage's new args (stage.json, the change appended to stage_changes.jsonl beside
    it) and goes on: finished stages are not run again, so a change reaches only the stages
    still to run (the interrupted one keeps the data it collected and its phases' progress).
    Without run_dir everything stays in memory.

    Several processes (`rljax.distributed`; run_dir on a file system they share, as checkpoints need):
    every process runs every stage's collect and train (the phases and decoders are collective, each
    process placing its own rows) and gets the same data; process 0 alone writes the stage files
    (stage.json, the data file, results rows and tables), and the processes wait for each other
    before a stage starts and before its checkpoint. A stage's own files (collect with
    data_file=None) are the stage's to write once.
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"run_stages: stage names must be unique, got {names}")
    done, outputs, by_name = 0, {}, {s.name: s for s in stages}
    results = {} if results is None else results
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        with Checkpointer(os.path.join(run_dir, STAGES_DIR), keep=keep) as ckpt:
            if ckpt.latest_step() is not None:
                state, meta = ckpt.restore(state)
                done = int(ckpt.latest_step())
                if done > len(stages) or meta.get("stage") != stages[done - 1].name:
                    expected = names[done - 1] if done <= len(stages) else None
                    raise ValueError(f"run_stages: {run_dir} holds a run whose stage {done} (the last one done) is "
                                     f"{meta.get('stage')!r}, not {expected!r} as in these {len(stages)} stages; use "
                                     "a new run directory")
        for i, stage in enumerate(stages):  # every stage that ran before, finished or not, against its saved arguments
            if stage.args is not None and os.path.exists(os.path.join(run_dir, stage.name, STAGE_ARGS_FILE)):
                _check_args(run_dir, stage, allow_change=allow_change, finished=i < done)
        for stage in stages[:done]:
            _saved_data_path(run_dir, stage)  # a finished stage's missing data: said now, not after the rest trains
            path = os.path.join(run_dir, stage.name, RESULTS_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    results[stage.name] = json.load(f)
    for i, stage in enumerate(stages):
        if i < done:
            continue
        ctx = StageContext(index=i, name=stage.name, dir=None, run_dir=run_dir, _outputs=outputs, _stages=by_name,
                           _results=results)
        if run_dir is not None:
            ctx.dir = os.path.join(run_dir, stage.name)
            os.makedirs(ctx.dir, exist_ok=True)
            _check_args(run_dir, stage)
            sync(f"rljax.pipelines: stage {stage.name} begins")  # its arguments written, its data file seen alike
        path = _data_path(run_dir, stage)
        if path is not None and os.path.exists(path):
            data = _load(run_dir, stage)
        elif stage.collect is None:
            data = None
        else:
            data = stage.collect(state, ctx)
            if stage.data_file is not None:  # train sees the data as a resumed run would read them
                text = json.dumps(data)
                if path is not None:  # every process collected the same data; one writes it
                    on_main(f"stage {stage.name!r}: writing {path}", _write_text, path, text)
                data = json.loads(text)
        outputs[stage.name] = data
        state = stage.train(state, data, ctx)
        if run_dir is not None:
            sync(f"rljax.pipelines: stage {stage.name} files written")  # before the checkpoint marks it done
            with Checkpointer(os.path.join(run_dir, STAGES_DIR), keep=keep) as ckpt:
                ckpt.save(state, {"stage": stage.name, "index": i}, step=i + 1, force=True)
    return state, [outputs[s.name] if s.name in outputs else _load(run_dir, s) for s in stages]


def _step(state) -> int:
    return int(jax.device_get(state.step))


# ----------------------------------------------------------------------------- online DPO


@dataclass(frozen=True)
class OnlineDPOConfig:
    """Online (iterative) DPO: each of `rounds` rounds samples `samples` answers to each of
    `prompts_per_round` prompts with the current policy, scores them, pairs the best with
    the worst answer of every prompt whose scores differ, and trains `steps_per_round`
    DPO steps on those pairs. refresh_reference: the reference of round r is the policy
    at the start of round r (iterative DPO) instead of the initial policy (online DPO).
    checkpoint_every: DPO steps between checkpoints inside a round (0: at its end only).
    tensorboard, wandb: where else the phases' metrics go (`LoopConfig`)."""

    rounds: int = 3
    samples: int = 4
    prompts_per_round: int = 256
    steps_per_round: int = 50
    batch_size: int = 16
    loss: DPOConfig = field(default_factory=DPOConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, schedule="constant"))
    sampling: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=32, temperature=1.0))
    refresh_reference: bool = False
    log_every: int = 10
    checkpoint_every: int = 0
    progress: bool = True
    tensorboard: bool | None = None
    wandb: WandbConfig | None = None

    def __post_init__(self):
        if self.rounds < 1 or self.samples < 2 or self.steps_per_round < 1:
            raise ValueError(f"OnlineDPOConfig: need rounds >= 1, samples >= 2, steps_per_round >= 1; got "
                             f"{self.rounds}, {self.samples}, {self.steps_per_round}")
        for name in ("prompts_per_round", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"OnlineDPOConfig.{name}: must be >= 1, got {getattr(self, name)}")


def online_dpo(state, prompts: Sequence[str], scorer: Callable, cfg: OnlineDPOConfig, *, model, tokenizer, collate,
               reference=None, run_dir: str | None = None, allow_change: bool = False, eval_fn: Callable | None = None):
    """Online DPO for cfg.rounds rounds from `state` (a TrainState made with cfg.optimizer).

    prompts: the prompt pool; round r uses prompts[(r·n) mod N ...] with n =
    prompts_per_round. scorer(prompts, completions) -> rewards [B] (a rule reward, a
    reward model's `reward_model_reward`, ...). collate: rows -> PreferenceBatch (e.g.
    functools.partial(collate_preferences, tokenizer)). reference: the DPO reference
    (default: the params of `state`). With run_dir every round's pairs (with their
    reference log-probs) are saved as round-r/pairs.json, the policy's DPO phase writes
    run_dir/policy (metrics, checkpoints) and the state is checkpointed after every round
    (`run_stages`), so a killed run resumes at the right round and step. Returns
    (state, per-round stats: round, pairs, score_mean, score_best).
    """
    if reference is None:
        reference = to_host(state.params)
    phase_loop = dict(log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, progress=cfg.progress,
                      tensorboard=cfg.tensorboard, wandb=cfg.wandb)

    def collect(r, state, ctx):
        start = (r * cfg.prompts_per_round) % len(prompts)
        chosen_prompts = [prompts[(start + i) % len(prompts)] for i in range(cfg.prompts_per_round)]
        filled = filled_prompts(chosen_prompts, model, cfg.samples)  # a mesh's multiple; the copies dropped below
        tokens, mask = tokenizer.encode_batch(filled, padding_side="left")
        roll = sample(state.params, tokens, mask, jax.random.fold_in(state.rng, r), model=model,
                      cfg=dataclasses.replace(cfg.sampling, n=cfg.samples))
        text = tokenizer.decode_batch(to_host(roll.completions))[:len(chosen_prompts) * cfg.samples]
        flat_prompts = [p for p in chosen_prompts for _ in range(cfg.samples)]
        scores = np.asarray(scorer(flat_prompts, text), np.float64).reshape(len(chosen_prompts), cfg.samples)
        answers = [text[i * cfg.samples:(i + 1) * cfg.samples] for i in range(len(chosen_prompts))]
        pairs = best_worst_pairs(chosen_prompts, answers, scores)
        if not pairs:
            raise ValueError(f"online_dpo: round {r}: the answers of every prompt scored the same, so there "
                             "is no pair to learn from; sample more prompts or answers, or at a higher "
                             "temperature")
        if len(pairs) < cfg.batch_size:
            warnings.warn(f"online_dpo: round {r} found only {len(pairs)} prompts whose answers score "
                          f"differently; training on batches of {len(pairs)} instead of {cfg.batch_size}",
                          stacklevel=4)  # the caller of online_dpo
        ref_params = to_host(state.params) if cfg.refresh_reference else reference
        if cfg.loss.needs_reference:
            ref = cached_reference_logps(ref_params, pairs, collate, model=model, batch_size=cfg.batch_size,
                                         chunk_size=cfg.loss.chunk_size)
            pairs = with_reference(pairs, ref)
        stats = dict(round=r, pairs=len(pairs), score_mean=float(scores.mean()),
                     score_best=float(scores.max(axis=1).mean()))
        return dict(pairs=pairs, stats=stats)

    def train(r, state, data, ctx):
        target = (r + 1) * cfg.steps_per_round
        if _step(state) >= target:
            return state
        pairs = data["pairs"]
        batches = BatchIterator(pairs, min(cfg.batch_size, len(pairs)), collate, seed=r)
        phase = PreferencePhaseConfig(loss=cfg.loss, optimizer=cfg.optimizer,
                                      loop=LoopConfig(steps=target, **phase_loop))
        return preference(state, batches, phase, model=model, run_dir=ctx.component_dir("policy"), eval_fn=eval_fn)

    args = _round_args(cfg, extendable=True)  # a rerun with other settings is refused; more rounds extend it
    stages = [Stage(f"round-{r}", collect=functools.partial(collect, r), train=functools.partial(train, r),
                    data_file="pairs.json", args=args) for r in range(cfg.rounds)]
    state, outputs = run_stages(state, stages, run_dir=run_dir, allow_change=allow_change)
    return state, [d["stats"] for d in outputs]


# ----------------------------------------------------------------------------- iterative OREO


@dataclass(frozen=True)
class IterativeOREOConfig:
    """Iterative OREO: `rounds` rounds of (collect with the current policy → train
    `steps_per_round` OREO steps on that round's data, `batch_size` rows a step)."""

    rounds: int = 3
    steps_per_round: int = 100
    batch_size: int = 16
    collect: CollectConfig = field(default_factory=CollectConfig)
    phase: OREOPhaseConfig = field(default_factory=OREOPhaseConfig)
    allow_fractional_rewards: bool = False

    def __post_init__(self):
        if self.rounds < 1 or self.steps_per_round < 1 or self.batch_size < 1:
            raise ValueError(f"IterativeOREOConfig: rounds, steps_per_round and batch_size must be >= 1, got "
                             f"{self.rounds}, {self.steps_per_round}, {self.batch_size}")


def iterative_oreo(state: OREOState, prompts: Sequence[str], reward_fn: Callable, cfg: IterativeOREOConfig, *,
                   model, tokenizer, key, run_dir: str | None = None, allow_change: bool = False,
                   eval_fn: Callable | None = None, collate: Callable | None = None, **metadata) -> OREOState:
    """R rounds of OREO, each on fresh trajectories of the current policy.

    Round r collects into run_dir/round-r/data (resumable, `collect_trajectories` with
    fold_in(key, r)) from the policy at the start of the round, then trains until
    state.step = (r + 1)·steps_per_round (the OREO phase writes run_dir/oreo). The state
    is checkpointed after every round (`run_stages`), so a killed run restarts at the
    right round and step: a finished round is skipped, and an interrupted round reuses
    its data and resumes its phase. collate: rows -> OREOBatch (default
    `collate_trajectories` with the collection's separator); metadata as for
    `collect_trajectories` (e.g. problems=...). With the step-level loss, a prompt the policy
    answered in one step in every sample of a round carries no step-level signal: its rows are
    left out of that round with a warning (`oreo_training.prompts_with_steps`); a round where no
    prompt has a multi-step sample (a wrong separator) stops with `check_trajectories`' error.
    """
    separator = cfg.collect.separator
    collate = collate or functools.partial(collate_trajectories, tokenizer, separator=separator,
                                           allow_fractional_rewards=cfg.allow_fractional_rewards)

    def collect(r, state, ctx):
        rows = collect_trajectories(state.policy.params, prompts, reward_fn, cfg.collect, model=model,
                                    tokenizer=tokenizer, key=jax.random.fold_in(key, r),
                                    out_dir=None if ctx.dir is None else os.path.join(ctx.dir, "data"), **metadata)
        need_steps = cfg.phase.loss.level == "step"
        if need_steps:
            kept, dropped = prompts_with_steps(rows, separator)
            if dropped and kept:  # with none kept, the check below names the first such row
                warnings.warn(f"iterative_oreo: round {r}: {len(dropped)} of {len(set(prompts))} "
                              f"prompts have no sample with more than one step (separator {separator!r}), so "
                              f"no step-level signal; their {len(rows) - len(kept)} rows are left out of the "
                              f"round (the first: {dropped[0][:60]!r})", stacklevel=2)
                rows = kept
        check_trajectories(rows, separator=separator, allow_fractional_rewards=cfg.allow_fractional_rewards,
                           need_steps=need_steps)
        return rows

    def train(r, state, rows, ctx):
        target = (r + 1) * cfg.steps_per_round
        if _step(state) >= target:
            return state
        data = BatchIterator(rows, min(cfg.batch_size, len(rows)), collate, seed=r)
        phase = dataclasses.replace(cfg.phase, loop=dataclasses.replace(cfg.phase.loop, steps=target))
        return oreo(state, data, phase, model=model, run_dir=ctx.component_dir("oreo"), eval_fn=eval_fn)

    # the trajectories are stored by collect_trajectories itself (Parquet parts, resumable)
    args = _round_args(cfg, extendable=True)  # a rerun with other settings is refused; more rounds extend it
    stages = [Stage(f"round-{r}", collect=functools.partial(collect, r), train=functools.partial(train, r),
                    data_file=None, args=args) for r in range(cfg.rounds)]
    return run_stages(state, stages, run_dir=run_dir, allow_change=allow_change)[0]


# ----------------------------------------------------------------------------- RL (the one place that calls it)


def rl_state(model, params, rl_cfg, key, *, teacher_params=None, teacher_model=None, **kwargs):
    """The RLState an RL stage starts from: the policy a copy of `params`, which also become
    the frozen reference (`rljax.rl.create_rl_state`; kwargs: critic_model, ...). teacher_params,
    teacher_model: the frozen teacher of on-policy distillation (RLState.teacher_params; its model,
    default `model`, placed by its sharding rules); pass the same teacher_model to `train_rl`."""
    from rljax.rl import create_rl_state

    return create_rl_state(model, params, rl_cfg, key, teacher_params=teacher_params, teacher_model=teacher_model,
                           **kwargs)


def train_rl(state, prompts, reward_fn: Callable, rl_cfg, *, model, decode: Callable, steps: int,
             run_dir: str | None = None, log_every: int = 10, checkpoint_every: int = 0, eval_every: int = 0,
             progress: bool = True, eval_fn: Callable | None = None, tensorboard: bool | None = None,
             wandb: WandbConfig | None = None, teacher_model=None, **kwargs):
    """RL iterations of `state` (an RLState) until state.step == steps: `rljax.phases.rl` with
    prompts (batch_at(position) -> PromptBatch) and reward_fn(prompts, completions, **metadata)
    -> [B]; run_dir holds its metrics and checkpoints (resumed from); tensorboard, wandb: where
    else the metrics go (`LoopConfig`); teacher_model: the model of state.teacher_params
    (on-policy distillation, `rl_state(..., teacher_params=)`; default `model`); kwargs go to
    the phase (accuracy_fn, critic_model, ...)."""
    from rljax.phases import rl

    loop = LoopConfig(steps=steps, log_every=log_every, checkpoint_every=checkpoint_every, eval_every=eval_every,
                      progress=progress, tensorboard=tensorboard, wandb=wandb)
    return rl(state, prompts, reward_fn, rl_cfg, model=model, decode=decode, loop=loop, run_dir=run_dir,
              eval_fn=eval_fn, teacher_model=teacher_model, **kwargs)


# ----------------------------------------------------------------------------- iterative RLHF


@dataclass(frozen=True)
class IterativeRLHFConfig:
    """Iterative RLHF: `iterations` RL iterations in rounds of `refresh_every`; before every
    round but the first the reward model is refreshed: ranked lists of the current
    policy's samples (`rank_samples`) are added to all earlier ones, and the reward model
    trains max(rm_epochs·new lists / rm_batch_size, 1) more steps on them all (rm_loss,
    rm_optimizer: the ones its state was made with; the batches of round r shuffled with
    seed + r). refresh_every 0: never refreshed (one round). checkpoint_every, eval_every: steps
    between checkpoints, and between calls of eval_fn, inside either phase (0: at their ends
    only; the reward model's refresh calls eval_fn only with eval_every). tensorboard, wandb: where
    else both phases' metrics go (`LoopConfig`)."""

    iterations: int = 200
    refresh_every: int = 50
    rm_epochs: int = 2
    rm_batch_size: int = 4
    rm_loss: RankingConfig = field(default_factory=RankingConfig)
    rm_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, schedule="constant"))
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    eval_every: int = 0
    progress: bool = True
    tensorboard: bool | None = None
    wandb: WandbConfig | None = None

    def __post_init__(self):
        if self.iterations < 1 or self.refresh_every < 0 or self.rm_epochs < 1 or self.rm_batch_size < 1:
            raise ValueError(f"IterativeRLHFConfig: need iterations, rm_epochs, rm_batch_size >= 1 and "
                             f"refresh_every >= 0; got {self.iterations}, {self.rm_epochs}, {self.rm_batch_size}, "
                             f"{self.refresh_every}")

    @property
    def rounds(self) -> int:
        return 1 if self.refresh_every == 0 else math.ceil(self.iterations / self.refresh_every)


def create_rlhf_state(model, params, rm_state, rl_cfg, key) -> dict:
    """{"policy": RLState from `params` (`rl_state`), "reward_model": `rm_state`} (a TrainState, e.g.
    a trained Bradley–Terry model, whose optimizer state is continued; the reward-model phase
    trains its own copy, `run_loop`'s `owned_state`, so the caller's arrays stay valid)."""
    return {"policy": rl_state(model, params, rl_cfg, key), "reward_model": rm_state}


def iterative_rlhf_stages(prompts, rank_samples: Callable, make_reward: Callable, cfg: IterativeRLHFConfig, rl_cfg, *,
                          model, rm_model, decode: Callable, collate: Callable, initial_lists: Sequence = (),
                          eval_fn: Callable | None = None, record: Callable | None = None,
                          stage_name: Callable[[int], str] | None = None, **rl_kwargs) -> list[Stage]:
    """The rounds of `iterative_rlhf` as `Stage`s named stage_name(r) (default round-0, round-1, ...) over a state
    that holds
    {"policy": RLState, "reward_model": TrainState} (and may hold more), for a pipeline of more stages
    (`rljax.rlhf`: SFT → reward model → these). record(state, r) -> dict: round r's results row, called
    after its RL (e.g. `evaluate_policy` of the policy); the stage records {"round": r, the refresh's stats
    (r ≥ 1: new_lists, rm_accuracy_on_policy), **record(state, r)} (`StageContext.record`). Arguments
    as for `iterative_rlhf`."""
    from rljax.rewards.evaluation import reward_model_eval

    k = cfg.refresh_every or cfg.iterations
    stage_name = stage_name or (lambda r: f"round-{r}")

    def collect(r, state, ctx):
        lists = rank_samples(state["policy"].policy.params, r)
        stats = dict(round=r, new_lists=len(lists))
        if lists:
            batches = [collate(lists[i:i + 32]) for i in range(0, len(lists), 32)]
            stats["rm_accuracy_on_policy"] = reward_model_eval(rm_model, batches)(state["reward_model"])[
                "pairwise_accuracy"]
        return dict(lists=lists, stats=stats)

    def train(r, state, data, ctx):
        rm = state["reward_model"]
        if data is not None and data["lists"]:
            replay = list(initial_lists) + [x for j in range(1, r + 1) for x in ctx.data(stage_name(j))["lists"]]
            batch = min(cfg.rm_batch_size, len(replay))
            target = _step(rm) + max(cfg.rm_epochs * len(data["lists"]) // cfg.rm_batch_size, 1)
            phase = RewardModelPhaseConfig(loss=cfg.rm_loss, optimizer=cfg.rm_optimizer,
                                           loop=LoopConfig(steps=target, log_every=cfg.log_every,
                                                           checkpoint_every=cfg.checkpoint_every,
                                                           eval_every=cfg.eval_every, progress=cfg.progress,
                                                           tensorboard=cfg.tensorboard, wandb=cfg.wandb))
            rm = train_reward_model(rm, BatchIterator(replay, batch, collate, seed=cfg.seed + r), phase,
                                    model=rm_model, run_dir=ctx.component_dir("reward_model"),
                                    eval_fn=eval_fn if cfg.eval_every else None)
        policy = train_rl(state["policy"], prompts, make_reward(rm.params), rl_cfg, model=model, decode=decode,
                          steps=min((r + 1) * k, cfg.iterations), run_dir=ctx.component_dir("policy"),
                          log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                          eval_every=cfg.eval_every, progress=cfg.progress,
                          tensorboard=cfg.tensorboard, wandb=cfg.wandb, eval_fn=eval_fn, **rl_kwargs)
        state = dict(state, policy=policy, reward_model=rm)
        if record is not None:
            refresh = {} if data is None else {key: v for key, v in data["stats"].items() if key != "round"}
            ctx.record(dict(round=r, **refresh, **record(state, r)))
        return state

    return [Stage(stage_name(r), collect=functools.partial(collect, r) if r else None,
                  train=functools.partial(train, r), data_file="lists.json") for r in range(cfg.rounds)]


def iterative_rlhf(state: dict, prompts, rank_samples: Callable, make_reward: Callable, cfg: IterativeRLHFConfig,
                   rl_cfg, *, model, rm_model, decode: Callable, collate: Callable, initial_lists: Sequence = (),
                   run_dir: str | None = None, allow_change: bool = False, eval_fn: Callable | None = None,
                   record: Callable | None = None, **rl_kwargs):
    """RL against a reward model refreshed on the current policy's samples (`create_rlhf_state`'s state).

    prompts: batch_at(position) -> PromptBatch for the RL iterations. rank_samples(policy_params,
    r) -> ranked lists [(prompt, answers, ranks[, priors])] of the policy's samples
    (e.g. gold-ranked; JSON-able), called once per refresh r = 1, 2, ...; make_reward(rm_params)
    -> the RL reward_fn(prompts, completions, **metadata) -> [B]; collate: lists ->
    RankingBatch; initial_lists: the lists the reward model was trained on before (replayed
    with the new ones). Round r: refresh (r ≥ 1) → RL to min((r + 1)·refresh_every,
    iterations). With run_dir the lists are saved as round-r/lists.json, the phases write
    run_dir/policy and run_dir/reward_model, and the whole state (policy, reference, the
    reward model's params and optimizer state) is checkpointed after every round.
    record(state, r) -> dict: a results row per round (`iterative_rlhf_stages`; the table is
    run_dir/results.jsonl). Returns (state, per-refresh stats: round, new_lists,
    rm_accuracy_on_policy (the pairwise accuracy of the reward model on the new lists before it
    trains on them)).
    """
    stages = iterative_rlhf_stages(prompts, rank_samples, make_reward, cfg, rl_cfg, model=model, rm_model=rm_model,
                                   decode=decode, collate=collate, initial_lists=initial_lists, eval_fn=eval_fn,
                                   record=record, **rl_kwargs)
    args = _round_args(cfg, extendable=False, rl_config=dataclasses.asdict(rl_cfg))  # rounds set each round's share
    stages = [dataclasses.replace(s, args=args) for s in stages]
    state, outputs = run_stages(state, stages, run_dir=run_dir, allow_change=allow_change)
    return state, [d["stats"] for d in outputs if d is not None]


__all__ = ["IterativeOREOConfig", "IterativeRLHFConfig", "OnlineDPOConfig", "Stage", "StageArgumentsError",
           "StageContext", "create_rlhf_state", "iterative_oreo", "iterative_rlhf", "iterative_rlhf_stages",
           "markdown_table", "online_dpo", "plot_columns", "read_results", "report_results", "rl_state", "run_stages",
           "summarise_runs", "train_rl", "write_results_table"]
