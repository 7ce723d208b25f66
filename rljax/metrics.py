"""Training metrics: a JSON-lines log (optionally mirrored to TensorBoard and Weights &
Biases), reading and plotting it back, and a small progress bar for training loops.

`MetricsWriter(run_dir)` appends one JSON object per `write(step, metrics)` to
`<run_dir>/metrics.jsonl` and flushes it, so a killed run keeps every line
already written. A run resumed from its checkpoint at step S calls
`resume(S, prefix=...)`: the lines of that phase with step > S (logged by the
killed run after its last checkpoint, and about to be logged again) are dropped,
the file rewritten atomically, and the event record
`{"step": S, "time": ..., "event": "resumed", "phase": "<prefix>"}` appended.
Event records carry no metrics; `read_metrics` leaves them out unless asked
(`events=True`). Values may be Python numbers, numpy scalars or 0-d numpy/jax
arrays; non-finite floats are stored as the strings "nan", "inf" and "-inf" so
that every line is valid JSON, and `read_metrics` turns them back into floats.

TensorBoard: when a backend (tensorboardX, the `tensorboard` extra; torch.utils.tensorboard;
or flax.metrics.tensorboard with tensorflow) is importable, the same scalars also go to
`<run_dir>/tb`, one event file per writer session (`tensorboard --logdir <run_dir>/tb`).
Event files cannot be rewritten: a resumed session (tensorboardX or torch) starts its file
with TensorBoard's restart marker at step S + 1, so TensorBoard discards the killed run's
points past S, as metrics.jsonl does (the flax backend has no marker; its readers show both).

Weights & Biases: `MetricsWriter(run_dir, wandb=WandbConfig())` (the `wandb` extra) logs
the same scalars with their step to a W&B run, offline by default: the run is written
under `<run_dir>/wandb` and needs no account or network (`wandb sync <run_dir>/wandb/offline-run-*`
uploads it later). Its config is `<run_dir>/config.json` when there, and its id is kept in
`<run_dir>/wandb/run-id`, so a resumed run (and every phase writing into the same run
directory) continues the same W&B run. W&B cannot drop points either: the killed run's
points past S stay, and a synced or online run ignores the re-logged steps below its
last step (W&B keeps steps increasing).

`write_samples` / `read_samples`: an RL iteration's rows trained on (text, rewards, lengths, prompt
columns) as JSON Lines in `<run_dir>/samples/iteration-NNNNNN.jsonl` (`rljax.phases.rl(samples_every=)`).

`plot_metrics` draws chosen metrics against step into a PNG (needs matplotlib,
the `plot` extra); `Progress` wraps tqdm with compact postfix numbers such as
`loss=1.234 tok/s=5.6k`; `progress_postfix` picks those numbers from a step's metrics.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

_NONFINITE_TO_STR = {math.inf: "inf", -math.inf: "-inf"}
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_RESERVED = ("step", "time", "event", "phase")  # "event", "phase": event records


def _to_scalar(name: str, value: Any) -> int | float:
    """A Python int or float for one metric value; ValueError if it is not a real scalar."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    try:
        arr = np.asarray(value)
    except Exception as e:  # e.g. a jax array that cannot be fetched
        raise ValueError(f"metric {name!r}: cannot convert {type(value).__name__} to an array: {e}") from e
    if arr.ndim != 0:
        raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {arr.shape}")
    kind = arr.dtype.kind
    if kind == "b":
        return int(arr)
    if kind in "iu":
        return int(arr)
    if kind in "fV":  # "V": ml_dtypes such as bfloat16
        try:
            return float(arr)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metric {name!r}: dtype {arr.dtype} is not a real number") from e
    raise ValueError(f"metric {name!r}: dtype {arr.dtype} is not a real number")


