"""OREO around its losses: the policy/value/reference state, the joint jitted step, offline
trajectories (collection, storage, collation) and the phase (iterative OREO: `rljax.pipelines`).

    value_model, state = create_oreo_state(model, sft_params, cfg.optimizer, key)
    rows = collect_trajectories(sft_params, prompts, reward_fn, CollectConfig(samples=8), model=model,
                                tokenizer=tok, key=key, out_dir="runs/oreo/data", problems=problems)
    data = BatchIterator(rows, 16, functools.partial(collate_trajectories, tok))
    state = oreo(state, data, OREOPhaseConfig(...), model=model, run_dir="runs/oreo")

At test time the value model scores partial solutions for `value_guided_beam_search`
(`rljax.sampling`) through `value_scorer(value_model)`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rljax.buckets import DEFAULT_MIN_BUCKET
from rljax.checkpoint import atomic_path, digest_params, write_json
from rljax.data.batch import OREOBatch
from rljax.data.collate import pad_rows, padded_width
from rljax.losses.actor_critic import token_values
from rljax.losses.oreo import OREOConfig, oreo_policy_terms, oreo_value_loss_on_values
from rljax.models import add_head
from rljax.models.transformer import Model
from rljax.distributed import local_rows, on_main, to_host
from rljax.phases import LoopConfig, _need_mesh, check_accumulation, phase_mesh, run_loop
from rljax.rewards.rules import score
from rljax.sampling import SampleConfig, filled_prompts, sample, scorer_at_index
from rljax.sharding import LOGICAL_RULES, param_shardings, replicated, shard_batch, shard_params
from rljax.state import (BATCH, OptimizerConfig, TrainState, apply_gradients, apply_loss_gradients, compile_step,
                         create_state, make_optimizer, state_shardings)
from rljax.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- state and step


@struct.dataclass
class OREOState:
    """step: OREO steps done (the data position); policy and value: their TrainStates;
    ref_params: the frozen reference (the SFT policy). optimizer, value_optimizer (static,
    not arrays): the configs whose optimizer states `create_oreo_state` made; the step and the
    phase update with their own configs and refuse a state made for others (None: not
    recorded, e.g. a state built by hand; then only the optimizer states' structure is checked)."""

    step: jax.Array
    policy: TrainState
    value: TrainState
    ref_params: Any
    optimizer: OptimizerConfig | None = struct.field(pytree_node=False, default=None)
    value_optimizer: OptimizerConfig | None = struct.field(pytree_node=False, default=None)


def value_model_of(model: Model) -> Model:
    """The value model's architecture: the policy's backbone with only a scalar value head."""
    return Model(model.config.replace(heads=("value",)), model.mesh)


def value_params_from(model: Model, params: dict) -> dict:
    """Value-model parameters from policy (e.g. SFT) parameters: the same backbone and a
    zero-initialised value head (V ≡ 0 at the start), without the LM head."""
    _, with_head = add_head(model, params, "value")
    keep = value_model_of(model).param_shapes()
    return {k: v for k, v in with_head.items() if k in keep}


def create_oreo_state(model: Model, params: dict, opt_cfg: OptimizerConfig, key, *,
                      value_optimizer: OptimizerConfig | None = None, value_params: dict | None = None
                      ) -> tuple[Model, OREOState]:
    """(value model, state): the policy starts from a copy of `params`, which also become
    the frozen reference; the value model from `value_params` (default:
    `value_params_from(model, params)`). With model.mesh everything is placed sharded.

    opt_cfg, value_optimizer (None: opt_cfg) only make the optimizer states: the updates use
    the step's / phase's configs (`make_oreo_step(optimizer, value_optimizer)`,
    `OREOPhaseConfig.optimizer / value_optimizer`), so pass the same ones there. The state
    records them, and the step refuses a state made with others (a value_optimizer given
    here but not to the phase would otherwise be silently replaced by the policy's)."""
    value_model = value_model_of(model)
    if value_params is None:
        value_params = value_params_from(model, params)
    k_policy, k_value = jax.random.split(key)
    mesh = model.mesh
    policy = create_state(model, opt_cfg, k_policy, mesh=mesh, params=params)  # create_state copies
    value = create_state(value_model, value_optimizer or opt_cfg, k_value, mesh=mesh, params=value_params)
    ref = params if mesh is None else shard_params(params, param_shardings(model, mesh))
    # on a mesh, made under jit: with several processes the replicated sharding spans devices device_put
    # cannot reach from a local value
    step = jnp.int32(0) if mesh is None else jax.jit(lambda: jnp.int32(0), out_shardings=replicated(mesh))()
    return value_model, OREOState(step=step, policy=policy, value=value, ref_params=ref, optimizer=opt_cfg,
                                  value_optimizer=value_optimizer or opt_cfg)


def _differing(a: OptimizerConfig, b: OptimizerConfig) -> str:
    return ", ".join(f"{f.name} {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in dataclasses.fields(a)
                     if getattr(a, f.name) != getattr(b, f.name))


def check_oreo_optimizers(state: OREOState, optimizer: OptimizerConfig, value_optimizer: OptimizerConfig | None,
                          where: str) -> None:
    """Raise unless `state` was made for these optimizers (value_optimizer None: the policy's), since
    the update runs with these and only the optimizer states come from the state: the configs
    `create_oreo_state` recorded must be equal; a state without them (None) must at least have
    optimizer states of the right structure. The error names the model and the differing fields."""
    for name, train, recorded, given in (("policy", state.policy, state.optimizer, optimizer),
                                         ("value", state.value, state.value_optimizer, value_optimizer or optimizer)):
        field_name = "optimizer" if name == "policy" else "value_optimizer"
        if recorded is not None:
            if recorded != given:
                raise ValueError(f"{where}: the {name} model's optimizer differs from the one its state was created "
                                 f"with ({_differing(given, recorded)}; given here vs create_oreo_state); pass "
                                 f"the same {field_name} to create_oreo_state and to the step / OREOPhaseConfig")
            continue
        expected = jax.tree.structure(jax.eval_shape(make_optimizer(given).init, train.params))
        if jax.tree.structure(train.opt_state) != expected:
            raise ValueError(f"{where}: the {name} model's optimizer state does not match {field_name}; create the "
                             f"state with create_oreo_state and the same optimizers")


def make_oreo_step(model: Model, cfg: OREOConfig, optimizer: OptimizerConfig,
                   value_optimizer: OptimizerConfig | None = None, *, mesh=None, rules=LOGICAL_RULES,
                   donate: bool = True) -> Callable:
    """Jitted `step(state: OREOState, batch: OREOBatch) -> (state, metrics)`: one update of
    the value model and one of the policy, both from the pre-step models, in one program
    with one forward pass of each of the three models (policy, reference, value).

    As in the paper the critic steps first and the actor uses the values computed before
    that step: V_t of the value model (before its update) feeds the policy loss, and the
    policy's log-ratios ℓ_t (before its update) feed the value loss, so neither update
    sees the other's result and no host round trip separates them. A non-finite loss or
    gradient in either update leaves that model unchanged (metrics["skipped"] = 1).
    Metrics: the policy's (loss, policy_loss, kl, ...) and the value model's, prefixed
    "value/" where the names collide. optimizer, value_optimizer (None: optimizer) are the
    updates' configs; a state created with other ones is refused (`check_oreo_optimizers`).
    """
    value_model = value_model_of(model)
    tx_policy = make_optimizer(optimizer)
    tx_value = make_optimizer(value_optimizer or optimizer)

    def update(trained, ref_params, batch: OREOBatch):
        count, policy, value = trained
        # one value forward serves both updates: V_old for the actor, and the critic's loss,
        # whose gradient in V is pulled back through the same forward (no second pass)
        values, pull_back = jax.vjp(lambda p: token_values(p, batch.tokens, batch.attention_mask,
                                                           model=value_model), value.params)
        policy_loss = functools.partial(oreo_policy_terms, model=model, cfg=cfg, ref_params=ref_params)
        policy, pm, log_ratios = apply_loss_gradients(policy, tx_policy, policy_loss,
                                                      batch.replace(values=jax.lax.stop_gradient(values)),
                                                      has_aux_out=True)
        (v_loss, vm), dv = jax.value_and_grad(functools.partial(oreo_value_loss_on_values, cfg=cfg), has_aux=True)(
            values, batch.replace(log_ratios=log_ratios))
        value, vm = apply_gradients(value, tx_value, v_loss, pull_back(dv)[0], vm)
        metrics = dict(pm, **{k if k.startswith("value_") else f"value/{k}": v for k, v in vm.items()})
        metrics["skipped"] = jnp.maximum(pm["skipped"], vm["skipped"])
        return (count + 1, policy, value), metrics

    # The step owns (and donates) the counter, policy and value states, never the reference:
    # it is the caller's parameters (e.g. the SFT params), which must stay valid.
    donate_argnums = (0,) if donate else ()
    dtype, remat = model.config.dtype, model.config.rematerialised
    if mesh is None:
        jitted = compile_step(update, donate_argnums=donate_argnums, dtype=dtype, remat=remat)
    else:
        trained_sh = (replicated(mesh), state_shardings(model, tx_policy, mesh, rules),
                      state_shardings(value_model, tx_value, mesh, rules))
        jitted = compile_step(update, mesh=mesh, in_shardings=(trained_sh, param_shardings(model, mesh, rules), BATCH),
                              out_shardings=(trained_sh, None), donate_argnums=donate_argnums, rules=rules,
                              dtype=dtype, remat=remat)

    checked = set()  # recorded configs already checked (a run's states all share them: one check per run)

    def step(state: OREOState, batch: OREOBatch):
        key = (state.optimizer, state.value_optimizer)
        if key not in checked:
            check_oreo_optimizers(state, optimizer, value_optimizer, "OREO step")
            checked.add(key)
        out, metrics = jitted((state.step, state.policy, state.value), state.ref_params, batch)
        return state.replace(step=out[0], policy=out[1], value=out[2]), metrics

    return step


def value_scorer(value_model: Model, stop_ids: Sequence[int] = (2,)) -> Callable:
    """`scorer(value_params, tokens, attention_mask) -> [R]` (jitted), V(s) of each row's
    (partial) solution s, read at the last position OREO's value loss trains:

        V(s) = V_{t*},  t* = the row's last real token that is not a stop id (`sampling.scored_index`)

    OREO fits V_t only where a completion token follows (`token_values` is [B, T−1] and the loss
    masks the rest), so V read at a trailing eos was never trained: a finished solution
    "… 3 <eos>" is scored at "3", the state whose next token ends it; a partial one ending in a
    step separator at the separator (trained: the next step follows it). tokens, attention_mask
    [R, T], left or right padded.

    stop_ids: every id that ends a solution: the tokenizer's `eos_ids`, or the search's
    (cfg.eos_id, *cfg.stop_ids); default (2,), the samplers' default eos_id (`CharTokenizer`'s).
    The scorer's `skip_ids` attribute holds them, and `value_guided_beam_search` refuses it when
    the search ends solutions at another id. This is the signature the search takes.

    A process reward model is not scored this way: its labels sit on each step's last text token,
    never on the separator or eos a candidate ends with (`collate_steps`), and it reads the reward
    head; use `rljax.rewards.learned.prm_search_scorer(prm, skip_ids=(*step_end_ids, *stop ids))`."""
    return scorer_at_index(value_model, value_model.values, stop_ids, "value_scorer",
                           "the ids that end a solution (tokenizer.eos_ids)")


# ----------------------------------------------------------------------------- trajectories


def split_keeping_separator(completion: str, separator: str) -> list[str]:
    """A completion's steps, each ending with its separator (the last one may not): the
    pieces concatenate back to the completion exactly. An empty completion has no steps."""
    if not separator:
        raise ValueError("split_keeping_separator: the separator is empty")
    out, start = [], 0
    while True:
        at = completion.find(separator, start)
        if at < 0:
            break
        out.append(completion[start:at + len(separator)])
        start = at + len(separator)
    if start < len(completion):
        out.append(completion[start:])
    return out


def _get(row, name: str, i: int, *, default=KeyError):
    value = row.get(name, default) if isinstance(row, dict) else getattr(row, name, default)
    if value is KeyError:
        raise ValueError(f"row {i}: missing field {name!r}")
    return value


def check_reward(value, i: int, *, allow_fractional_rewards: bool = False) -> float:
    """A trajectory's terminal reward as a float: present, finite and in {0, 1} (any value in
    [0, 1] with allow_fractional_rewards); otherwise an error naming the row."""
    if value is None:
        raise ValueError(f"row {i}: the trajectory has no reward")
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"row {i}: reward must be a number, got {value!r}") from None
    if not math.isfinite(r):
        raise ValueError(f"row {i}: reward is {r}, not a finite number")
    if allow_fractional_rewards:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"row {i}: reward {r} is outside [0, 1]")
    elif r not in (0.0, 1.0):
        raise ValueError(f"row {i}: reward {r} is not 0 or 1; OREO's soft-Bellman targets assume a {{0, 1}} "
                         "terminal reward (pass allow_fractional_rewards=True to accept others)")
    return r


