"""Training metrics: a JSON-lines log (optionally mirrored to TensorBoard), reading
and plotting it back, and a small progress bar for training loops.

`MetricsWriter(run_dir)` appends one JSON object per `write(step, metrics)` to
`<run_dir>/metrics.jsonl` and flushes it, so a killed run keeps every line
already written. A run resumed from its checkpoint at step S calls
`resume(S, prefix=...)`: the lines of that phase with step > S (logged by the
killed run after its last checkpoint, and about to be logged again) are dropped,
the file rewritten atomically, and the event record
`{"step": S, "time": ..., "event": "resumed", "phase": "<prefix>"}` appended.
Event records carry no metrics; `read_metrics` leaves them out unless asked
(`events=True`). TensorBoard event files cannot be rewritten: they keep the killed
run's points past S, which TensorBoard draws over. Values may be Python numbers,
numpy scalars or 0-d numpy/jax arrays; non-finite floats are stored as the
strings "nan", "inf" and "-inf" so that every line is valid JSON, and
`read_metrics` turns them back into floats. When a TensorBoard backend
(tensorboardX, torch.utils.tensorboard, or flax.metrics.tensorboard with
tensorflow) is importable, the same scalars also go to `<run_dir>/tb`.

`plot_metrics` draws chosen metrics against step into a PNG (needs matplotlib,
the `plot` extra); `Progress` wraps tqdm with compact postfix numbers such as
`loss=1.234 tok/s=5.6k`.
"""
from __future__ import annotations

import json
import math
import os
import time
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


class MetricsWriter:
    """Append metrics to `<run_dir>/metrics.jsonl` (and TensorBoard when available).

    `tensorboard=None` uses a TensorBoard backend if one is importable, True
    requires one (ImportError otherwise), False never uses one.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool | None = None):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.path = os.path.join(self.run_dir, METRICS_FILE)
        self._tb = None
        self._tb_kind = None
        backend = _import_tb_backend() if tensorboard is not False else None
        if tensorboard and backend is None:
            raise ImportError("MetricsWriter(tensorboard=True) needs a TensorBoard backend: "
                              "`pip install tensorboardX` (or torch with tensorboard, or tensorflow)")
        os.makedirs(self.run_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if backend is not None:
            self._tb_kind, cls = backend
            tb_dir = os.path.join(self.run_dir, TB_DIR)
            try:
                self._tb = cls(tb_dir)
            except Exception:
                self._file.close()
                raise

    @property
    def tensorboard(self) -> bool:
        """Whether scalars are also written as TensorBoard events."""
        return self._tb is not None

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
        """Append one line `{"step", "time", "<prefix><name>": value, ...}` and flush it."""
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
        if self._tb is not None:
            for key, value in values.items():
                if self._tb_kind == "flax":
                    self._tb.scalar(key, value, step)
                else:
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def resume(self, step: int, *, prefix: str = "", mark: bool = True) -> int:
        """Continue a run resumed from its checkpoint at `step`: drop this phase's records with
        a larger step, then (with `mark`) append `{"step", "time", "event": "resumed", "phase":
        prefix}`. A record is this phase's when one of its metric names starts with `prefix`
        (an event record, when its "phase" is `prefix`); "" means every record. The file is
        rewritten through a temporary file renamed over it, so a crash leaves the old or the
        new file, never a partial one. Returns the number of records dropped."""
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
        if dropped:
            with atomic_path(self.path) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(kept)
        self._file = open(self.path, "a", encoding="utf-8")
        if mark:
            self._file.write(json.dumps({"step": step, "time": time.time(), "event": "resumed",
                                         "phase": prefix}) + "\n")
            self._file.flush()
        return dropped

    def close(self) -> None:
        """Flush and close the log (and TensorBoard writer); safe to call twice."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
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
    Event records (`{"event": "resumed", ...}`, see MetricsWriter.resume) only with `events=True`."""
    path = _metrics_path(path_or_run_dir)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON: {e.msg}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {lineno} is not a JSON object")
            if "event" in record and not events:
                continue
            records.append({k: _STR_TO_NONFINITE.get(v, v) if isinstance(v, str) else v
                            for k, v in record.items()})
    return records


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