def _encode(value: int | float) -> int | float | str:
    """JSON-safe form: non-finite floats become "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else _NONFINITE_TO_STR[value]
    return value


def _metrics_path(path_or_run_dir: str | os.PathLike) -> str:
    path = os.fspath(path_or_run_dir)
    return os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path


def _import_tb_backend():
    """(name, SummaryWriter class) of the first importable TensorBoard backend, or None."""
    try:
        from tensorboardX import SummaryWriter
        return "tensorboardX", SummaryWriter
    except Exception:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter
        return "torch", SummaryWriter
    except Exception:
        pass
    try:
        from flax.metrics.tensorboard import SummaryWriter  # imports tensorflow
        return "flax", SummaryWriter
    except Exception:
        pass
    return None


WANDB_MODES = ("offline", "online", "disabled")
WANDB_ID_FILE = os.path.join("wandb", "run-id")  # under the run directory


def _config_dir(run_dir: str) -> str | None:
    """The nearest of run_dir and the folders above it holding a config.json (the study's, or the recipe's,
    for a phase of a pipeline writing in run_dir/<component>), up to two levels; None when none does."""
    d = os.path.normpath(run_dir)
    for _ in range(3):
        if os.path.exists(os.path.join(d, "config.json")):
            return d
        d = os.path.dirname(d)
    return None


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging for `MetricsWriter` (and `LoopConfig.wandb`, the experiments' `--wandb`).

    mode: "offline" (default) writes the run under <run_dir>/wandb, no account or network needed, for a
    later `wandb sync`; "online" streams it (after `wandb login`); "disabled" makes every call a no-op.
    project, entity, group, tags: as `wandb.init` takes them; name: the run's display name (None: the
    run directory's name, "<run>/<component>" for a pipeline's phase writing in a component folder of a
    run whose config.json is above it, which is also the W&B run's config).
    """

    project: str = "rljax"
    mode: str = "offline"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ValueError(f"WandbConfig.mode: one of {WANDB_MODES}, got {self.mode!r}")


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError("Weights & Biases logging (wandb=WandbConfig(...), --wandb) needs the wandb package: "
                          "`pip install 'rljax[wandb]'`") from e
    return wandb