def trajectory_steps(row, i: int, separator: str | None) -> list[str] | None:
    """The row's steps: its recorded "steps" (which must concatenate to the completion),
    else the completion split after each separator, else None (no step boundaries)."""
    completion = _get(row, "completion", i)
    steps = _get(row, "steps", i, default=None)
    if steps is not None:
        steps = list(steps)
        if "".join(steps) != completion:
            raise ValueError(f"row {i}: its steps do not concatenate to its completion")
        return steps
    return None if separator is None else split_keeping_separator(completion, separator)


def check_trajectories(rows: Sequence, *, separator: str | None = None, allow_fractional_rewards: bool = False,
                       need_steps: bool = False) -> None:
    """Validate a whole trajectory data set before training: every row has a non-empty
    prompt, a completion and a valid reward (`check_reward`); with need_steps (the
    step-level loss) every prompt needs at least one sample with more than one step,
    or the separator is not the one the data use. Errors name the row."""
    if not rows:
        raise ValueError("check_trajectories: no trajectories")
    multi_step: dict[str, int] = {}
    for i, row in enumerate(rows):
        prompt = _get(row, "prompt", i)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"row {i}: the prompt is empty or not a string: {prompt!r}")
        if not isinstance(_get(row, "completion", i), str):
            raise ValueError(f"row {i}: the completion is not a string")
        check_reward(_get(row, "reward", i, default=None), i, allow_fractional_rewards=allow_fractional_rewards)
        if need_steps:
            steps = trajectory_steps(row, i, separator)
            if steps is None:
                raise ValueError(f"row {i}: the step-level loss needs step boundaries: record 'steps' or pass "
                                 "a separator")
            first = multi_step.setdefault(prompt, -1 - i)
            if len(steps) > 1 and first < 0:
                multi_step[prompt] = i
    if need_steps:
        for prompt, at in multi_step.items():
            if at < 0:
                raise ValueError(f"row {-1 - at}: no sample of its prompt {prompt[:60]!r} contains the step "
                                 f"separator {separator!r}, so the step-level loss has no steps to learn; "
                                 "check the separator or use level='token'")


