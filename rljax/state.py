"""Training state, optimizer construction and the jitted train step.

    state = create_state(model, OptimizerConfig(lr=1e-3), jax.random.key(0), mesh=mesh)
    step = make_train_step(functools.partial(sft_loss, model=model, cfg=SFTConfig()), state, mesh=mesh)
    state, metrics = step(state, batch)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from rljax.cpu_dots import full_sequence_compiler_options, jit_full_sequence
from rljax.models.transformer import init_compiler_options, traced_once
from rljax.ops.aggregate import LOSS_WEIGHT
from rljax.sharding import LOGICAL_RULES, batch_sharding, param_shardings, replicated

SCHEDULES = ("constant", "cosine", "linear")
# Parameters of the scalar heads (OptimizerConfig.head_lr applies to these).
SCALAR_HEAD_PARAMS = ("value_head", "value_bias", "reward_head", "reward_bias")


@struct.dataclass
class TrainState:
    """step: batches consumed (also skipped ones, so it is the data position);
    params: plain nested dict; opt_state: optax state; rng: PRNG key threaded
    through steps; skipped_steps: how many steps were dropped as non-finite."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then a constant / cosine / linear schedule,
    global-norm clipping and optional gradient accumulation over grad_accum micro-batches
    (`accumulate_gradients`: weighted by each micro-batch's loss count, so the update is the
    one the whole accumulated batch would give; clipping applies once, to that gradient).

    grad_accum = k: k steps (micro-batches) per optimizer update. Micro-batch m's gradient is
    weighted by the count N_m its loss reports as metrics[LOSS_WEIGHT], and the update uses
    Σ_m N_m g_m / Σ_m N_m, the gradient of the loss on the k micro-batches together. Who reports
    what: sft_loss and the RL token losses (reinforce, clip/grpo, cispo, a2c, ppo, the critic's
    value_loss) report `aggregate_count` of their aggregation (tokens for token_mean, sequences
    with a counted token for seq_mean_token_mean, rows for seq_mean_token_sum and constant):
    exact. gspo_loss reports its live rows (exact unless its KL term is aggregated another way).
    Preference, reward-model, MRT and OREO losses report nothing and weigh micro-batches
    equally, as optax.MultiSteps did: right for their fixed-size micro-batches of pairs or rows
    (KTO's reference point does not split over micro-batches anyway, and MRT's per-group softmax is
    kept whole: RLConfig refuses minibatches > 1 for it, so its micro-batches are whole epochs;
    TRPO's update uses no optimizer).

    Weight decay applies to matrices only (`decayed`: not norm scales, biases or the scalar heads,
    whatever their rank: a stacked layer's norm scale is [L, D]).
    head_lr: peak learning rate of the scalar heads (value, reward), on the same
    schedule; None = lr. A zero-initialised value head on a fine-tuned backbone
    needs a far larger step than the backbone: at the policy's 1e-5 it would take
    thousands of updates to learn V ~ E[reward] (the heads' Adam update is scaled by
    head_lr / lr).
    """

    lr: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    head_lr: float | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule: {self.schedule!r} not in {SCHEDULES}")
        for name in ("lr", "end_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm", "head_lr"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # NaN passes every comparison below
                raise ValueError(f"OptimizerConfig.{name}: must be a finite number, got {value}")
        if self.lr <= 0:
            raise ValueError(f"OptimizerConfig.lr: must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.total_steps < 1 or self.warmup_steps > self.total_steps:
            raise ValueError(f"OptimizerConfig: need 0 <= warmup_steps <= total_steps, got "
                             f"{self.warmup_steps} and {self.total_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"OptimizerConfig.grad_accum: must be >= 1, got {self.grad_accum}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"OptimizerConfig.clip_norm: must be positive or None, got {self.clip_norm}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ValueError(f"OptimizerConfig.head_lr: must be positive or None, got {self.head_lr}")
        # Adam divides by 1 - b^t (b = 1: by 0, NaN parameters) and by sqrt(v) + eps (eps < 0: a step
        # against the gradient where v is small); negative decay or end_lr_ratio ascend instead of descend
        for name, lo, hi in (("b1", 0.0, 1.0), ("b2", 0.0, 1.0)):
            if not lo <= getattr(self, name) < hi:
                raise ValueError(f"OptimizerConfig.{name}: must be in [0, 1), got {getattr(self, name)}")
        for name in ("eps", "weight_decay", "end_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptimizerConfig.{name}: must be >= 0, got {getattr(self, name)}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """lr(t): linear warmup 0 -> lr over warmup_steps, then constant, cosine or
    linear decay to end_lr_ratio * lr at total_steps (counted in optimizer updates)."""
    end = cfg.lr * cfg.end_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
    else:
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    if cfg.warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def decayed(path, leaf) -> bool:
    """Whether weight decay applies to the parameter at `path` (a key path in the params dict): a matrix,
    i.e. rank >= 2 apart from the stacked layers' leading axis ("layers": [L, ...]), that is not a norm
    scale, a bias or a scalar head (the reward head is [D, A] with several attributes, not decayed)."""
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if keys[0] in SCALAR_HEAD_PARAMS or any("norm" in k or k.endswith("bias") for k in keys):
        return False
    return leaf.ndim - (keys[0] == "layers") >= 2


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(decayed, params)

    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    if cfg.head_lr is not None and cfg.head_lr != cfg.lr:
        def head_mask(params):
            return {k: jax.tree.map(lambda _, k=k: k in SCALAR_HEAD_PARAMS, v) for k, v in params.items()}

        parts.append(optax.masked(optax.scale(cfg.head_lr / cfg.lr), head_mask))
    opt = optax.chain(*parts)
    if cfg.grad_accum > 1:  # outermost, so clipping and Adam see the accumulated gradient once
        opt = accumulate_gradients(opt, cfg.grad_accum)
    return opt


class AccumulationState(NamedTuple):
    """micro_step: micro-batches taken since the last update, 0..k-1; grad_sum: Σ_m w_m g_m
    (parameter-shaped, so it is sharded like the parameters); weight_sum: Σ_m w_m;
    inner: the wrapped optimizer's state."""

    micro_step: jax.Array
    grad_sum: Any
    weight_sum: jax.Array
    inner: Any


def accumulate_gradients(inner: optax.GradientTransformation, every_k: int) -> optax.GradientTransformationExtraArgs:
    """Gradient accumulation weighted by each micro-batch's loss count.

    update(g_m, state, params, weight=w_m) adds w_m g_m and w_m to running sums; at every
    k-th call it hands the inner optimizer ĝ = Σ_m w_m g_m / Σ_m w_m, once, and resets the
    sums; the other calls return zero updates and leave the inner state as it was.

    With w_m the count N_m a loss is a mean over (`aggregate_count`: tokens for token_mean,
    rows for sequence means) and g_m = ∇ S_m / N_m, ĝ = ∇ Σ_m S_m / Σ_m N_m: exactly the
    gradient of the same loss on the k micro-batches concatenated. optax.MultiSteps takes the
    plain mean (1/k) Σ_m g_m instead, which weights a token of a short micro-batch more than
    one of a long micro-batch (3 vs 17 tokens: 17/3 times more). weight defaults to 1, which
    is MultiSteps' equal weighting (exact for losses averaged over equal-sized micro-batches).
    The count is a count, not a gradient scale, so it carries no gradient.
    """
    if every_k < 1:
        raise ValueError(f"accumulate_gradients: every_k must be >= 1, got {every_k}")
    inner = optax.with_extra_args_support(inner)

    def init(params):
        # the sums live in float32 whatever the parameters' dtype: Σ w g adds k gradients
        # scaled by counts in the thousands, where a bfloat16 sum would round each addition
        return AccumulationState(micro_step=jnp.zeros([], jnp.int32),
                                 grad_sum=optax.tree.zeros_like(params, dtype=jnp.float32),
                                 weight_sum=jnp.zeros([], jnp.float32), inner=inner.init(params))

    def update(grads, state: AccumulationState, params=None, *, weight=1.0, **extra_args):
        w = jax.lax.stop_gradient(jnp.asarray(weight, jnp.float32))
        grad_sum = jax.tree.map(lambda s, g: s + w * g.astype(jnp.float32), state.grad_sum, grads)
        weight_sum = state.weight_sum + w

        def emit(_):
            # Σ w = 0 (no micro-batch counted anything) means Σ w g = 0 too: a zero gradient, not 0/0
            scale = jnp.where(weight_sum > 0, 1.0 / jnp.where(weight_sum > 0, weight_sum, 1.0), 0.0)
            mean = jax.tree.map(lambda s, g: (s * scale).astype(g.dtype), grad_sum, grads)
            updates, inner_state = inner.update(mean, state.inner, params, **extra_args)
            return updates, AccumulationState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, grad_sum),
                                              jnp.zeros([], jnp.float32), inner_state)

        def hold(_):
            # zeros shaped like emit's updates: the inner optimizer may return another dtype
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(emit, None)[0])
            return (zeros,
                    AccumulationState(state.micro_step + 1, grad_sum, weight_sum, state.inner))

        # lax.cond, not a select over both: the inner update (Adam's moments, every parameter)
        # runs only on the k-th micro-step
        return jax.lax.cond(state.micro_step >= every_k - 1, emit, hold, None)

    return optax.GradientTransformationExtraArgs(init, update)