def wandb_run_id(run_dir: str | os.PathLike) -> str:
    """The W&B run id of `run_dir`: read from <run_dir>/wandb/run-id, or made (8 random lowercase letters
    and digits, as W&B's own ids) and written there atomically the first time."""
    path = os.path.join(os.fspath(run_dir), WANDB_ID_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    run_id = "".join(alphabet[b % len(alphabet)] for b in os.urandom(8))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from rljax.checkpoint import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    return run_id


class MetricsWriter:
    """Append metrics to `<run_dir>/metrics.jsonl`, and to TensorBoard and W&B when asked.

    `tensorboard=None` uses a TensorBoard backend if one is importable, True requires one
    (ImportError otherwise), False never uses one. `wandb`: a WandbConfig to also log to
    Weights & Biases (ImportError naming the `wandb` extra when it is not installed); the W&B
    run starts at the first write (a writer that writes nothing makes none). `config`: the W&B
    run's config (default: the run directory's config.json when there). Backends are imported
    here, so a missing one fails before anything trains; their files are opened on first use.

    One writer per run directory: in a multi-process run only process 0 makes one
    (`rljax.phases.run_loop` does), since every process has the same metrics and n writers would
    append every line n times and rewrite the file concurrently in `resume`.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool | None = None,
                 wandb: WandbConfig | None = None, config: Mapping[str, Any] | None = None):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.path = os.path.join(self.run_dir, METRICS_FILE)
        self._tb = None
        backend = _import_tb_backend() if tensorboard is not False else None
        if tensorboard and backend is None:
            raise ImportError("MetricsWriter(tensorboard=True) needs a TensorBoard backend: "
                              "`pip install 'rljax[tensorboard]'` (tensorboardX; or torch, or tensorflow)")
        self._tb_kind, self._tb_cls = backend if backend is not None else (None, None)
        if wandb is not None and not isinstance(wandb, WandbConfig):
            raise TypeError(f"MetricsWriter(wandb=...) takes a WandbConfig or None, got {type(wandb).__name__}")
        self._wandb_cfg = wandb
        self._wandb_module = _import_wandb() if wandb is not None else None
        self._wandb_run = None
        self._config = None if config is None else dict(config)
        os.makedirs(self.run_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    @property
    def tensorboard(self) -> bool:
        """Whether scalars are also written as TensorBoard events."""
        return self._tb_cls is not None

    @property
    def wandb(self) -> bool:
        """Whether scalars are also logged to Weights & Biases."""
        return self._wandb_cfg is not None

    def _tb_writer(self, purge_step: int | None = None):
        """The TensorBoard writer, created on first use: one new event file per writer session, named
        so that sessions sort in the order they were opened (tensorboardX names files by the second
        and host only, and would overwrite a file opened in the same second, by this process or
        another one); `purge_step` starts
        the file with TensorBoard's restart marker (tensorboardX, torch)."""
        if self._tb is None:
            tb_dir = os.path.join(self.run_dir, TB_DIR)
            if self._tb_kind == "flax":
                self._tb = self._tb_cls(tb_dir)
            else:
                os.makedirs(tb_dir, exist_ok=True)
                n = sum("tfevents" in f for f in os.listdir(tb_dir))
                self._tb = self._tb_cls(tb_dir, purge_step=purge_step, filename_suffix=f".{n:05d}.{os.getpid()}")
        return self._tb

    def _wandb(self):
        """The W&B run, started on first use with this run directory's stored id (resumed if it exists)."""
        if self._wandb_run is None:
            cfg = self._wandb_cfg
            config = self._config
            owner = _config_dir(self.run_dir)  # a pipeline's phase writes in run_dir/<component>
            if config is None:
                config = {}
                if owner is not None:
                    with open(os.path.join(owner, "config.json"), encoding="utf-8") as f:
                        config = json.load(f)
            here = os.path.normpath(self.run_dir)
            default_name = os.path.basename(here) if owner is None or os.path.normpath(owner) == here else \
                os.path.relpath(here, os.path.dirname(os.path.normpath(owner)))  # "<run>/<component>"
            self._wandb_run = self._wandb_module.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group,
                name=cfg.name or default_name, tags=list(cfg.tags) or None, mode=cfg.mode,
                dir=self.run_dir, id=wandb_run_id(self.run_dir), resume="allow", config=config,
                reinit="create_new")  # a run the caller has open stays theirs
        return self._wandb_run

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
        """Append one line `{"step", "time", "<prefix><name>": value, ...}` and flush it (and log the
        values at `step` to TensorBoard and W&B when enabled)."""
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        step = int(step)
        values: dict[str, int | float] = {}
        for name, value in metrics.items():
            key = f"{prefix}{name}"
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved")
            values[key] = _to_scalar(key, value)
        record = {"step": step, "time": time.time()}
        record.update({k: _encode(v) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb_cls is not None:
            tb = self._tb_writer()
            for key, value in values.items():
                if self._tb_kind == "flax":
                    tb.scalar(key, value, step)
                else:
                    tb.add_scalar(key, value, step)
            tb.flush()
        if self._wandb_cfg is not None:
            self._wandb().log(values, step=step)

    def resume(self, step: int, *, prefix: str = "", mark: bool = True) -> int:
        """Continue a run resumed from its checkpoint at `step`: drop this phase's records with
        a larger step, then (with `mark`) append `{"step", "time", "event": "resumed", "phase":
        prefix}`. A record is this phase's when one of its metric names starts with `prefix`
        (an event record, when its "phase" is `prefix`); "" means every record. The file is
        rewritten through a temporary file renamed over it, so a crash leaves the old or the
        new file, never a partial one. Returns the number of records dropped.

        TensorBoard (tensorboardX, torch): when records were dropped, this session's event file
        starts with the restart marker at step + 1, so TensorBoard drops the older points past
        `step` too, of every tag in the directory (one run directory per phase keeps other phases'
        points; the phases of rljax.recipes and rljax.pipelines each have their own). W&B: the
        run with this directory's id is resumed; its points past `step` stay (see the module)."""
        from rljax.checkpoint import atomic_path  # metrics stays importable without orbax

        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        step = int(step)
        self._file.close()
        self._file = None
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        kept, dropped = [], 0
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if lineno == len(lines):  # a line cut short when the killed run died mid-write
                    dropped += 1
                    continue
                raise ValueError(f"{self.path}: line {lineno} is not valid JSON") from None
            if record.get("step", -1) > step and _of_phase(record, prefix):
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
        unterminated = bool(lines) and not lines[-1].endswith("\n")  # appending would join the next record to it
        if dropped or unterminated:
            with atomic_path(self.path) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(kept)
        self._file = open(self.path, "a", encoding="utf-8")
        if mark:
            self._file.write(json.dumps({"step": step, "time": time.time(), "event": "resumed",
                                         "phase": prefix}) + "\n")
            self._file.flush()
        if dropped and self._tb_cls is not None and self._tb_kind != "flax" and self._tb is None:
            self._tb_writer(purge_step=step + 1).flush()
        return dropped

    def logged(self, step: int, *, prefix: str) -> dict[str, float] | None:
        """The values of the last record at `step` whose metric names start with `prefix`, the prefix
        stripped (e.g. `logged(40, prefix="sft/eval/")`), or None when there is none."""
        found = None
        for record in read_metrics(self.path):
            if record["step"] == int(step) and any(k.startswith(prefix) for k in record):
                found = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
        return found

    def close(self) -> None:
        """Flush and close the log (and the TensorBoard writer, and finish the W&B run); safe to call twice."""
        try:
            if self._wandb_run is not None:
                run, self._wandb_run = self._wandb_run, None
                run.finish()
            if self._tb is not None:
                tb, self._tb = self._tb, None
                tb.close()
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _of_phase(record: dict, prefix: str) -> bool:
    """Whether `record` was written for the phase whose metric names start with `prefix`."""
    if "event" in record:
        return record.get("phase", "") == prefix or not prefix
    return any(k.startswith(prefix) for k in record if k not in _RESERVED)


def read_metrics(path_or_run_dir: str | os.PathLike, *, events: bool = False) -> list[dict]:
    """Records of a metrics.jsonl (a file, or a run dir holding one), "nan"/"inf"/"-inf" as floats.
    Event records (`{"event": "resumed", ...}`, see MetricsWriter.resume) only with `events=True`.
    A last line cut short (a run killed while writing it, before its resume repairs the file) is
    left out with a warning; an invalid line before it is a ValueError naming it."""
    path = _metrics_path(path_or_run_dir)
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not line.endswith("\n"):
                warnings.warn(f"{path}: the last line is cut short ({e.msg}), left out (a run killed while "
                              "writing it; its resume drops it)", stacklevel=2)
                continue
            raise ValueError(f"{path}: line {lineno} is not valid JSON: {e.msg}") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {lineno} is not a JSON object")
        if "event" in record and not events:
            continue
        records.append({k: _STR_TO_NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()})
    return records


def samples_path(run_dir: str | os.PathLike, iteration: int) -> str:
    """Where an RL iteration's samples go: <run_dir>/samples/iteration-NNNNNN.jsonl."""
    return os.path.join(os.fspath(run_dir), "samples", f"iteration-{int(iteration):06d}.jsonl")


def write_samples(run_dir: str | os.PathLike, iteration: int, records: Sequence[Mapping[str, Any]]) -> str:
    """`records` (`rljax.rl.make_rl_iteration`'s on_samples: one dict per row trained on) as JSON Lines in
    `samples_path(run_dir, iteration)`, written atomically, so a resumed iteration rewrites its file whole.
    A value JSON cannot hold (a metadata object) is written as its repr. -> the path."""
    from rljax.checkpoint import atomic_path

    path = samples_path(run_dir, iteration)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, default=repr) + "\n")
    return path