def prompts_with_steps(rows: Sequence, separator: str | None = None) -> tuple[list, list[str]]:
    """(the rows of the prompts with at least one sample of more than one step, the other prompts in
    order of first appearance): the split `check_trajectories(need_steps=True)` asks of every
    prompt. Data a policy collected itself may hold a prompt it answered in one step every time;
    `pipelines.iterative_oreo` leaves such prompts out of the round (with a warning) instead of
    stopping the run."""
    prompts = [_get(row, "prompt", i) for i, row in enumerate(rows)]
    multi = {p for i, (p, row) in enumerate(zip(prompts, rows)) if len(trajectory_steps(row, i, separator) or ()) > 1}
    dropped = list(dict.fromkeys(p for p in prompts if p not in multi))
    return [row for p, row in zip(prompts, rows) if p in multi], dropped


def collate_trajectories(tokenizer: Tokenizer, rows: Sequence, *, separator: str | None = None,
                         allow_fractional_rewards: bool = False, max_length: int | None = None,
                         min_bucket: int = DEFAULT_MIN_BUCKET, length: int | None = None, add_bos: bool = True,
                         add_eos: bool = True) -> OREOBatch:
    """Trajectory rows (dicts or objects with prompt, completion, reward, optional steps
    and eos) -> right-padded OREOBatch.

    Row = [bos] prompt step_1 step_2 ... [eos]; each step is encoded on its own so its
    first token is known exactly (step_starts). eos is appended when the row's "eos" field
    says the sample stopped there (default add_eos), so a sample cut at the length limit
    is not taught to stop. Without steps and separator, step_starts is None. Errors name
    the row: a missing field or reward, a reward outside {0, 1} (unless
    allow_fractional_rewards), an empty completion.
    """
    if not rows:
        raise ValueError("collate_trajectories: no rows")
    encoded, masks, starts, rewards, have_steps = [], [], [], [], True
    for i, row in enumerate(rows):
        prompt, completion = _get(row, "prompt", i), _get(row, "completion", i)
        rewards.append(check_reward(_get(row, "reward", i, default=None), i,
                                    allow_fractional_rewards=allow_fractional_rewards))
        steps = trajectory_steps(row, i, separator)
        have_steps &= steps is not None
        ids = tokenizer.encode(prompt, add_bos=add_bos, add_eos=False)
        n_prompt, first = len(ids), []
        for piece in steps if steps is not None else [completion]:
            piece_ids = tokenizer.encode(piece, add_bos=False, add_eos=False)
            if piece_ids:
                first.append(len(ids))
                ids += piece_ids
        if bool(_get(row, "eos", i, default=add_eos)):
            if not first:
                first.append(len(ids))
            ids += tokenizer.encode("", add_bos=False, add_eos=True)
        if len(ids) == n_prompt:
            raise ValueError(f"row {i}: the completion is empty and has no eos (nothing to learn)")
        mark = [0] * len(ids)
        for t in first:
            mark[t] = 1
        encoded.append(ids)
        masks.append([0] * n_prompt + [1] * (len(ids) - n_prompt))
        starts.append(mark)
    width = padded_width([len(r) for r in encoded], length=length, min_bucket=min_bucket, max_length=max_length,
                         names=[f"row {i}" for i in range(len(rows))])
    tokens, attn, loss, step_starts = pad_rows(encoded, width, tokenizer.pad_id, masks, starts)
    return OREOBatch(tokens=tokens, attention_mask=attn, loss_mask=loss, rewards=np.asarray(rewards, np.float32),
                     step_starts=step_starts if have_steps else None)