def state_shardings(model, optimizer: optax.GradientTransformation, mesh: Mesh, rules=LOGICAL_RULES) -> TrainState:
    """NamedShardings for every leaf of a TrainState: Adam moments follow their
    parameters; counters and keys are replicated."""
    p_sh = param_shardings(model, mesh, rules)
    opt_shapes = jax.eval_shape(optimizer.init, model.param_shapes())
    rep = replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, p_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep, skipped_steps=rep)


def owned_copy(tree):
    """A copy of every array leaf of `tree` on the same devices with the same shardings, in
    fresh buffers, so donating the copy (a jitted step with donate_argnums) leaves the
    original valid.

    The runtime copies the buffers (`jax.device_put(x, may_alias=False)`, which keeps the
    sharding and whether the array is committed); no program is compiled. `jnp.copy` would
    compile one small XLA program per leaf shape and dtype, which jax keeps for the rest of
    the process: about 1.4 MiB resident apiece on CPU, 11 MiB for the 8 parameter shapes of
    `benchmarks.offline`'s model. A numpy leaf becomes a device array, as `jnp.copy` made it.
    Tracers, Python scalars and arrays with shards on other processes' devices (which
    `device_put` cannot copy in place) still go through `jnp.copy`."""
    return jax.tree.map(_copy_leaf, tree)


