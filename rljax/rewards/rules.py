"""Rule rewards and the one place that calls a user's reward function.

A reward function takes decoded text in batches and returns one real number per sample:

    reward_fn(prompts: list[str], completions: list[str], **metadata) -> float32[B]

Metadata are per-sample lists (e.g. `problems=[Problem, ...]`). TRL's forms work too (`call_reward`): a
function whose second positional parameter is not `completions` (`def reward(completions, **kwargs)`,
`def reward(completion_ids, **kwargs)`) is called by keyword, as TRL calls it; a function that names a
`completion_ids` parameter, or takes TRL's keyword form with **kwargs, also gets each completion's token
ids, the stop token included (`COMPLETION_IDS`, from the callers that sampled them: the RL iteration,
`recipes.reward_eval`, `expert_iteration.rejection_sample`, `eval.evaluate_policy`), and, likewise, from
the RL loop and `recipes.reward_eval`, `trainer_state` (`TrainingProgress`: global_step, max_steps); an
`async def` function is awaited. `score` calls it,
checks the result (one finite real number per sample) and reports failures with the
function and the sample. `RewardCallConfig` says how it is called: in chunks, on
worker threads, with a per-call time limit, and what a failed call scores.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import json
import math
import numbers
import queue
import re
import reprlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from rljax.data.arithmetic import Problem, check_answer, check_steps, well_formed

RewardFn = Callable[..., Sequence[float]]


class RewardError(ValueError):
    """A reward function failed or returned something unusable."""


@dataclasses.dataclass(frozen=True)
class RewardCallConfig:
    """How `score` calls a reward function. The default is one call on the whole batch in
    the caller's thread with no time limit, failures raising.

    batch_size: samples per call (None: the whole batch in one call). The batch is cut into
      contiguous chunks of this size, each one call.
    workers: chunks called at once, each on its own thread; for functions that wait on a
      service (a remote judge, a sandboxed code runner), which release the GIL while they wait.
    timeout_s: per-call time limit in seconds (None: none). A call still running after it is
      abandoned and the loop moves on; Python cannot kill a thread, so the abandoned call keeps
      running in a daemon thread until it returns (or the process exits) and its result is
      dropped. A function that can hang forever while holding a lock or a CPU core needs a
      process of its own (a subprocess or a service with its own time limit) for true
      isolation; threads keep the call cheap (no pickling, shared state) at that price.
      batch_size=1 with a timeout confines a hang to its sample: the others score normally.
    on_failure: what a call that raises or runs out of time does:
      "raise": RewardError naming the function and the sample (a chunk that raised is
      bisected to find one sample that fails alone, in O(log batch_size) further calls; a
      chunk that timed out is named by its sample range, with no further calls);
      "value": each sample of the failed chunk scores `failure_value` and is counted
      (`Scores.failed`; the RL iteration reports the count as `reward_failed`).
      A result that is not one finite real number per sample is a bug in the function, not
      a failed call: it raises under either policy.
    failure_value: the reward of a sample whose call failed, under on_failure="value".
    """

    timeout_s: float | None = None
    on_failure: str = "raise"
    failure_value: float = 0.0
    batch_size: int | None = None
    workers: int = 1

    def __post_init__(self):
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"RewardCallConfig.timeout_s: must be positive or None, got {self.timeout_s}")
        if self.on_failure not in ("raise", "value"):
            raise ValueError(f"RewardCallConfig.on_failure: 'raise' or 'value', got {self.on_failure!r}")
        if not np.isfinite(self.failure_value):
            raise ValueError(f"RewardCallConfig.failure_value: must be finite, got {self.failure_value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"RewardCallConfig.batch_size: must be >= 1 or None, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"RewardCallConfig.workers: must be >= 1, got {self.workers}")

    @property
    def threaded(self) -> bool:
        """Whether calls run on worker threads (needed for a time limit or concurrency)."""
        return self.timeout_s is not None or self.workers > 1


class Scores(NamedTuple):
    """rewards: float32[B] (NaN where the function returned None, when allowed: `score_with_failures`'s
    allow_none); failed: bool[B], the samples whose call failed and which scored
    RewardCallConfig.failure_value; calls: how many times the reward function was called."""

    rewards: np.ndarray
    failed: np.ndarray
    calls: int


def _preview(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


_repr = reprlib.Repr()
_repr.maxlist = _repr.maxtuple = 4
_repr.maxstring = _repr.maxother = 40


def _numbers(out: Any, name: str, n: int, allow_none: bool = False) -> np.ndarray:
    """The reward function's result as float32[n], or RewardError saying what it returned.

    Accepted: an array (numpy, jax, anything with a numeric `dtype`) of bool, int or float
    (ml_dtypes' floats too: a jax bfloat16 or float8 array, whose numpy dtype kind is "V"),
    or a list/tuple of real numbers (Python or numpy bool, int, float, or 0-d numeric arrays).
    Booleans count as 0/1, since `[c == answer for c in ...]` is the natural correctness
    reward. Rejected: strings (np.asarray would silently parse "1.0"), None, complex numbers,
    objects, generators — anything that is not already a number. allow_none: a list/tuple element
    None (a term of a `RewardSum` that does not apply to the sample) reads as NaN."""
    def kind(x):  # the numpy dtype kind of an array-like, None for what has no dtype
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            return None
        try:
            dt = np.dtype(dtype)
            if dt.kind == "V":  # bfloat16, float8_*: ml_dtypes registers them as void-kind numpy types
                from jax import numpy as jnp  # knows ml_dtypes' type lattice, where numpy does not

                return "f" if jnp.issubdtype(dt, jnp.floating) else "V"
            return dt.kind
        except TypeError:  # a foreign dtype (torch.float32): ask numpy what the array converts to
            try:
                return np.asarray(x).dtype.kind
            except Exception:  # noqa: BLE001
                return "O"

    what = f"{type(out).__name__} {_repr.repr(out)}"
    if kind(out) is not None:
        if kind(out) not in ("b", "i", "u", "f"):
            raise RewardError(f"reward function {name} returned an array of dtype {out.dtype}, not real numbers: "
                              f"{what}")
    elif isinstance(out, (list, tuple)):
        for i, x in enumerate(out):
            if x is None and allow_none:
                continue
            if kind(x) is None:
                ok = isinstance(x, numbers.Real)  # Python bool, int, float, Fraction
            else:
                ok = kind(x) in ("b", "i", "u", "f") and np.ndim(x) == 0  # numpy scalars, 0-d arrays
            if not ok:
                hint = ("; None (the function does not apply to the sample) is allowed only for a term of a sum of "
                        "reward functions (a list in rljax.recipes.grpo, weighted_sum), where another term scores "
                        "the sample") if x is None else ""
                raise RewardError(f"reward function {name} returned {type(out).__name__} whose element {i} is "
                                  f"{type(x).__name__} {_repr.repr(x)}, not a real number: {what}{hint}")
        if allow_none and any(x is None for x in out):
            out = [np.nan if x is None else x for x in out]
    else:
        raise RewardError(f"reward function {name} returned {what}; expected a list or array of {n} real numbers, "
                          "one reward per sample")
    r = np.asarray(out, dtype=np.float32)
    if r.shape != (n,):
        raise RewardError(f"reward function {name} returned shape {r.shape}; expected ({n},), one reward per sample")
    return r


def _describe(rows: range, prompts, completions) -> str:
    if len(rows) == 1:
        i = rows[0]
        return f"sample {i}: prompt {_preview(prompts[i])}, completion {_preview(completions[i])}"
    return f"samples {rows[0]}..{rows[-1]}"


# The keyword under which callers that sampled the completions pass their token ids ([B] lists of ints, each
# completion's ids up to and including its stop token, as TRL passes them), to the functions that take them.
COMPLETION_IDS = "completion_ids"
# The keyword under which the RL loop passes a reward function the training's progress (a `TrainingProgress`,
# one for the whole call, not per sample), as TRL passes its TrainerState, to the functions that take it.
TRAINER_STATE = "trainer_state"
# The keywords under which reward functions get TRL's logging callables: log_metric(name, value), a scalar
# averaged into the iteration's metrics; log_extra(column, values), one value per sample for the samples file.
LOG_METRIC = "log_metric"
LOG_EXTRA = "log_extra"
LOGGERS = (LOG_METRIC, LOG_EXTRA)
# TRL's keyword arguments beyond the data columns: passed only to the functions that take them (`takes_keyword`)
TRL_KEYWORDS = (COMPLETION_IDS, TRAINER_STATE, LOG_METRIC, LOG_EXTRA)


@dataclasses.dataclass(frozen=True)
class TrainingProgress:
    """What a reward function reads from its `trainer_state` argument (the fields of TRL's TrainerState that
    reward functions use): global_step, the RL iterations done before the one being scored; max_steps, the
    run's iterations (None where the caller does not know them)."""

    global_step: int
    max_steps: int | None = None


def _parameters(fn) -> dict:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # no signature to read (some builtins): the positional protocol
        return {}


def _keyword_form(params: dict) -> bool:
    """TRL's form: the function names `completions` or `completion_ids` as a keyword parameter, and its
    second positional parameter is not `completions` (rljax's (prompts, completions, ...) order)."""
    P = inspect.Parameter
    positional = [n for n, q in params.items() if q.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    named = any(n in params and params[n].kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
                for n in ("completions", COMPLETION_IDS))
    return named and positional[1:2] != ["completions"]


def takes_keyword(fn, name: str) -> bool:
    """Whether `call_reward` passes fn TRL's keyword argument `name` (`TRL_KEYWORDS`): fn names that parameter,
    or is in TRL's keyword form with **kwargs (TRL passes them to every function); a `RewardSum` when a term
    does. Functions of the (prompts, completions, **metadata) form that want one name the parameter."""
    if isinstance(fn, RewardSum):
        return any(takes_keyword(f, name) for _, f in fn.terms)
    params = _parameters(fn)
    return name in params or (_keyword_form(params) and any(q.kind == q.VAR_KEYWORD for q in params.values()))


def takes_completion_ids(fn) -> bool:
    """`takes_keyword(fn, COMPLETION_IDS)`: whether a caller should gather the completions' token ids for fn."""
    return takes_keyword(fn, COMPLETION_IDS)


def _needs_keyword(fn, name: str) -> bool:
    """fn cannot be called without TRL's keyword argument `name`: a parameter of that name without a default
    (or a term's)."""
    if isinstance(fn, RewardSum):
        return any(_needs_keyword(f, name) for _, f in fn.terms)
    q = _parameters(fn).get(name)
    return q is not None and q.default is inspect.Parameter.empty


def completion_id_lists(ids, lengths) -> list[list[int]]:
    """The completions' token ids as reward functions get them (`COMPLETION_IDS`): row i's first lengths[i]
    ids of ids [R, N] (the completion part of a `Rollout`'s tokens; lengths: `Rollout.lengths`, the stop
    token counted)."""
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    return [row[:int(n)].tolist() for row, n in zip(ids, lengths)]


def _json_value(v, where: str):
    """v as a JSON value (numpy scalars and 0-d arrays as Python numbers), or a TypeError naming `where`."""
    if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0):
        v = v.item()
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: a JSON value is needed (it goes to the samples file), got {_repr.repr(v)} "
                        f"({e})") from None
    return v