@dataclass(frozen=True)
class CollectConfig:
    """Offline data collection: `samples` solutions per prompt sampled with `sampling`
    (its n is replaced), `prompts_per_batch` prompts per sampler call (one Parquet part
    each); balance: keep at most that many right and that many wrong samples per prompt
    (None: keep all); separator: record each sample's steps split after it."""

    samples: int = 8
    sampling: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=64, temperature=1.0))
    prompts_per_batch: int = 64
    balance: int | None = None
    separator: str | None = None

    def __post_init__(self):
        if self.samples < 1 or self.prompts_per_batch < 1:
            raise ValueError(f"CollectConfig: samples and prompts_per_batch must be >= 1, got {self.samples}, "
                             f"{self.prompts_per_batch}")
        if self.balance is not None and self.balance < 1:
            raise ValueError(f"CollectConfig.balance: must be >= 1 or None, got {self.balance}")


def balanced(rows: list[dict], k: int) -> list[dict]:
    """At most k rows with reward 1 and k with reward < 1 per prompt index, the first in
    sample order (so the choice is deterministic)."""
    kept, counts = [], {}
    for r in rows:
        key = (r["problem"], r["reward"] >= 1.0)
        if counts.get(key, 0) < k:
            counts[key] = counts.get(key, 0) + 1
            kept.append(r)
    return kept