def _copy_leaf(x):
    if isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
                                     and x.is_fully_addressable):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # device_put of a typed key drops its sharding (a key replicated over a mesh came back on one
            # device, and the RL iteration's fold_in(rng, step) then refused a step on the mesh): copy its data
            data = jax.device_put(jax.random.key_data(x), may_alias=False)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, may_alias=False)
    return jnp.copy(x)


def create_state(model, opt_cfg: OptimizerConfig, key: jax.Array, *, mesh: Mesh | None = None,
                 rules=LOGICAL_RULES, params=None) -> TrainState:
    """A fresh TrainState. With a mesh (default: the model's own, `Model.mesh`, as `create_rl_state` and
    the phases take it), parameters and optimizer state are created directly with their shardings (init
    runs under jit with out_shardings, so no device ever holds a full unsharded copy). `params` (e.g.
    loaded weights) is used instead of a random init when given.

    The state owns its arrays: given `params` are copied (with a mesh,
    `device_put(..., may_alias=False)`, since a no-op placement returns the same
    buffers), so a train step that donates the state never deletes the caller's
    `params`, which stay usable, e.g. as the frozen reference of `preference`.
    """
    optimizer = make_optimizer(opt_cfg)
    init_key, rng = jax.random.split(key)
    # a state left unsharded for a model on a mesh trained on its sharded batches (the pipelines' reward models
    # and SFT stages), and on several processes each process would have held a whole unplaced copy
    mesh = getattr(model, "mesh", None) if mesh is None else mesh
    if mesh is None:
        params = model.init(init_key) if params is None else owned_copy(params)
        # The moments and counters in one program, freed with its jit when this returns: optax's init
        # run eagerly compiles a zeros program per parameter shape (and jnp.int32(0) one more), each
        # kept for the process's life (docs/performance.md, row "small compiled programs")
        opt_state, step, skipped = jax.jit(lambda p: (optimizer.init(p), jnp.int32(0), jnp.int32(0)))(params)
        return TrainState(step=step, params=params, opt_state=opt_state, rng=rng, skipped_steps=skipped)
    sh = state_shardings(model, optimizer, mesh, rules)
    if params is None:
        params = jax.jit(model.init, out_shardings=sh.params,
                         compiler_options=init_compiler_options(mesh.devices.flat[0].platform))(init_key)
    else:
        params = jax.device_put(params, sh.params, may_alias=False)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
    # Counters and key are made under jit too: with several processes the
    # replicated sharding spans devices of other processes, where device_put
    # of a process-local array is not allowed.
    step, rng, skipped = jax.jit(lambda r: (jnp.int32(0), r, jnp.int32(0)),
                                 out_shardings=(sh.step, sh.rng, sh.skipped_steps))(rng)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng, skipped_steps=skipped)