class RewardLog:
    """What a reward function logs during one `score_with_failures` call through TRL's keyword arguments:
    log_metric(name, value) appends a finite float to metrics[name]; log_extra(column, values) puts one JSON
    value per sample of the call into extra[column] [B] (None where a sample's call logged nothing). A chunked
    call's functions get log_extra bound to their chunk's rows (`bind`); calls on worker threads are safe."""

    def __init__(self, size: int):
        self.size, self.metrics, self.extra, self._lock = size, {}, {}, threading.Lock()

    def log_metric(self, name: str, value) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"log_metric: the name must be a non-empty str, got {_repr.repr(name)}")
        ok = isinstance(value, (numbers.Real, np.generic, np.ndarray)) and not isinstance(value, (bool, np.bool_)) \
            and np.ndim(value) == 0
        if not ok or not math.isfinite(float(value)):
            raise ValueError(f"log_metric({name!r}, ...): the value must be a finite real number, got "
                             f"{_repr.repr(value)}")
        with self._lock:
            self.metrics.setdefault(name, []).append(float(value))

    def _log_extra(self, rows: range, column: str, values) -> None:
        if not isinstance(column, str) or not column:
            raise TypeError(f"log_extra: the column must be a non-empty str, got {_repr.repr(column)}")
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != len(rows):
            raise ValueError(f"log_extra({column!r}, ...): one value per sample of the call ({len(rows)}), got "
                             f"{_repr.repr(values)}")
        plain = [_json_value(v, f"log_extra({column!r}, ...)[{j}]") for j, v in enumerate(values)]
        with self._lock:
            column_values = self.extra.setdefault(column, [None] * self.size)
            column_values[rows.start:rows.stop] = plain

    def bind(self, rows: range) -> dict:
        """The keyword arguments of a call on `rows` of the batch: {log_metric, log_extra}."""
        return {LOG_METRIC: self.log_metric, LOG_EXTRA: lambda column, values: self._log_extra(rows, column, values)}

    def forward(self, to: dict) -> None:
        """Hand what was logged to an outer caller's log_metric / log_extra (`to`, either may be missing):
        a `RewardSum`'s terms scored inside a call that itself logs."""
        with self._lock:
            metrics, extra = {k: list(v) for k, v in self.metrics.items()}, dict(self.extra)
        if LOG_METRIC in to:
            for name, values in metrics.items():
                for v in values:
                    to[LOG_METRIC](name, v)
        if LOG_EXTRA in to:
            for column, values in extra.items():
                to[LOG_EXTRA](column, values)


