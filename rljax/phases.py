"""Phases: thin host loops around jitted steps, threading an immutable TrainState.

`run_loop` is shared by every phase: it fetches the batch at the state's data
position, calls the jitted step, logs, evaluates, checkpoints, shows progress,
and on start resumes from the run directory's latest checkpoint, so running the
same command again after a crash continues exactly where it stopped.

Faults. SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) while the loop runs
lets the current step finish, then checkpoints it, logs its metrics and raises
`Preempted`; `rljax.cli.run` turns that into a one-line message and exit code
128 + signal (143 for SIGTERM, 130 for SIGINT). Any other exception inside the
loop (a reward function, a data error, NonFiniteLossError) first checkpoints the
last finished step, then propagates. Either way a rerun of the same command loses
no finished step.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import jax
import numpy as np

from rljax.checkpoint import Checkpointer
from rljax.data.batch import PromptBatch
from rljax.cpu_dots import jit_full_sequence
from rljax.distributed import local_rows, on_main, process_values, raise_failed, say, to_host
from rljax.losses.reward_model import (FeedbackConfig, ImplicitPRMConfig, PointwiseConfig, RankingConfig,
                                      TokenLabelConfig, refuse_plackett_luce_input, reward_model_loss)
from rljax.losses.preference import (DPOConfig, KTOConfig, ORPOConfig, SimPOConfig, preference_loss,
                                    with_live_reference)
from rljax.losses.sft import SFTConfig, sft_loss
from rljax.metrics import MetricsWriter, Progress, WandbConfig, progress_postfix, write_samples
from rljax.models.transformer import check_positions
from rljax.rewards.rules import TrainingProgress
from rljax.sharding import param_shardings, shard_batch
from rljax.state import OptimizerConfig, TrainState, make_optimizer, make_train_step, owned_copy


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Preempted(RuntimeError):
    """`run_loop` stopped on a signal (SIGTERM or SIGINT) after finishing step `step`.

    step: the last finished step (the state's step), checkpointed under
    `checkpoint_dir` when the loop had a run_dir (None otherwise); signum: the signal;
    exit_code: 128 + signum, the shell's convention for a process ended by that
    signal (143 for SIGTERM, 130 for SIGINT), which `rljax.cli.run` exits with.
    """

    def __init__(self, name: str, step: int, signum: int, checkpoint_dir: str | None):
        self.name, self.step, self.signum, self.checkpoint_dir = name, step, signum, checkpoint_dir
        self.exit_code = 128 + signum
        where = (f"checkpoint at step {step} in {checkpoint_dir}; the phase resumes from it when run again in "
                 "this run directory" if checkpoint_dir else "no run_dir, so nothing was saved")
        super().__init__(f"[{name}] preempted by {signal.Signals(signum).name} after step {step}: {where}")


@dataclass(frozen=True)
class LoopConfig:
    """steps: total steps (batches) of the phase; log/eval/checkpoint intervals in
    steps (0 = only at the end); the loop stops with NonFiniteLossError after
    `max_consecutive_skips` consecutive non-finite steps. Where the logged metrics go
    besides <run_dir>/metrics.jsonl (`rljax.metrics.MetricsWriter`): tensorboard None
    mirrors them to <run_dir>/tb when a TensorBoard backend is installed (the
    `tensorboard` extra), True requires one, False never; wandb a
    `rljax.metrics.WandbConfig` also logs them to Weights & Biases (offline by default,
    under <run_dir>/wandb; the `wandb` extra)."""

    steps: int = 100
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    max_consecutive_skips: int = 5
    progress: bool = True
    tensorboard: bool | None = None
    wandb: WandbConfig | None = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"LoopConfig.steps: must be >= 0, got {self.steps}")
        for f in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, f) < 0:
                raise ValueError(f"LoopConfig.{f}: must be >= 0, got {getattr(self, f)}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"LoopConfig.max_consecutive_skips: must be >= 1, got {self.max_consecutive_skips}")
        if self.keep_checkpoints < 1:  # 0 kept nothing, not even the final save: a rerun started from scratch
            raise ValueError(f"LoopConfig.keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _on_process() -> str:
    """" on process i" where several processes run, else ""."""
    return f" on process {jax.process_index()}" if jax.process_count() > 1 else ""


def _tokens(batch, metrics) -> int:
    """The tokens a step processed, for tokens/s: its batch's real tokens (attention_mask: prompt and
    completion, padding out; a loss's own "tokens" metric counts only the tokens its loss reads), or,
    for a step that makes its own tokens from a prompt batch (RL: prompts + completions), its
    metrics["tokens"]."""
    mask = getattr(batch, "attention_mask", None)
    if mask is not None:
        return int(np.asarray(mask).sum())
    return int(metrics["tokens"]) if "tokens" in metrics else 0


FROZEN_FIELDS = ("ref_params", "teacher_params")  # state fields no step donates (RLState, OREOState)


def owned_state(state):
    """`owned_copy` of a state, except its frozen fields (`ref_params` of an RLState or
    OREOState, `teacher_params` of an RLState), which the steps never donate: the state a
    loop may donate step after step while the caller's arrays stay valid."""
    frozen = {f: getattr(state, f) for f in FROZEN_FIELDS if getattr(state, f, None) is not None}
    if not frozen:
        return owned_copy(state)
    return owned_copy(state.replace(**{f: None for f in frozen})).replace(**frozen)


class _StopSignals:
    """While active (a context manager), SIGTERM and SIGINT set `received` instead of
    ending the process, so the loop can finish its step and save; a second signal
    raises KeyboardInterrupt at once (a user pressing Ctrl-C twice wants out now; the
    loop still saves the last finished step on the way out). Only the main thread may
    install signal handlers, so elsewhere (a loop in a worker thread) it does nothing
    and signals keep their old behaviour. The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name} while saving")
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            # None: the old handler was not installed from Python; the default is the best guess
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def _alive(state) -> bool:
    """False when a step donated (and so deleted) any array of `state`."""
    return not any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state))


def _config_record(config) -> dict | None:
    """What a phase's config computes, as JSON for its checkpoints' meta: the dataclass's fields
    but its `loop` (how long, how shown and saved: a resume may change that), nested fields
    flattened ("optimizer.lr"), functions named by module and name."""
    if config is None:
        return None
    from rljax.cli import flat_fields, json_value

    try:
        record = json.loads(json.dumps(dataclasses.asdict(config), default=json_value))
    except Exception as e:  # noqa: BLE001 - a record to compare with, not worth stopping a run for
        say(f"[rljax] note: the phase's config could not be recorded in its checkpoints ({type(e).__name__}: {e})")
        return None
    record.pop("loop", None)
    return flat_fields(record)


def _say_config_changes(saved: dict | None, now: dict | None, name: str, step: int) -> None:
    """Resuming under another configuration than the checkpoint's: legal (a longer schedule, a
    new learning rate), but said, field by field, so that a mixed run is never silent."""
    if not saved or not now:
        return
    from rljax.cli import config_differences, listed_changes

    changes = config_differences(saved, now, ignore=(), added={})
    if changes:
        say(f"[{name}] warning: resuming at step {step} under another configuration than the checkpoint's "
             f"({listed_changes(changes, most=8)}); the steps before {step} ran with the saved values")


def _say_data_changes(saved: dict | None, now: dict | None, name: str, step: int) -> None:
    """Resuming with other data (more or fewer examples, another batch size, seed or order): the data
    position then names other batches than the ones the saved run would have drawn. Legal, but said."""
    if not saved or not now:
        return
    from rljax.cli import config_differences, listed_changes

    changes = config_differences(saved, now, ignore=(), added={})
    if changes:
        say(f"[{name}] warning: resuming at step {step} with other data than the checkpoint's "
             f"({listed_changes(changes)}); from data position {step} on the batches are not the ones the saved "
             "run would have drawn")


def _save_finished(ckpt: Checkpointer, state, name: str, meta: Callable[[int], dict]) -> None:
    """Checkpoint `state`, the last finished step, unless it is already saved or its arrays
    were donated to a step that then failed (then the latest checkpoint is all there is).
    Called while an exception propagates, so it reports and swallows its own errors."""
    try:
        if not _alive(state):
            say(f"[{name}] the failed step had consumed the state; the latest checkpoint "
                 f"(step {ckpt.latest_step()}) is the last saved step")
            return
        step = int(jax.device_get(state.step))
        if step != ckpt.latest_step():
            ckpt.save(state, meta(step), force=True)
            ckpt.wait()
            say(f"[{name}] saved the last finished step {step} in {ckpt.directory} before stopping")
    except Exception as e:  # the original error matters more than this one
        say(f"[{name}] could not save the last finished step{_on_process()}: {type(e).__name__}: {e}", everywhere=True)


LOSS_PROGRESS = {"loss": "loss"}  # progress-bar label: metric, for phases that minimise a loss
# RL: what the policy earns; its loss (e.g. GRPO's, about 0 by construction) says little
RL_PROGRESS = {"reward": "reward_mean", "acc": "accuracy", "kl": "kl_k3"}


def run_loop(state: TrainState, step_fn: Callable, data, cfg: LoopConfig, *, run_dir: str | None = None,
             put_batch: Callable | None = None, eval_fn: Callable[[TrainState], dict] | None = None,
             name: str = "train", progress_metrics: dict[str, str] | None = None, config=None) -> TrainState:
    """Run `step_fn(state, batch) -> (state, metrics)` until state.step == cfg.steps.

    data: anything with `batch_at(position)` (e.g. BatchIterator); the position is
    state.step, so data and state stay in lock-step across restarts.
    run_dir: metrics.jsonl (+ TensorBoard) and checkpoints/ go here; an existing
    checkpoint there is restored first (cfg.tensorboard and cfg.wandb: where else the
    metrics go; cfg.wandb needs a run_dir; only process 0 writes any of them). put_batch: places a host
    batch on devices (e.g. shard_batch over a mesh of this process's rows). eval_fn(state) -> metrics, logged
    as eval/*.
    progress_metrics: {label: metric} the progress bar shows at each logged step, when
    the step reports them, followed by tokens/s (every real token of the batch, prompt and completion,
    or an RL step's prompts + completions; logged as tokens_per_s) (default LOSS_PROGRESS; the RL phase
    shows RL_PROGRESS: mean reward, accuracy, KL to the reference).

    The loop trains a copy of `state` (`owned_state`): the steps donate their input, and
    the caller's arrays (the state passed in, parameters it shares with a reference)
    stay valid. While the phase runs, the caller's state and the trained one are both
    held (one more copy of params and optimizer state); the frozen `ref_params` of an
    RL or OREO state are not donated and are not copied.

    Faults (see the module docstring): on SIGTERM/SIGINT the running step finishes, is
    checkpointed and logged, and `Preempted` is raised; on any other exception the last
    finished step is checkpointed before the exception propagates. The signal handlers
    exist only while the loop runs, and only when it runs in the main thread.

    Resuming at step S drops the metrics.jsonl records of this phase with step > S (a
    killed run may have logged steps it never checkpointed; the rerun logs them again)
    and, when steps remain, adds the marker `{"step": S, "event": "resumed", "phase":
    "<name>/"}` (`MetricsWriter.resume`). A finished run called again runs no step, and its
    final evaluation is read back from metrics.jsonl, not run and logged again. config: the phase's configuration (a dataclass; its `loop`
    field aside), kept in every checkpoint's meta; resuming under another one prints each field
    that changed.

    Several processes (`rljax.distributed`): every process calls run_loop with the same data
    (the same global batches: e.g. a BatchIterator over the same rows with the same seed), and
    put_batch keeps the process's own rows of each (the phases' `_host_batch`). Every process runs
    the steps, eval_fn (which may be collective) and the checkpoints (collective: orbax writes each
    process's shards); only process 0 writes metrics.jsonl / TensorBoard / W&B, prints and shows
    the progress bar. A signal to any process stops every process after the same step (the
    processes agree on it after each step, `distributed.process_values`), which is checkpointed; the
    processes that got no signal raise `Preempted` with the other's. A metrics write failing on
    process 0 (a full disk, W&B), or eval_fn raising on some processes only once its collective work is
    done (a scorer failing on one process's rows), is raised on every process after the next step (the
    failed process its error, the others a RuntimeError naming it), each checkpointing that step first;
    after the final evaluation, at once. An eval_fn failing on one process before a collective it runs
    leaves the others waiting in that collective: no agreement can come between."""
    if cfg.wandb is not None and not run_dir:
        raise ValueError(f"[{name}] LoopConfig.wandb needs a run_dir: the W&B run's id and offline files live there")
    shown = LOSS_PROGRESS if progress_metrics is None else progress_metrics
    # Every process runs the steps and has the same metrics; process 0 alone writes them (metrics.jsonl,
    # TensorBoard, one W&B run per run directory) and shows progress: n writers would log every line n
    # times and rewrite the file concurrently on resume. Checkpoints stay collective (orbax saves each
    # process's shards).
    main, several = jax.process_index() == 0, jax.process_count() > 1
    writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard, wandb=cfg.wandb) if run_dir and main else None
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.keep_checkpoints) if run_dir else None
    stop = _StopSignals()
    record = _config_record(config)

    data_record = data.description() if callable(getattr(data, "description", None)) else None

    def meta(step: int) -> dict:
        out = {"data_position": step}
        if record is not None:
            out["config"] = record
        if data_record is not None:
            out["data"] = data_record
        return out

    try:
        resumed = ckpt is not None and ckpt.latest_step() is not None
        if resumed:
            given = int(jax.device_get(state.step))
            state, saved = ckpt.restore(state)
            # at the caller's own step, the run is not resumed but continued: a pipeline's next round training
            # the same component in the same directory from the state the last round returned
            resumed = int(state.step) != given
            say(f"[{name}] {'resumed' if resumed else 'continuing'} from {ckpt.directory} at step "
                 f"{int(state.step)} (data position {saved.get('data_position')})")
            if resumed:  # at the caller's own step (a stage continuing the last one's state in
                # the same directory), no step of the saved run is kept that the new config or data would change
                _say_config_changes(saved.get("config"), record, name, int(state.step))
                _say_data_changes(saved.get("data"), data_record, name, int(state.step))
        else:  # restored arrays are already fresh
            state = owned_state(state)
        start = int(jax.device_get(state.step))
        if resumed and start > cfg.steps:  # nothing to run, and not the state the caller asked for: say so
            say(f"[{name}] warning: the checkpoint in {ckpt.directory} is at step {start}, past steps="
                 f"{cfg.steps}: it is returned as it is (no step undone); use another run_dir for a shorter run")
        if writer is not None:  # a fresh start (resumed False) drops the lines a run killed before its first
            # checkpoint wrote: they belong to no state, and the rerun logs those steps again
            writer.resume(start, prefix=f"{name}/", mark=resumed and start < cfg.steps)
        consecutive = 0
        progress = Progress(cfg.steps, initial=start, desc=name, disable=not cfg.progress or not main)
        # tokens/s counts the steps' time only: evaluations and checkpoint saves are subtracted (`paused`)
        t_last, tokens_since, shown_step, skipped_since, paused = time.perf_counter(), 0, start, 0, 0.0
        # Several processes: a failure of work one process does alone (process 0 writing metrics, the host side
        # of an evaluation) is held until every process knows of it (`agreed`, after the next step), then all
        # raise: the checkpoint each then saves of its last finished step is collective, and a process failing
        # alone would wait in it for the others
        held: list[Exception] = []

        def own(fn, *args, **kw):
            """fn(*args, **kw), or None with its failure held (several processes)."""
            try:
                return fn(*args, **kw)
            except Exception as e:  # noqa: BLE001 - raised by `agreed` on every process
                if not several:
                    raise
                held.append(e)
                return None

        def agreed() -> int:
            """The signal this process received, or (several processes) any process received, 0 for none;
            raises when a process holds a failure."""
            if not several:
                return stop.received or 0
            table = process_values([stop.received or 0, len(held)])
            raise_failed(table[:, 1], held[0] if held else None, f"[{name}]")
            return int(table[:, 0].max())

        with stop:
            try:
                for position in range(start, cfg.steps):
                    batch = data.batch_at(position)
                    state, metrics = step_fn(state, put_batch(batch) if put_batch else batch)
                    metrics = jax.device_get(metrics)
                    tokens_since += _tokens(batch, metrics)
                    step = position + 1
                    consecutive = consecutive + 1 if int(metrics.get("skipped", 0)) else 0
                    skipped_since += 1 if consecutive else 0
                    failing = consecutive >= cfg.max_consecutive_skips  # logged first, then raised
                    # a signal came during this step, to this process or (several processes) to any: all stop
                    # after the same step, since the checkpoint that follows is collective
                    received = agreed()
                    stopping = received != 0
                    if _due(step, cfg.log_every) or step == cfg.steps or stopping or failing:
                        dt = time.perf_counter() - t_last - paused
                        rate = tokens_since / dt if dt > 0 else 0.0
                        if writer:  # the skipped steps since the last row: a logged step alone would hide them
                            own(writer.write, step, dict(metrics, tokens_per_s=rate,
                                                         skipped_since_last_log=skipped_since), prefix=f"{name}/")
                        if skipped_since:
                            say(f"[{name}] warning: {skipped_since} of steps {shown_step + 1}..{step} had a "
                                 "non-finite loss or gradient and were skipped (the state left unchanged)")
                        progress.update(step - progress.n, **progress_postfix(metrics, shown, rate))
                        t_last, tokens_since, shown_step, skipped_since, paused = time.perf_counter(), 0, step, 0, 0.0
                    else:  # the bar moves every step (log_every=0 logs the last step alone)
                        progress.update(step - progress.n)
                    if failing:
                        raise NonFiniteLossError(
                            f"[{name}] loss or gradient was non-finite for {consecutive} consecutive steps "
                            f"(steps {step - consecutive + 1}..{step}); those steps left the state unchanged. "
                            f"Check the batches at data positions {step - consecutive}..{step - 1} or lower "
                            f"the learning rate.")
                    if stopping:
                        progress.close()
                        if ckpt is not None and step != ckpt.latest_step():
                            ckpt.save(state, meta(step), force=True)  # close() waits for it
                        raise Preempted(name, step, received, ckpt.directory if ckpt else None)
                    t_aside = time.perf_counter()
                    if eval_fn is not None and _due(step, cfg.eval_every) and step != cfg.steps:
                        _evaluate(eval_fn, state, step, writer, name, own)
                    if ckpt is not None and _due(step, cfg.checkpoint_every):
                        ckpt.save(state, meta(step))
                    paused += time.perf_counter() - t_aside
                agreed()  # a failure held at the last step
            except BaseException as e:
                # `state` is rebound only when a step returns, so here it is the last finished step's
                # state (alive unless the failing step had already donated it)
                if ckpt is not None and not isinstance(e, Preempted):
                    _save_finished(ckpt, state, name, meta)
                raise
        progress.close()
        if consecutive and consecutive == cfg.steps - start:  # fewer than max_consecutive_skips, but all of them
            raise NonFiniteLossError(
                f"[{name}] loss or gradient was non-finite at every step this run made (steps {start + 1}.."
                f"{cfg.steps}); they left the state unchanged. Check the data and the learning rate.")
        if consecutive:
            say(f"[{name}] warning: the last {consecutive} step(s) had a non-finite loss or gradient and were "
                 f"skipped (steps {cfg.steps - consecutive + 1}..{cfg.steps})")
        end = int(jax.device_get(state.step))
        if ckpt is not None and end != ckpt.latest_step():
            ckpt.save(state, meta(end), force=True)
        if eval_fn is not None:
            # a finished run called again: its final evaluation is in the log already (evaluating
            # again would cost the time and write the record twice)
            logged = writer.logged(end, prefix=f"{name}/eval/") if writer and start >= cfg.steps else None
            found = bool(logged)
            if start >= cfg.steps and run_dir and jax.process_count() > 1:
                # process 0 read the log; the others take its branch, since an evaluation may be collective
                # (a sharded forward pass) and would wait forever for a process that skipped it
                from jax.experimental import multihost_utils

                found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
            if found:
                if main:
                    say(f"[{name}] step {end} eval (logged by the finished run): " + _listed(logged))
            else:
                _evaluate(eval_fn, state, end, writer, name, own)
                agreed()  # an evaluation that failed on one process alone fails the phase on every process
        return state
    finally:
        if ckpt is not None:
            ckpt.close()  # waits for the pending (possibly preemption) save to finish
        if writer is not None:
            writer.close()


def _evaluate(eval_fn, state, step, writer, name, own):
    """Run eval_fn on every process (it may run collective programs: a sharded forward pass); process 0
    (the one with a writer) logs and prints its result. eval_fn and the write go through `own` (run_loop's
    holding of failures on several processes, so that a failure after the evaluation's collective work,
    e.g. a scorer raising on one process's rows, stops every process at the next agreement instead of
    leaving the others waiting in a collective; one process: it raises at once)."""
    result = own(eval_fn, state)
    if result is None:  # failed here, held until the processes agree
        return
    if writer:
        own(writer.write, step, result, prefix=f"{name}/eval/")
    if jax.process_index() == 0:
        say(f"[{name}] step {step} eval: " + _listed(result))


def loss_eval(loss_fn: Callable, batches: Sequence, *, model, mesh=None, prepare: Callable | None = None,
              frozen=None, where: str = "eval") -> Callable[[TrainState], dict]:
    """An eval_fn for `run_loop`: eval_fn(state) -> {"loss": ..., metric: ...}, loss_fn(state.params, batch)
    -> (loss, metrics) (the phase's training loss) evaluated on fixed held-out host `batches`, no update.

    Every value is the mean over the batches weighted by their rows (a preference pair, a sequence), the
    loss by the loss's own count (metrics["loss_weight"], e.g. the tokens of a token-mean loss) when it
    reports one, so that batches of any size give the loss and metrics of the whole held-out set:
    loss = Σ_b w_b L_b / Σ_b w_b. prepare(frozen, batch) -> batch fills a batch from frozen params first
    (a live reference's log-probs: `make_train_step`'s prepare). mesh: None = the model's; each batch is
    placed as the phase places its training batches (split over the mesh's batch axes, so its rows must
    split over them; on several processes every process passes the same batches)."""
    mesh = phase_mesh(mesh, model)
    put = _host_batch(model, mesh, where)
    if mesh is not None and frozen is not None:
        frozen = jax.device_put(frozen, param_shardings(model, mesh))

    def evaluate(params, batch, frozen):
        if prepare is not None:
            batch = prepare(jax.lax.stop_gradient(frozen), batch)
        loss, metrics = loss_fn(params, batch)
        return {"loss": loss, **metrics}

    compiled = jit_full_sequence(evaluate, dtype=model.config.dtype)

    def eval_fn(state) -> dict:
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for batch in batches:
            rows = float(np.shape(jax.tree.leaves(batch)[0])[0])
            values = to_host(compiled(state.params, put(batch), frozen))
            own = float(values.pop("loss_weight", rows))
            for k, v in values.items():
                w = own if k == "loss" else rows
                sums[k] = sums.get(k, 0.0) + w * float(v)
                weights[k] = weights.get(k, 0.0) + w
        return {k: sums[k] / weights[k] if weights[k] else float("nan") for k in sums}

    return eval_fn


def _listed(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


@dataclass(frozen=True)
class SFTPhaseConfig:
    loss: SFTConfig = field(default_factory=SFTConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


@functools.lru_cache(maxsize=8)
def _sft_step(model, loss: SFTConfig, optimizer: OptimizerConfig, mesh):
    """The jitted SFT step of (model, loss, optimizer, mesh), built once: pipelines that run the SFT phase
    round after round (expert iteration, rejection sampling + SFT) compile it once per batch shape."""
    return make_train_step(functools.partial(sft_loss, model=model, cfg=loss), optimizer, model=model, mesh=mesh)


def _host_batch(model, mesh, where: str) -> Callable:
    """What a phase does to each host batch before its step: refuse positions past the model's context
    (`check_positions`: packed and shared-prompt rows escape the model's own length check), then
    shard it over `mesh` (if any). The batch is the global one (the same on every process); on several
    processes each keeps its own rows of it (`distributed.local_rows`), which `shard_batch` assembles
    into the global array, so n processes train exactly as one does (not on n copies of every row)."""
    _need_mesh(mesh, where)

    def place(batch):
        check_positions(batch, model.config.max_seq_len, where)  # on the global batch: the same error everywhere
        return batch if mesh is None else shard_batch(local_rows(batch), mesh=mesh)

    return place


def phase_mesh(mesh, model):
    """The mesh a phase shards its batches and step over: `mesh`, or by default the model's own
    (`Model(..., mesh=)`), so a pipeline that passes only the model trains sharded as it samples."""
    return model.mesh if mesh is None else mesh


def _need_mesh(mesh, where: str) -> None:
    """Several processes train one model only over a mesh of all their devices: without one each
    process would train its own copy on the whole batch and write the same checkpoint."""
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"{where}: {jax.process_count()} processes are running, so the phase needs mesh= (a "
                         "rljax.sharding.make_mesh over all their devices, data x fsdp splitting the rows over the "
                         "processes); without one every process would train its own copy on every row")


def sft(state: TrainState, data, cfg: SFTPhaseConfig, *, model, mesh=None, run_dir: str | None = None,
        eval_fn: Callable | None = None) -> TrainState:
    """Supervised fine-tuning: `run_loop` over `sft_loss`.

    `state` must have been created with `cfg.optimizer` (its optimizer state is
    continued, not rebuilt); data yields SequenceBatch (e.g. a BatchIterator over
    `collate_prompt_completion`). mesh: None = the model's (`phase_mesh`).
    """
    _check_opt_state(state, cfg.optimizer, "sft", cfg.loop)
    mesh = phase_mesh(mesh, model)
    step = _sft_step(model, cfg.loss, cfg.optimizer, mesh)
    put = _host_batch(model, mesh, "sft")
    return run_loop(state, step, data, cfg.loop, run_dir=run_dir, put_batch=put, eval_fn=eval_fn, name="sft",
                    config=cfg)


@dataclass(frozen=True)
class RewardModelPhaseConfig:
    """loss: RankingConfig (pairs, K-wise lists, Plackett–Luce), PointwiseConfig (human
    scores), TokenLabelConfig (verifiers, process reward models), FeedbackConfig
    (implicit signals with inverse-propensity weights) or ImplicitPRMConfig (an LM
    trained on outcomes whose log-ratio to the reference is the PRM); see
    rljax.losses.reward_model."""

    loss: RankingConfig | PointwiseConfig | TokenLabelConfig | FeedbackConfig | ImplicitPRMConfig = field(
        default_factory=RankingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


def check_accumulation(opt: OptimizerConfig, loop: LoopConfig, phase: str, field: str = "optimizer") -> None:
    """With grad_accum = k every k batches make one update: a phase of steps not a multiple of k would
    end with batches accumulated and never applied to the parameters it returns. A ValueError names both."""
    if opt.grad_accum > 1 and loop.steps % opt.grad_accum:
        raise ValueError(f"{phase}: loop.steps={loop.steps} is not a multiple of {field}.grad_accum={opt.grad_accum}: "
                         f"the last {loop.steps % opt.grad_accum} batch(es) would be accumulated and never applied; "
                         f"make steps a multiple of {opt.grad_accum}")


def _check_opt_state(state: TrainState, opt: OptimizerConfig, phase: str, loop: LoopConfig) -> None:
    check_accumulation(opt, loop, phase)
    expected = jax.tree.structure(jax.eval_shape(make_optimizer(opt).init, state.params))
    if jax.tree.structure(state.opt_state) != expected:
        raise ValueError(f"{phase}: state.opt_state does not match cfg.optimizer; create the state with "
                         "create_state(model, cfg.optimizer, key)")


def train_reward_model(state: TrainState, data, cfg: RewardModelPhaseConfig, *, model, mesh=None,
                       run_dir: str | None = None, eval_fn: Callable | None = None) -> TrainState:
    """Reward modelling: `run_loop` over `reward_model_loss` (the loss follows cfg.loss's
    type). data yields the matching batches (RankingBatch from `collate_pairs` /
    `collate_ranked`, ScoreBatch from `collate_scored`, TokenLabelBatch from
    `collate_verifier` / `collate_steps`, FeedbackBatch from `collate_feedback`,
    OutcomeBatch from `collate_outcomes`); the model needs the "reward" head (the "lm"
    head for the implicit PRM). Metrics,
    checkpoints and resume as every phase; `reward_model_eval` makes an eval_fn with
    pairwise accuracy, calibration error and rank correlation with a gold scorer."""
    need = "lm" if isinstance(cfg.loss, ImplicitPRMConfig) else "reward"
    if need not in model.config.heads:
        raise ValueError(f"train_reward_model: {type(cfg.loss).__name__} needs the model's {need!r} head "
                         f"(config.heads {model.config.heads})")
    _check_opt_state(state, cfg.optimizer, "train_reward_model", cfg.loop)
    mesh = phase_mesh(mesh, model)
    step = make_train_step(functools.partial(reward_model_loss, model=model, cfg=cfg.loss), cfg.optimizer,
                           model=model, mesh=mesh)
    put = _host_batch(model, mesh, "train_reward_model")
    if isinstance(cfg.loss, RankingConfig) and cfg.loss.objective == "plackett_luce":
        place = put

        def put(batch):  # a tied list's loss is NaN inside the step: name it here, on the concrete ranks
            refuse_plackett_luce_input(batch)
            return place(batch)
    return run_loop(state, step, data, cfg.loop, run_dir=run_dir, put_batch=put, eval_fn=eval_fn, name="rm",
                    config=cfg)


@dataclass(frozen=True)
class PreferencePhaseConfig:
    """loss: DPOConfig (DPO, cDPO, robust DPO, hinge, IPO), SimPOConfig, ORPOConfig or
    KTOConfig (`rljax.losses.preference.PREFERENCE_METHODS` has each method's defaults)."""

    loss: DPOConfig | SimPOConfig | ORPOConfig | KTOConfig = field(default_factory=DPOConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


def preference(state: TrainState, data, cfg: PreferencePhaseConfig, *, model, reference=None, mesh=None,
               run_dir: str | None = None, eval_fn: Callable | None = None) -> TrainState:
    """Offline preference optimisation: `run_loop` over `preference_loss`.

    data yields PreferenceBatch (`collate_preferences`) or, for KTO, KTOBatch
    (`collate_kto`); chosen and rejected (or a row and its mismatched pair) go through
    one forward pass. The reference's log-probs come from the batch's ref_logps when
    present (precomputed once with `rljax.reference.cached_reference_logps`, so only
    the policy is in memory), else from `reference` (frozen params, evaluated every
    step inside the train step's program: `with_live_reference` as `make_train_step`'s
    prepare); reference-free losses (SimPO, ORPO, reference_free=True) need neither.
    Metrics: loss, implicit rewards of chosen and rejected, margin, accuracy, log-probs
    (KTO: z0 and the desirable/undesirable rewards); checkpoints and resume as every phase.
    """
    _check_opt_state(state, cfg.optimizer, "preference", cfg.loop)
    mesh = phase_mesh(mesh, model)
    loss = functools.partial(preference_loss, model=model, cfg=cfg.loss)
    put = _host_batch(model, mesh, "preference")
    if reference is None or not cfg.loss.needs_reference:
        step = make_train_step(loss, cfg.optimizer, model=model, mesh=mesh)
    else:
        if mesh is not None:
            reference = jax.device_put(reference, param_shardings(model, mesh))
        train_step = make_train_step(loss, cfg.optimizer, model=model, mesh=mesh,
                                     prepare=functools.partial(with_live_reference, model=model,
                                                               chunk_size=cfg.loss.chunk_size))

        def step(state, batch):
            return train_step(state, batch, reference)

    return run_loop(state, step, data, cfg.loop, run_dir=run_dir, put_batch=put, eval_fn=eval_fn,
                    name="preference", config=cfg)


def rl(state, prompts, reward_fn: Callable, cfg, *, model, decode: Callable, loop: LoopConfig,
       run_dir: str | None = None, eval_fn: Callable | None = None, accuracy_fn: Callable | None = None,
       refill_prompts=None, critic_model=None, decode_prompts: Callable | None = None, teacher_model=None,
       monitors: dict[str, Callable] | None = None, samples_every: int = 0):
    """On-policy RL: `run_loop` over `rljax.rl` iterations (sample -> score -> prepare -> update).

    state: an RLState (create_rl_state); prompts: anything with batch_at(position) ->
    PromptBatch; cfg: RLConfig; loop.steps counts RL iterations. Metrics per iteration
    (reward, accuracy with `accuracy_fn`, KL, entropy, clip fraction, lengths, tokens/s,
    time per stage) go to metrics.jsonl; the progress bar shows the mean reward, the accuracy
    and the KL to the reference (those reported: `RL_PROGRESS`) and tokens/s.

    With cfg.max_refills (dynamic sampling), refill k of iteration i is
    refill_prompts.batch_at(i * max_refills + k - 1); by default `prompts` itself at
    positions past loop.steps, which the phase never uses otherwise. Either way the
    draw is a function of the iteration, so a resumed run refills identically.
    critic_model: the model of a separate critic in state.critic (see create_rl_state).
    decode_prompts: how the prompts' text for the reward is decoded (default `decode`; see
    make_rl_iteration: chat-templated prompts need a decode that does not stop at eos).
    teacher_model: the model of the teacher in state.teacher_params (on-policy distillation;
    default `model`). monitors: {name: fn} measured on every sample and never trained on, logged
    as `<name>_mean` (make_rl_iteration). samples_every: k > 0 writes every k-th iteration's samples, the
    rows trained on with their text, rewards (each `RewardSum` term's too), lengths and prompt metadata
    (make_rl_iteration's on_samples), to <run_dir>/samples/iteration-NNNNNN.jsonl (process 0 writes;
    `rljax.metrics.read_samples` reads them back); 0: none.

    With cfg.staleness = s > 0 (A3C-style asynchronous actors), batch i is sampled by
    an actor thread with the params of iteration i − s (0 for the first s) while the
    learner trains, and learned from with lag min(i, s) (the `staleness` metric); the
    sampling key of batch i is the synchronous loop's, so s = 0 is the plain loop. A
    resumed run re-samples its first s batches with the restored params (lags 0..s−1),
    so it continues the run but not bit for bit.

    Several processes: every process passes the same prompts (the global batches) and model.mesh spans
    them all; the iteration samples and scores each process's own rows and gathers the rewards, so the
    run equals one process's (see make_rl_iteration). Asynchronous actors (staleness > 0) are refused
    there: their threads would launch sampling and updates in an order that differs between processes,
    and collective programs must start in the same order everywhere.
    """
    from rljax.rl import make_rl_iteration

    if cfg.staleness and jax.process_count() > 1:
        raise ValueError(f"RLConfig.staleness={cfg.staleness}: asynchronous actors run on one process only (with "
                         f"{jax.process_count()} processes their threads would start collective programs in "
                         "different orders and wait for each other forever); use staleness=0")

    if samples_every < 0 or (samples_every and run_dir is None):
        raise ValueError(f"rl: samples_every={samples_every}: " + ("must be >= 0" if samples_every < 0 else
                                                                   "the samples go to run_dir, which is None"))

    def on_samples(step, records):  # every process agrees the write worked (one failing would diverge)
        on_main(f"writing iteration {step}'s samples", write_samples, run_dir, step, records)

    iteration = make_rl_iteration(model, cfg, reward_fn, decode, accuracy_fn=accuracy_fn, critic_model=critic_model,
                                  decode_prompts=decode_prompts, teacher_model=teacher_model, monitors=monitors,
                                  on_samples=on_samples if samples_every else None, samples_every=max(samples_every, 1))
    source, offset = (refill_prompts, 0) if refill_prompts is not None else (prompts, loop.steps)

    def refill_at(position):
        def refill(k):
            more = source.batch_at(offset + position * cfg.max_refills + k - 1)
            return more.tokens, more.mask, more.metadata
        return refill if cfg.max_refills else None

    if cfg.staleness == 0:
        def step(state, batch: PromptBatch):
            position = int(jax.device_get(state.step))
            return iteration(state, batch.tokens, batch.mask, refill=refill_at(position),
                             trainer_state=TrainingProgress(position, loop.steps), **batch.metadata)

        return run_loop(state, step, prompts, loop, run_dir=run_dir, eval_fn=eval_fn, name="rl",
                        progress_metrics=RL_PROGRESS, config=cfg)

    # Asynchronous actors: threads run `collect` for the next `staleness` batches with a
    # copy of the params of the moment (the learner donates its buffers), while the
    # learner runs `learn` on the current one. XLA releases the GIL, so sampling and
    # updates overlap; the schedule, and so every result, is deterministic.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=cfg.actors, thread_name_prefix="rl-actor")
    pending: dict[int, tuple[concurrent.futures.Future, int]] = {}

    def submit(position, state):
        batch = prompts.batch_at(position)
        snapshot = owned_copy(state.policy.params)
        key = jax.random.fold_in(state.rng, position)
        future = pool.submit(iteration.collect, snapshot, batch.tokens, batch.mask, key, refill=refill_at(position),
                             trainer_state=TrainingProgress(position, loop.steps), **batch.metadata)
        pending[position] = (future, int(jax.device_get(state.step)))

    def async_step(state, batch: PromptBatch):
        position = int(jax.device_get(state.step))
        for p in range(position, min(position + cfg.staleness, loop.steps - 1) + 1):
            if p not in pending:
                submit(p, state)
        future, version = pending.pop(position)
        return iteration.learn(state, future.result(), jax.random.fold_in(state.rng, position),
                               lag=position - version)

    try:
        return run_loop(state, async_step, prompts, loop, run_dir=run_dir, eval_fn=eval_fn, name="rl",
                        progress_metrics=RL_PROGRESS, config=cfg)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