def _manifest(params, prompts, cfg: CollectConfig, key) -> dict:
    h = hashlib.sha256()
    digest_params(params, h)
    p = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()
    config = {"samples": cfg.samples, "balance": cfg.balance, "separator": cfg.separator,
              "prompts_per_batch": cfg.prompts_per_batch, "sampling": dataclasses.asdict(cfg.sampling),
              "prompts": len(prompts), "prompts_sha256": p, "params_sha256": h.hexdigest(),
              "key": np.asarray(jax.random.key_data(key)).ravel().tolist()}
    return json.loads(json.dumps(config))  # as read back from manifest.json (tuples become lists)


def _write_json(path: str, obj) -> None:
    write_json(path, obj, indent=1)


def _parquet():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:  # the GPU machine has no `datasets`; in-memory collection still works there
        raise ImportError("collect_trajectories(out_dir=...) writes Parquet through pyarrow (a dependency of "
                          "`datasets`): pip install 'rljax[data]'") from e
    return pyarrow


def _read_part(out_dir: str, name: str) -> list[dict]:
    return _parquet().parquet.read_table(os.path.join(out_dir, name)).to_pylist()


def _write_part(rows: list[dict], path: str) -> None:
    """One Parquet part, written atomically (pyarrow directly: `datasets` would add progress
    bars and a cache copy; the file is the same and `datasets.load_dataset("parquet")` reads it)."""
    pa = _parquet()
    with atomic_path(path) as tmp:
        pa.parquet.write_table(pa.Table.from_pylist(rows), tmp)