def _awaited(out):
    """The result of an `async def` reward function: its coroutine run to the end, on this thread's own event
    loop, or, where one is already running here (a notebook's), on a thread of its own."""
    if not inspect.isawaitable(out):
        return out

    async def result():
        return await out

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(result())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, result()).result()


def call_reward(fn: RewardFn, prompts: list, completions: list, **metadata):
    """fn(prompts, completions, **metadata), or, for TRL's keyword form (`_keyword_form`:
    `def reward(completions, **kwargs)`, `def reward(completion_ids, **kwargs)`), by keyword as TRL calls
    it: fn(completions=..., prompts=... each when fn takes it or **kwargs, **metadata). metadata's
    `completion_ids` and `trainer_state` (`TRL_KEYWORDS`) reach only a function that takes them
    (`takes_keyword`). An awaitable result (an `async def` function's) is awaited."""
    params = _parameters(fn)
    unwanted = [k for k in TRL_KEYWORDS if k in metadata and not takes_keyword(fn, k)]
    if unwanted:
        metadata = {k: v for k, v in metadata.items() if k not in unwanted}
    if not _keyword_form(params):
        return _awaited(fn(prompts, completions, **metadata))
    any_keyword = any(q.kind == q.VAR_KEYWORD for q in params.values())
    given = {"prompts": prompts, "completions": completions}
    return _awaited(fn(**{k: v for k, v in given.items() if k in params or any_keyword}, **metadata))