def apply_loss_gradients(state: TrainState, optimizer: optax.GradientTransformation, loss_fn: Callable, batch,
                         *, has_aux_out: bool = False):
    """One optimizer step on `loss_fn(params, batch) -> (loss, metrics)` (traceable; the
    body of `make_train_step`, also used by steps that update several models at once).

    A non-finite loss or gradient norm leaves params and optimizer state unchanged;
    `step` still advances and `skipped_steps` counts it. Returns (new state, metrics with
    loss, grad_norm and skipped). With has_aux_out, loss_fn returns (loss, (metrics, out))
    and `out` (e.g. per-token values another update needs) is returned third.

    metrics[LOSS_WEIGHT], when the loss reports it (the count N its value is a mean over,
    `rljax.ops.aggregate_count`), is removed from the metrics and weights this micro-batch's
    gradient under gradient accumulation (`accumulate_gradients`); without it every
    micro-batch weighs the same.
    """
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    metrics, out = aux if has_aux_out else (aux, None)
    metrics = dict(metrics)
    weight = metrics.pop(LOSS_WEIGHT, None)  # the loss's count, for exact gradient accumulation
    new_state, metrics = apply_gradients(state, optimizer, loss, grads, metrics, weight=weight)
    return (new_state, metrics, out) if has_aux_out else (new_state, metrics)


def update_if_by_select(finite, update: Callable, params, opt_state):
    """`update(params, opt_state)` where `finite`, else (params, opt_state) unchanged, as an
    element-wise select of every leaf: the form for accelerators, where it fuses into the update's
    own loops and needs no predicate on the host (XLA:GPU's conditional reads its predicate on the
    host, which would wait for the backward pass before launching the update; kept as it was, not
    measured against the conditional there)."""
    new = update(params, opt_state)
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, (params, opt_state))


def update_if_by_cond(finite, update: Callable, params, opt_state):
    """The same as `update_if_by_select`, as a conditional: the form for CPUs, where the select's
    need for old and new state at once made XLA copy the optimizer moments the update reads twice
    (the offline DPO step's temporary buffer 296 -> 280 MiB, its compile 3.2 -> 2.8 s, the step
    time and every parameter the same)."""
    return jax.lax.cond(finite, update, lambda p, o: (p, o), params, opt_state)


def apply_gradients(state: TrainState, optimizer: optax.GradientTransformation, loss, grads, metrics: dict,
                    *, weight=None):
    """The optimizer half of `apply_loss_gradients`, for gradients computed another way (e.g.
    pulled back through a forward pass shared with another update): (new state, metrics
    with loss, grad_norm and skipped); non-finite loss or gradients leave the state as it was
    (an accumulating optimizer's sums too, so a skipped micro-batch adds nothing).
    weight: this micro-batch's weight under gradient accumulation (None: 1)."""
    rng, _ = jax.random.split(state.rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    extra = {}
    if weight is not None:
        finite = finite & jnp.isfinite(weight)
        extra["weight"] = weight

    @traced_once  # both forms of the guard below trace it: the second replays the first's jaxpr
    def update_with(params, opt_state, grads, extra):
        # extra-args support: plain optimizers (optax.sgd, a chain without accumulation) ignore `weight`
        updates, new_opt_state = optax.with_extra_args_support(optimizer).update(grads, opt_state, params, **extra)
        new = optax.apply_updates(params, updates), new_opt_state
        # the state keeps its dtypes where an optimizer promotes (bf16 moments times injected float32
        # hyperparameters, `optax.inject_hyperparams`): the next step compiles no new program, and
        # both forms of the guard (the conditional's branches must agree) give the same state
        return jax.tree.map(lambda n, o: n if n.dtype == o.dtype else n.astype(o.dtype), new, (params, opt_state))

    def update(params, opt_state):
        return update_with(params, opt_state, grads, extra)

    params, opt_state = jax.lax.platform_dependent(
        state.params, state.opt_state, cpu=functools.partial(update_if_by_cond, finite, update),
        default=functools.partial(update_if_by_select, finite, update))
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        rng=rng,
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    return new_state, dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))


BATCH = "batch"  # a compile_step in_shardings entry: shardings from the rules table (split over data, fsdp)