def load_trajectories(out_dir: str) -> list[dict]:
    """The rows a finished `collect_trajectories(out_dir=...)` wrote (Parquet parts listed in
    manifest.json, in order); an unfinished collection is an error naming the directory."""
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out_dir}: no manifest.json; not a trajectory data set")
    with open(path) as f:
        manifest = json.load(f)
    n_parts = -(-manifest["config"]["prompts"] // manifest["config"]["prompts_per_batch"])
    done = manifest.get("parts", {})
    missing = [k for k in range(n_parts) if str(k) not in done]
    if missing:
        raise ValueError(f"{out_dir}: collection unfinished, parts {missing[:5]} of {n_parts} missing; run "
                         "collect_trajectories again with the same arguments to finish it")
    rows = []
    for k in range(n_parts):
        rows += _read_part(out_dir, done[str(k)]["file"])
    return rows


def collect_trajectories(params, prompts: Sequence[str], reward_fn: Callable, cfg: CollectConfig, *, model: Model,
                         tokenizer, key, out_dir: str | None = None, **metadata) -> list[dict]:
    """Sample cfg.samples solutions to every prompt with the KV-cache sampler, score them
    with reward_fn(prompts, completions, **metadata) (per-prompt metadata lists are
    repeated per sample, e.g. problems=...), optionally balance, and return the rows:
    {"problem", "sample", "prompt", "completion", "reward", "eos", "steps" (with a
    separator)}.

    Prompts go `prompts_per_batch` at a time; batch k samples with fold_in(key, k), so
    the data do not depend on how the work is split across restarts. With out_dir each
    batch becomes a Parquet part (written atomically) listed in manifest.json with the
    configuration, the prompts' and parameters' SHA-256 and the key: running again
    resumes after the last finished part, and a finished directory is reused without
    sampling. A directory made with other arguments is an error naming the field.

    Several processes: every process passes the same prompts and gets every row (each decodes its
    own rows, `sample`; reward_fn scores every row on each process); process 0 alone writes out_dir
    (a directory they share), and they meet once each part is written (a failed write stops all).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("collect_trajectories: no prompts")
    for name, values in metadata.items():
        if len(values) != len(prompts):
            raise ValueError(f"collect_trajectories: metadata {name!r} has {len(values)} entries for "
                             f"{len(prompts)} prompts")
    manifest, done = None, {}
    if out_dir is not None:
        _parquet()
        os.makedirs(out_dir, exist_ok=True)
        config = _manifest(params, prompts, cfg, key)
        path = os.path.join(out_dir, "manifest.json")
        from rljax.cli import read_before_rewrite

        old = read_before_rewrite(path)  # by every process before process 0 may rewrite it
        if old is not None:
            changed = [k for k in config if old["config"].get(k) != config[k]]
            if changed:
                raise ValueError(f"{out_dir}: holds trajectories collected with another {changed[0]!r} "
                                 f"({old['config'].get(changed[0])!r} there, {config[changed[0]]!r} now); use a "
                                 "new directory")
            done = old.get("parts", {})
        manifest = {"config": config, "parts": done}
        # several processes collect the same rows; one writes them, and all stop if it cannot
        on_main(f"collect_trajectories: writing {path}", _write_json, path, manifest)
    scfg = cfg.sampling.replace(n=cfg.samples)
    n_parts = -(-len(prompts) // cfg.prompts_per_batch)
    rows = []
    for k in range(n_parts):
        if str(k) in done:
            rows += _read_part(out_dir, done[str(k)]["file"])
            continue
        lo, hi = k * cfg.prompts_per_batch, min(len(prompts), (k + 1) * cfg.prompts_per_batch)
        chunk = list(prompts[lo:hi])
        tokens, mask = tokenizer.encode_batch(filled_prompts(chunk, model, cfg.samples), padding_side="left")
        roll = sample(params, tokens, mask, jax.random.fold_in(key, k), model=model, cfg=scfg)
        ids, eos = to_host((roll.completions, roll.stopped_at_eos))  # the copies' rows dropped below
        text = tokenizer.decode_batch(ids)[:len(chunk) * cfg.samples]
        meta = {name: [v for v in values[lo:hi] for _ in range(cfg.samples)] for name, values in metadata.items()}
        rewards = score(reward_fn, [p for p in chunk for _ in range(cfg.samples)], text, **meta)
        part = []
        for j, (completion, r, stop) in enumerate(zip(text, rewards, eos)):
            row = {"problem": lo + j // cfg.samples, "sample": j % cfg.samples, "prompt": chunk[j // cfg.samples],
                   "completion": completion, "reward": float(r), "eos": bool(stop)}
            if cfg.separator is not None:
                row["steps"] = split_keeping_separator(completion, cfg.separator)
            part.append(row)
        if cfg.balance is not None:
            part = balanced(part, cfg.balance)
        rows += part
        if out_dir is not None:
            name = f"part-{k:05d}.parquet"
            done[str(k)] = {"file": name, "rows": len(part)}
            on_main(f"collect_trajectories: writing {name} in {out_dir}", _write_collected, out_dir, name, part,
                    manifest)  # readable by every process from here on
    return rows


def _write_collected(out_dir: str, name: str, part: list[dict], manifest: dict) -> None:
    _write_part(part, os.path.join(out_dir, name))
    _write_json(os.path.join(out_dir, "manifest.json"), manifest)


# ----------------------------------------------------------------------------- phase


@dataclass(frozen=True)
class OREOPhaseConfig:
    """loss: OREOConfig; optimizer: the policy's (paper: lr 5e-6); value_optimizer: the
    value model's (None: the policy's); loop: steps, logging, checkpoints. These are the
    optimizers that update; the state must come from `create_oreo_state` with the same two
    (`oreo` refuses others)."""

    loss: OREOConfig = field(default_factory=OREOConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-6, schedule="constant"))
    value_optimizer: OptimizerConfig | None = None
    loop: LoopConfig = field(default_factory=LoopConfig)


def oreo(state: OREOState, data, cfg: OREOPhaseConfig, *, model: Model, mesh=None, run_dir: str | None = None,
         eval_fn: Callable | None = None) -> OREOState:
    """Offline RL with OREO: `run_loop` over `make_oreo_step` (one value and one policy
    update per batch). state: from `create_oreo_state` with the same optimizers
    (cfg.optimizer, cfg.value_optimizer), which update; a state made with others is an
    error naming the model and the fields that differ (`check_oreo_optimizers`); data
    yields OREOBatch (e.g. a BatchIterator over `collate_trajectories`); metrics,
    checkpoints (policy, value, reference, optimizer states) and resume as every phase. mesh: None =
    the model's (`rljax.phases.phase_mesh`)."""
    check_oreo_optimizers(state, cfg.optimizer, cfg.value_optimizer, "oreo")
    check_accumulation(cfg.optimizer, cfg.loop, "oreo")
    if cfg.value_optimizer is not None:
        check_accumulation(cfg.value_optimizer, cfg.loop, "oreo", "value_optimizer")
    mesh = phase_mesh(mesh, model)
    _need_mesh(mesh, "oreo")
    step = make_oreo_step(model, cfg.loss, cfg.optimizer, cfg.value_optimizer, mesh=mesh)

    def put(batch):  # the global batch: on several processes each keeps its own rows (as every phase)
        return shard_batch(local_rows(batch), mesh=mesh)

    return run_loop(state, step, data, cfg.loop, run_dir=run_dir, put_batch=put if mesh is not None else None,
                    eval_fn=eval_fn, name="oreo", config=cfg)


__all__ = ["CollectConfig", "OREOPhaseConfig", "OREOState", "balanced", "check_oreo_optimizers", "check_reward",
           "check_trajectories", "prompts_with_steps", "collate_trajectories", "collect_trajectories", "create_oreo_state",
           "load_trajectories", "make_oreo_step", "oreo", "split_keeping_separator",
           "trajectory_steps", "value_model_of", "value_params_from", "value_scorer"]