class _Caller:
    """Calls one reward function on row ranges of one batch: directly, or on daemon threads
    with a time limit. An outcome is ("ok", result), ("error", exception) or ("timeout", None)."""

    def __init__(self, reward_fn, prompts, completions, metadata, cfg: RewardCallConfig, constants=None,
                 log: RewardLog | None = None):
        self.fn, self.prompts, self.completions = reward_fn, prompts, completions
        self.metadata, self.cfg, self.constants = metadata, cfg, dict(constants or {})  # constants: every call's
        self.log = log  # the loggers, bound to each call's rows
        self.B, self.calls, self._lock = len(completions), 0, threading.Lock()

    def invoke(self, rows: range):
        with self._lock:  # counted from worker threads
            self.calls += 1
        loggers = {} if self.log is None else self.log.bind(rows)
        if len(rows) == self.B:  # the whole batch: the caller's metadata as given, as before chunking existed
            return call_reward(self.fn, list(self.prompts), list(self.completions), **self.metadata,
                               **self.constants, **loggers)
        return call_reward(self.fn, [self.prompts[i] for i in rows], [self.completions[i] for i in rows],
                           **{k: [v[i] for i in rows] for k, v in self.metadata.items()}, **self.constants,
                           **loggers)

    def outcome(self, rows: range):
        try:
            return "ok", self.invoke(rows)
        except Exception as e:  # noqa: BLE001 -- any failure of user code is reported, with its sample
            return "error", e

    def _report(self, done: queue.SimpleQueue, j: int, rows: range):
        try:
            out = self.outcome(rows)
        except BaseException as e:  # noqa: BLE001 -- e.g. sys.exit in sandboxed code: a thread that died
            out = ("error", e)  # without reporting would leave run() waiting forever when there is no timeout
        done.put((j, out))

    def run(self, chunks: list[range], stop_at_failure: bool):
        """Outcomes of the chunks (a dict by chunk index), at most cfg.workers at a time, each
        under cfg.timeout_s. stop_at_failure: return at the first failed chunk, leaving the
        rest uncalled (and the running ones abandoned)."""
        if not self.cfg.threaded:
            outcomes = {}
            for j, rows in enumerate(chunks):
                outcomes[j] = self.outcome(rows)
                if stop_at_failure and outcomes[j][0] != "ok":
                    break
            return outcomes
        # A fresh daemon thread per call rather than a ThreadPoolExecutor: the executor joins its
        # threads at interpreter exit, so one call that never returns would hang the process.
        done, outcomes = queue.SimpleQueue(), {}
        pending, started = collections.deque(enumerate(chunks)), {}
        limit = self.cfg.timeout_s
        while pending or started:
            while pending and len(started) < self.cfg.workers:
                j, rows = pending.popleft()
                started[j] = time.monotonic()  # the limit counts from the call's start, not the batch's
                threading.Thread(target=self._report, args=(done, j, rows), daemon=True,
                                 name=f"reward-call-{j}").start()
            wait = None if limit is None else max(0.0, min(started.values()) + limit - time.monotonic())
            try:
                j, out = done.get(timeout=wait)
            except queue.Empty:
                now = time.monotonic()
                late = [j for j, t0 in started.items() if now - t0 >= limit]
                for j in late:  # abandoned: its thread runs on, and its result is never read
                    del started[j]
                    outcomes[j] = ("timeout", None)
                if stop_at_failure and late:
                    return outcomes
                continue
            del started[j]
            outcomes[j] = out
            if stop_at_failure and out[0] != "ok":
                return outcomes
        return outcomes

    def bisect(self, rows: range, failure):
        """rows failed together with `failure`; halve while a half fails alone. -> (rows', failure'):
        one sample that fails alone, or a range neither of whose halves fails alone (the failure
        needs them together), with its failure. At most 2 calls per halving, so
        2·ceil(log2 len(rows)) calls, where calling every sample alone would take len(rows)."""
        while len(rows) > 1:
            half = len(rows) // 2
            for part in (rows[:half], rows[half:]):
                out = self.run([part], stop_at_failure=True)[0]
                if out[0] != "ok":
                    rows, failure = part, out
                    break
            else:  # each half scores alone: only the whole range fails
                return rows, failure
        return rows, failure