def read_samples(run_dir: str | os.PathLike, iteration: int) -> list[dict]:
    """The records `write_samples` wrote for `iteration` (FileNotFoundError naming the file when that
    iteration's samples were not written: `rljax.phases.rl(samples_every=)`)."""
    with open(samples_path(run_dir, iteration), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` finite values (fewer at the start)."""
    finite = np.isfinite(values)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(hi - window, 0)
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


def plot_metrics(path_or_run_dir: str | os.PathLike, names: Sequence[str], out_png: str | os.PathLike, *,
                 smooth: int = 1, title: str | None = None) -> str:
    """Plot each named metric against step (one subplot each) into a PNG; returns its path.

    `smooth > 1` draws a trailing moving average of that window over the faint raw curve.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("plot_metrics needs at least one metric name")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    path = _metrics_path(path_or_run_dir)
    records = read_metrics(path)
    available = sorted({k for r in records for k in r} - set(_RESERVED))
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown} in {path}; available: {available}")
    fig = _agg_figure(figsize=(8, 2.6 * len(names) + 0.6))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(r["step"], r[name]) for r in records if name in r and isinstance(r[name], (int, float))]
        steps = np.array([p[0] for p in points], dtype=np.float64)
        values = np.array([p[1] for p in points], dtype=np.float64)
        if smooth > 1:
            ax.plot(steps, values, color="C0", alpha=0.25, linewidth=1)
            ax.plot(steps, _moving_average(values, smooth), color="C0", linewidth=1.5)
        else:
            ax.plot(steps, values, color="C0", linewidth=1.5)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    return _save_png(fig, out_png, dpi=100)


def _agg_figure(**kw):
    try:
        # The object API with the Agg canvas renders off-screen without pyplot, so it neither
        # needs a display nor switches (and closes the figures of) a caller's pyplot backend.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: `pip install rljax[plot]`") from e
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, out_png, *, dpi: int) -> str:
    """Lay out `fig` and write it as a PNG (creating its directory); returns the path."""
    fig.tight_layout()
    out = os.fspath(out_png)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out


def plot_curves(curves: dict, out_png: str | os.PathLike, *, xlabel: str, ylabel: str,
                log_x_base: int | None = None) -> str:
    """One line per entry of curves = {label: {x: y}} (points drawn in x order) into a PNG;
    returns its path. log_x_base: a logarithmic x axis of that base."""
    fig = _agg_figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    if log_x_base:
        ax.set_xscale("log", base=log_x_base)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save_png(fig, out_png, dpi=120)


def plot_stages(runs: Mapping[str, Sequence[Mapping[str, Any]]], columns: Sequence[str], out_png: str | os.PathLike,
                *, title: str | None = None) -> str:
    """A pipeline's results across its stages: one subplot per column, the stages on the x axis (in the
    order they first appear), one line per run (runs = {label: rows}, rows = [{"stage": name, column:
    number, ...}], e.g. one run per seed) and, with more than one run, their mean as a thick black line
    over the stages every run has. A row without a column (a stage that does not measure it) leaves a
    gap. Returns the PNG's path."""
    stages = list(dict.fromkeys(r["stage"] for rows in runs.values() for r in rows))
    if not stages or not columns:
        raise ValueError(f"plot_stages: nothing to draw ({len(stages)} stages, columns {list(columns)})")
    x = np.arange(len(stages))
    fig = _agg_figure(figsize=(max(6.0, 0.9 * len(stages) + 2), 2.2 * len(columns) + 1.0))
    axes = fig.subplots(len(columns), 1, sharex=True, squeeze=False)[:, 0]
    for ax, column in zip(axes, columns):
        table = np.full((len(runs), len(stages)), np.nan)
        for i, rows in enumerate(runs.values()):
            for r in rows:
                if isinstance(r.get(column), (int, float)) and not isinstance(r.get(column), bool):
                    table[i, stages.index(r["stage"])] = r[column]
        for i, label in enumerate(runs):
            ax.plot(x, table[i], marker="o", linewidth=1, alpha=0.6 if len(runs) > 1 else 1.0, label=label)
        if len(runs) > 1:
            with np.errstate(invalid="ignore"):
                ax.plot(x, table.mean(axis=0), color="black", linewidth=2.5, label="mean")
        ax.set_ylabel(column)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xticks(x, stages, rotation=30, ha="right")
    if len(runs) > 1:
        axes[0].legend(fontsize=7, ncols=min(len(runs) + 1, 6))
    if title:
        fig.suptitle(title)
    return _save_png(fig, out_png, dpi=100)


_SUFFIXES = ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T"))


def format_number(x: Any) -> str:
    """Compact form for a progress postfix: 4 significant digits below 1000, else k/M/G/T with 3.

    `format_number(0.0123456) == "0.01235"`, `5600.0 -> "5.6k"`, `1234567 -> "1.23M"`, `42 -> "42"`.
    """
    if isinstance(x, str):
        return x
    try:
        value = _to_scalar("postfix", x)
    except ValueError:
        return str(x)
    if isinstance(value, float) and not math.isfinite(value):
        return _encode(value)
    if abs(value) < 1000:
        return str(value) if isinstance(value, int) else f"{value:.4g}"
    for scale, suffix in _SUFFIXES:  # smallest suffix whose rounded mantissa stays below 1000
        text = f"{value / scale:.3g}"
        if abs(float(text)) < 1000 or suffix == "T":
            return text + suffix
    raise AssertionError("unreachable")


def format_postfix(postfix: Mapping[str, Any]) -> str:
    """`{"loss": 1.2345, "tok/s": 5600.0}` -> `"loss=1.234 tok/s=5.6k"`."""
    return " ".join(f"{k}={format_number(v)}" for k, v in postfix.items())


def progress_postfix(metrics: Mapping[str, Any], shown: Mapping[str, str],
                     tokens_per_s: float | None = None) -> dict[str, Any]:
    """The numbers a progress bar shows for one logged step: `{label: metrics[name]}` for each
    `label: name` of `shown` whose metric the step reported, in `shown`'s order, then "tok/s"
    (when given). `progress_postfix({"loss": 0.5, "reward_mean": 0.4}, {"reward": "reward_mean",
    "acc": "accuracy"}, 900.0) == {"reward": 0.4, "tok/s": 900.0}`."""
    postfix = {label: metrics[name] for label, name in shown.items() if name in metrics}
    if tokens_per_s is not None:
        postfix["tok/s"] = tokens_per_s
    return postfix


class Progress:
    """Progress bar for a training loop (tqdm); `update(n, loss=..., **{"tok/s": ...})`."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train", disable: bool = False):
        from tqdm import tqdm

        self.total = int(total)
        self.n = int(initial)
        self.postfix = ""
        self._bar = tqdm(total=self.total, initial=self.n, desc=desc, disable=disable, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by `n` steps; keyword arguments replace the shown postfix."""
        self.n += int(n)
        if postfix:
            self.postfix = format_postfix(postfix)
            self._bar.set_postfix_str(self.postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        """Close the bar (safe to call twice)."""
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