def compile_step(fn: Callable, *, mesh: Mesh | None = None, in_shardings: tuple = (), out_shardings=None,
                 donate_argnums: tuple[int, ...] = (0,), rules=LOGICAL_RULES, dtype="float32",
                 remat: bool = False) -> Callable:
    """The one step builder: `jax.jit(fn)` donating the state it owns (`donate_argnums`).

    With a mesh, `in_shardings` has one entry per argument: a pytree of shardings (e.g.
    `state_shardings(...)`), None (unspecified) or BATCH (each leaf split over the batch
    axes by the rules table, compiled once per batch structure, since optional fields
    change the tree). Every phase's step (SFT, reward model, preference, RL update, OREO)
    is built here. On CPUs where Eigen's matrix products beat XLA's default for whole sequences
    computed in `dtype` (the model's compute dtype), the step is compiled with them, YNNPACK
    keeping the reductions (`rljax.cpu_dots`, `train=True`). `remat`: the step of a model that
    recomputes its activations (`TransformerConfig.remat` other than "none"), compiled on CPU with
    XLA's loop emitters, whose compile holds ~200 MiB less (`rljax.cpu_dots.LOOP_EMITTERS`). Every
    step is compiled on CPU with LLVM at optimisation level 1: its compile up to ~20% shorter, its
    speed the same (`rljax.cpu_dots.FAST_CODEGEN`).
    """
    if mesh is None:
        return jit_full_sequence(fn, donate_argnums=donate_argnums, dtype=dtype, train=True, remat=remat)
    options = full_sequence_compiler_options(mesh.devices.flat[0].platform, dtype=dtype, train=True, remat=remat)
    compiled = {}

    def call(*args):
        key = tuple(jax.tree.structure(a) if s is BATCH else None for a, s in zip(args, in_shardings))
        if key not in compiled:
            shardings = tuple(jax.tree.map(lambda x: batch_sharding(mesh, x.ndim, rules), a) if s is BATCH else s
                              for a, s in zip(args, in_shardings))
            compiled[key] = jax.jit(fn, in_shardings=shardings, out_shardings=out_shardings,
                                    donate_argnums=donate_argnums, compiler_options=options)
        return compiled[key](*args)

    return call


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation | OptimizerConfig, *,
                    model=None, mesh: Mesh | None = None, rules=LOGICAL_RULES, donate: bool = True,
                    prepare: Callable | None = None):
    """Jitted `step(state, batch) -> (state, metrics)`.

    loss_fn(params, batch) -> (scalar, metrics dict) (bind model/cfg with
    functools.partial). A non-finite loss or gradient norm leaves params and
    optimizer state unchanged for that step; `step` still advances (it is the
    data position) and `skipped_steps` counts it; metrics["skipped"] is 1.
    With a mesh (and `model`), in/out shardings come from the rules table and
    the batch is split over (data, fsdp). The old state is donated.

    With `prepare(frozen, batch) -> batch` the step is `step(state, batch, frozen)`: prepare
    fills the batch from arrays the step does not train (a frozen reference's params, shaped as
    the model's: its log-probs for the loss), under stop_gradient, inside the same compiled
    program as the loss. One program instead of a forward pass compiled apart: XLA reuses the
    frozen pass's activations' room for the step's own, so one temporary buffer serves both
    (on CPU the pass's buffer would otherwise be mapped afresh beside the step's every call, or,
    with kept buffers, stay in the heap beside it). `frozen` is not donated, so it must not share
    buffers with the state, which is (jax refuses `f(donate(a), a)`: pass `owned_copy(params)`);
    with a mesh it is sharded as the parameters.
    """
    if isinstance(optimizer, OptimizerConfig):
        optimizer = make_optimizer(optimizer)

    if prepare is None:
        def step(state: TrainState, batch):
            return apply_loss_gradients(state, optimizer, loss_fn, batch)
    else:
        def step(state: TrainState, batch, frozen):
            return apply_loss_gradients(state, optimizer, loss_fn, prepare(jax.lax.stop_gradient(frozen), batch))

    donate_argnums = (0,) if donate else ()
    dtype, remat = (model.config.dtype, model.config.rematerialised) if model else ("float32", False)
    if mesh is None:
        return compile_step(step, donate_argnums=donate_argnums, dtype=dtype, remat=remat)
    if model is None:
        raise ValueError("make_train_step: pass model= with mesh= so parameter shardings can be derived")
    sh = state_shardings(model, optimizer, mesh, rules)
    in_shardings = (sh, BATCH) if prepare is None else (sh, BATCH, sh.params)
    return compile_step(step, mesh=mesh, in_shardings=in_shardings, out_shardings=(sh, None), dtype=dtype,
                        remat=remat, donate_argnums=donate_argnums, rules=rules)