def score_with_failures(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], *,
                        call_config: RewardCallConfig | None = None, allow_none: bool = False,
                        **metadata) -> Scores:
    """Call `reward_fn` on the batch as `call_config` says (default: once, on the whole batch)
    and return `Scores(rewards float32[B], failed bool[B], calls)`.

    Raises RewardError naming the function and the problem: an exception inside the
    function (with a sample on which calling it alone also fails, found by bisection, or
    the range of samples that fails only together), a call past its time limit (with its
    sample, or its chunk's range), a result that is not one real number per sample (saying
    what was returned), or non-finite rewards (with the offending samples). With
    on_failure="value", failed calls score failure_value instead of raising. allow_none: a
    returned None (as an element of a list) is kept as NaN in the rewards, not refused (`RewardSum`).
    metadata are per-sample sequences, except `trainer_state` (`TRAINER_STATE`): one object, given to every
    call (chunk) of a function that takes it, and `log_metric` / `log_extra` (`LOGGERS`): callables of the
    caller's that receive what the function logs through TRL's keyword arguments of those names, once the
    call is over (log_extra once per column, with the batch's B values). A function that takes them gets
    them whether or not the caller passes any (what it logs is then dropped).
    """
    cfg = RewardCallConfig() if call_config is None else call_config
    B = len(completions)
    if len(prompts) != B:
        raise RewardError(f"{len(prompts)} prompts but {B} completions")
    constants = {k: metadata.pop(k) for k in (TRAINER_STATE,) if k in metadata}  # one for the call, not per sample
    outer = {k: metadata.pop(k) for k in LOGGERS if k in metadata}
    for k, v in outer.items():
        if not callable(v):
            raise RewardError(f"metadata {k!r}: the name under which reward functions get TRL's {k} callable, got "
                              f"{type(v).__name__} (a data column of that name needs another)")
    for k, v in metadata.items():
        try:
            n = len(v)
        except TypeError:  # a scalar (problems=5): metadata are per-sample sequences
            raise RewardError(f"metadata {k!r} is {type(v).__name__} {_repr.repr(v)}, not a sequence of "
                              f"{B} per-sample entries") from None
        if n != B:
            raise RewardError(f"metadata {k!r} has {n} entries for {B} samples")
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    if COMPLETION_IDS not in metadata and _needs_keyword(reward_fn, COMPLETION_IDS):  # a setup error, not a failure
        raise RewardError(f"reward function {name} takes completion_ids (each completion's token ids), which this "
                          "caller does not have: it scores text alone (the RL iteration, recipes.reward_eval, "
                          "expert_iteration.rejection_sample and eval.evaluate_policy pass them)")
    if TRAINER_STATE not in constants and _needs_keyword(reward_fn, TRAINER_STATE):
        raise RewardError(f"reward function {name} takes trainer_state (the training's progress), which this caller "
                          "does not have: the RL loop (rljax.phases.rl, the grpo recipe) and recipes.reward_eval pass "
                          "it; elsewhere give the parameter a default")
    size = B if cfg.batch_size is None else cfg.batch_size
    chunks = [range(lo, min(B, lo + size)) for lo in range(0, B, max(size, 1))]
    log = RewardLog(B) if any(takes_keyword(reward_fn, k) for k in LOGGERS) else None
    caller = _Caller(reward_fn, prompts, completions, metadata, cfg, constants, log)
    outcomes = caller.run(chunks, stop_at_failure=cfg.on_failure == "raise")
    rewards, failed, none = np.zeros(B, np.float32), np.zeros(B, bool), np.zeros(B, bool)
    for j, rows in enumerate(chunks):
        if j not in outcomes:  # not called: an earlier failure under on_failure="raise" ends the batch
            continue
        kind, value = outcomes[j]
        where = "" if len(rows) == B else f" on samples {rows[0]}..{rows[-1]}"
        if kind == "ok":
            try:
                rewards[rows.start:rows.stop] = _numbers(value, name, len(rows), allow_none)
                if allow_none and isinstance(value, (list, tuple)):
                    none[rows.start:rows.stop] = [x is None for x in value]
            except RewardError as e:
                raise RewardError(f"{e}{where}") from None
            continue
        if cfg.on_failure == "value":
            rewards[rows.start:rows.stop], failed[rows.start:rows.stop] = cfg.failure_value, True
            continue
        if kind == "timeout":
            hint = "" if len(rows) == 1 else " (RewardCallConfig.batch_size=1 would name the sample)"
            raise RewardError(f"reward function {name} did not return within {cfg.timeout_s:g} s on "
                              f"{_describe(rows, prompts, completions)}{hint}; the call was abandoned and runs on "
                              "in a background thread")
        whole = value
        rows, (kind, value) = caller.bisect(rows, (kind, value))
        if kind == "timeout":
            raise RewardError(f"reward function {name} raised {type(whole).__name__}: {whole}{where}; calling it on "
                              f"{_describe(rows, prompts, completions)} alone ran past {cfg.timeout_s:g} s") from whole
        alone = "" if len(rows) == 1 else (" (each half alone scores: they fail only together, or the failure "
                                           "did not recur when the halves were retried)")
        if len(rows) == B and B > 1:
            raise RewardError(f"reward function {name} raised {type(value).__name__}: {value} on the batch of {B}"
                              f"{alone}") from value
        raise RewardError(f"reward function {name} raised {type(value).__name__}: {value} "
                          f"({_describe(rows, prompts, completions)}){alone}") from value
    bad = np.flatnonzero(~np.isfinite(rewards) & ~none)  # a returned None's NaN is allowed, a NaN reward is not
    if len(bad):
        i = int(bad[0])
        raise RewardError(f"reward function {name} returned non-finite rewards for {len(bad)} sample(s), e.g. "
                          f"sample {i} = {rewards[i]} (prompt {_preview(prompts[i])}, completion "
                          f"{_preview(completions[i])})")
    if log is not None:
        log.forward(outer)
    return Scores(rewards, failed, caller.calls)


def score(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], *,
          call_config: RewardCallConfig | None = None, **metadata) -> np.ndarray:
    """`score_with_failures(...).rewards`: float32[B], for callers that need no failure count."""
    return score_with_failures(reward_fn, prompts, completions, call_config=call_config, **metadata).rewards


def arithmetic_answer_reward(prompts, completions, *, problems: Sequence[Problem], **_) -> np.ndarray:
    """1 when the final answer is right (exact integer after `answer:`), else 0."""
    return np.array([float(check_answer(p, c)) for p, c in zip(problems, completions)], np.float32)


def arithmetic_step_reward(prompts, completions, *, problems: Sequence[Problem], **_) -> np.ndarray:
    """Fraction of the problem's reduction steps done right: (number of leading
    steps that `check_steps` accepts, capped at len(problem.steps)) / len(problem.steps).
    Partial credit for a right start: a chain that goes wrong at step k earns
    (k − 1)/S whatever follows, so outcome-only credit does not punish the right
    steps before the first mistake. 1 for a zero-step problem."""
    out = []
    for p, c in zip(problems, completions):
        labels = check_steps(p, c)
        right = next((i for i, ok in enumerate(labels) if not ok), len(labels))
        out.append(min(right, len(p.steps)) / len(p.steps) if p.steps else 1.0)
    return np.array(out, np.float32)


def arithmetic_format_reward(prompts, completions, **_) -> np.ndarray:
    """1 when the completion is `step;step;...;answer:N` with well-formed steps, else 0."""
    return np.array([float(well_formed(c)) for c in completions], np.float32)


def length_penalty(max_length: int, *, cache: int = 0, scale: float = 1.0, unit: str = "characters") -> RewardFn:
    """DAPO-style overlong shaping (DAPO's eq. 13; TRL's `get_soft_overlong_punishment` at scale 1) on
    completion length L: 0 for L <= max_length − cache, −scale · (L − (max_length − cache)) / cache within
    the last `cache` units, −scale beyond max_length (or past it when cache = 0). unit: "characters" (of
    the decoded text) or "tokens" (DAPO's: the completion's token ids, the stop token counted, which the
    function then takes as `completion_ids` from the callers that sampled them).
    ValueError for a negative max_length or cache, and when cache > max_length: the soft zone
    would start below length 0 and penalise even an empty completion."""
    if unit not in ("characters", "tokens"):
        raise ValueError(f"length_penalty: unit must be 'characters' or 'tokens', got {unit!r}")
    if max_length < 0 or cache < 0:
        raise ValueError(f"length_penalty: max_length ({max_length}) and cache ({cache}) must be >= 0")
    if cache > max_length:
        raise ValueError(f"length_penalty: cache ({cache}) must be <= max_length ({max_length}); the penalty "
                         f"zone would start at length {max_length - cache} and penalise every completion")
    start = max_length - cache

    def shaped(lengths) -> np.ndarray:
        L = np.array(lengths, np.float32)
        if cache <= 0:
            return np.where(L > max_length, -scale, 0.0).astype(np.float32)
        return (-scale * np.clip((L - start) / cache, 0.0, 1.0)).astype(np.float32)

    if unit == "tokens":
        def penalty(prompts, completions, completion_ids, **_):
            return shaped([len(ids) for ids in completion_ids])
    else:
        def penalty(prompts, completions, **_):
            return shaped([len(c) for c in completions])

    penalty.__name__ = f"length_penalty({max_length}, cache={cache}" + (", tokens)" if unit == "tokens" else ")")
    return penalty


def _term_name(fn) -> str:
    """A reward function's name as a metric key part: its __name__ (a partial's function's), with every
    character outside [A-Za-z0-9_] replaced ("<lambda>" -> "lambda")."""
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) \
        or type(fn).__name__
    return re.sub(r"\W+", "_", name).strip("_") or "reward"


@dataclasses.dataclass(frozen=True)
class RewardSum:
    """r = Σ_k w_k · r_k(prompts, completions, **metadata), a reward function whose terms stay apart: the
    RL iteration (`rljax.rl.make_rl_iteration`) scores each term on its own, under its RewardCallConfig,
    and reports each one's mean and standard deviation (unweighted) as `reward_<name>_mean` /
    `reward_<name>_std`, names from the functions (`names`: "<lambda>" -> "lambda", a repeated name
    numbered: "fmt", "fmt_2").

    A term may return None for a sample it does not apply to (TRL's convention: e.g. a math verifier
    given a code prompt): the sample's reward is then the weighted sum of the terms that did score it,
    and the term's metrics leave the sample out. A sample that no term scores is a RewardError naming
    it; so is a None from a reward function used alone. Under RewardCallConfig(on_failure="value") a
    sample for which any term's call failed scores failure_value (as for one function) and is counted
    once.

    terms: (weight, fn) pairs; `weighted_sum(*terms)` builds one, and a list of functions given to
    `rljax.recipes.grpo` is one with weights 1."""

    terms: tuple

    def __post_init__(self):
        terms = tuple(self.terms)
        if not terms:
            raise ValueError("RewardSum needs at least one (weight, reward_fn) term")
        for i, term in enumerate(terms):
            if not (isinstance(term, tuple) and len(term) == 2):
                raise ValueError(f"RewardSum: term {i} must be a (weight, reward_fn) pair, got {_repr.repr(term)}")
            w, fn = term
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not np.isfinite(float(w)):
                raise ValueError(f"RewardSum: term {i}'s weight must be a finite real number, got {w!r}")
            if not callable(fn):
                raise TypeError(f"RewardSum: term {i}'s reward function {fn!r} is not callable")
        object.__setattr__(self, "terms", tuple((float(w), fn) for w, fn in terms))

    @property
    def names(self) -> tuple[str, ...]:
        seen: dict[str, int] = {}
        out = []
        for _, fn in self.terms:
            base = _term_name(fn)
            seen[base] = seen.get(base, 0) + 1
            out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
        return tuple(out)

    @property
    def __name__(self) -> str:  # what error messages and logs call the sum
        return " + ".join(f"{w:g}*{getattr(fn, '__name__', type(fn).__name__)}" for w, fn in self.terms)

    def total(self, parts: Sequence[np.ndarray], failed: Sequence[np.ndarray] | None = None, *,
              failure_value: float = 0.0, describe: Callable[[int], str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rewards float32[B], failed bool[B]) from each term's scores `parts` ([B] each, NaN where the term
        returned None) and the samples whose call of each term failed: Σ_k w_k r_k over the terms that
        scored a sample, failure_value where any term's call failed. describe(i): the sample, for the
        error when no term scored it."""
        values = np.stack([np.asarray(p, np.float32) for p in parts])  # [K, B]
        failed_any = np.zeros(values.shape[1], bool) if failed is None else np.any(np.stack(failed), axis=0)
        scored = ~np.isnan(values)
        unscored = np.flatnonzero(~scored.any(axis=0) & ~failed_any)
        if len(unscored):
            i = int(unscored[0])
            raise RewardError(f"no term of the reward {self.__name__} scored {len(unscored)} sample(s): every term "
                              f"returned None for sample {i}" + (f" ({describe(i)})" if describe else "")
                              + "; each sample needs a term that scores it")
        weights = np.array([w for w, _ in self.terms], np.float32)[:, None]
        total = np.sum(np.where(scored, weights * values, 0.0), axis=0).astype(np.float32)
        return np.where(failed_any, np.float32(failure_value), total), failed_any

    def score_terms(self, prompts, completions, *, call_config: RewardCallConfig | None = None,
                    **metadata) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(rewards float32[B], {name: the term's rewards [B], NaN where it returned None or its call
        failed}): every term scored under call_config (`score_with_failures`), then `total`."""
        scores = [score_with_failures(fn, prompts, completions, call_config=call_config, allow_none=True, **metadata)
                  for _, fn in self.terms]
        failure_value = (call_config or RewardCallConfig()).failure_value
        rewards, _ = self.total([s.rewards for s in scores], [s.failed for s in scores], failure_value=failure_value,
                                describe=lambda i: _describe(range(i, i + 1), prompts, completions))
        return rewards, {name: np.where(s.failed, np.nan, s.rewards) for name, s in zip(self.names, scores)}

    def __call__(self, prompts, completions, **metadata) -> np.ndarray:
        return self.score_terms(prompts, completions, **metadata)[0]


def weighted_sum(*terms: tuple[float, RewardFn]) -> RewardSum:
    """Σ_k w_k · reward_k(prompts, completions, **metadata), as a `RewardSum` (its terms scored and
    reported apart by the RL iteration; a term may return None for a sample it does not apply to)."""
    if not terms:
        raise ValueError("weighted_sum needs at least one (weight, reward_fn) term")
    return RewardSum(terms)
