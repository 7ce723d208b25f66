"""The shared on-policy RL iteration: sample -> score -> prepare -> update.

    cfg = RLConfig(algorithm="grpo")
    iteration = make_rl_iteration(model, cfg, reward_fn, decode)
    state = create_rl_state(model, sft_params, cfg, key)
    state, metrics = iteration(state, prompt_tokens, prompt_mask, problems=problems)

An algorithm (`rljax.algorithms`: an advantage estimator and a policy loss) declares what
it needs (`Needs`); the iteration reads the declarations — the reference's log-probs,
values from a value head or a separate critic, a greedy decode, a group filter with
refills, a running baseline, a frozen teacher's log-probs (on-policy distillation) — and
knows no method by name. Reward transforms (a running
normaliser, a moving-average baseline, a KL controller; `rljax.transforms`) run as one
chain whose state is one slot of the RLState. Python reward functions run on the host on
decoded text; sampling, reference log-probs and the update are jitted, and the update (all
epochs × minibatches, the critic's regression too) is one jitted program per iteration.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental.multihost_utils import process_allgather

from rljax.algorithms import Algorithm, check_group_size, check_staleness, get_algorithm, prepare
from rljax.cpu_dots import jit_full_sequence
from rljax.data.batch import Collected
from rljax.distributed import local_rows, process_objects, process_slice, raise_failed, to_host
from rljax.estimators import PrepareInput
from rljax.losses.actor_critic import approx_kl, token_values, value_loss
from rljax.losses.policy_gradient import kl_metrics
from rljax.models.logprobs import target_mask, token_logprobs
from rljax.models.transformer import check_params_fit, check_scorer
from rljax.rewards.rules import (COMPLETION_IDS, LOGGERS, TRAINER_STATE, TRL_KEYWORDS, RewardCallConfig, RewardLog,
                                 RewardSum, TrainingProgress, takes_keyword,
                                 completion_id_lists, score_with_failures, takes_completion_ids)
from rljax.sampling import SampleConfig, concat_rollouts, sample, truncate_prompts
from rljax.sharding import batch_sharding, param_shardings, replicated, shard_batch, shard_params
from rljax.state import (BATCH, OptimizerConfig, TrainState, apply_loss_gradients, compile_step, create_state,
                         make_optimizer, state_shardings)
from rljax.transforms import RewardTransform, Signals, chain


@struct.dataclass
class RLState:
    """step: RL iterations done (the prompt data position); policy: the trained TrainState;
    ref_params: the frozen reference policy; rng: key for sampling; critic: a separate value
    model's TrainState (None when there is none or the value head shares the policy's
    params); transforms: the reward transforms' state (a tuple, one entry per
    RLConfig.transforms); teacher_params: a frozen teacher whose log-probs of the sampled
    tokens an algorithm that needs a teacher reads (on-policy distillation; None otherwise).
    The loop threads the whole pytree, so checkpoints and resumption cover every field."""

    step: jax.Array
    policy: TrainState
    ref_params: Any
    rng: jax.Array
    critic: TrainState | None = None
    transforms: tuple = ()
    teacher_params: Any = None


@dataclass(frozen=True)
class RLConfig:
    """algorithm: a registry name or an `Algorithm` (`rljax.algorithms.compose(estimator,
    loss)`); advantage, loss: its estimator's and policy loss's configs (None = the
    algorithm's defaults). A config given replaces the default whole: to change one field of
    an entry's preset (e.g. a2c's GAEConfig with λ = 1, β = 0 and no whitening, not
    GAEConfig()'s defaults), derive it: `dataclasses.replace(get_algorithm("a2c").estimator.config,
    gamma=0.99)`.
    optimizer: the policy's; its warmup_steps and total_steps count RL iterations (the
    schedule advances by one iteration over the iteration's epochs × minibatches updates).
    epochs x minibatches: updates per iteration over the sampled rows. With
    optimizer.grad_accum = k each minibatch is a micro-batch and every k of them make one
    update (weighted by the loss's count, `rljax.state.accumulate_gradients`, so the update
    equals one on their union); epochs × minibatches must be a multiple of k, so no partial
    sum is carried into the next iteration's rollouts.
    track_kl: compute the reference's log-probs every iteration to report KL (k1,
    k3) to it even when the algorithm has no KL term (one extra forward pass).
    truncate_prompts: prompts longer than max_seq_len − max_new_tokens keep their
    last tokens instead of raising.
    max_refills: dynamic sampling (an estimator with a group filter, e.g. DAPO's): while
    fewer groups than prompts have unequal rewards, sample up to this many more
    prompt batches and fill the batch with their informative groups.
    target_kl: PPO's early stop: before each minibatch update the policy's approx
    KL to π_old on that minibatch is measured; above 1.5 × target_kl the iteration's
    remaining updates are skipped (masked inside the one jitted update).
    staleness, actors: asynchronous actors (A3C style, used by the `rl` phase): actor
    threads sample the batch of iteration i + staleness with a snapshot of the
    params while the learner trains on batch i, so a batch is `staleness`
    iterations old when it is learned from (0: synchronous, identical to the plain
    loop); `actors` threads share the sampling. A3C is algorithm "a2c" with staleness.
    staleness > 0 needs a loss that corrects stale rows (`PolicyLoss.corrects_stale`: a2c's
    truncated importance weight, the ratio to the sampler's log-probs of the clipped losses,
    CISPO and TRPO); reinforce, rloo, scst and mrt are refused.
    critic_optimizer, critic_epochs: a separate critic (RLState.critic) is fitted
    after the policy update by critic_epochs x minibatches regression steps on the
    returns (optimizer: critic_optimizer, default `optimizer`).
    transforms: reward transforms applied in order every iteration (`rljax.transforms`:
    `normalise_rewards()`, `moving_average_baseline(decay)`, `kl_control(controller)`); their
    state is RLState.transforms. A baseline placed before a transform that replaces the rewards
    (normalise_rewards) is refused: it would be on the raw scale. Metrics report the raw rewards.
    reward_call: how the reward function (and accuracy_fn) is called (`RewardCallConfig`:
    chunks, worker threads, a per-call time limit, and whether a failed call raises or scores
    a fixed value); with on_failure="value" the metrics count the samples scored so
    (`reward_failed`, `accuracy_failed`).
    mask_truncated: completions cut at max_new_tokens (no stop id) get no loss (DAPO's overlong
    filtering, TRL's mask_truncated_completions); their rewards still count in their group's
    statistics, and kept_fraction then counts only the rows trained on.
    ref_sync_every, ref_sync_alpha: every ref_sync_every-th iteration (0: never), after its update, the
    reference moves toward the policy: θ_ref ← α θ + (1 − α) θ_ref (TR-DPO's soft update, TRL's
    sync_ref_model with ref_model_mixup_alpha, default 0.6 as TRL's; α = 1 replaces it by the policy, ProRL's
    reference reset). Counted in RL iterations (TRL counts optimizer steps); RLState.ref_params holds it, so
    a checkpoint and a resumed run carry the moved reference."""

    algorithm: Any = "grpo"
    loss: Any = None
    advantage: Any = None
    sampling: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=32, n=4))
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, schedule="constant"))
    epochs: int = 1
    minibatches: int = 1
    track_kl: bool = True
    truncate_prompts: bool = False
    max_refills: int = 0
    target_kl: float | None = None
    staleness: int = 0
    actors: int = 1
    critic_optimizer: OptimizerConfig | None = None
    critic_epochs: int = 1
    transforms: tuple[RewardTransform, ...] = ()
    reward_call: RewardCallConfig = field(default_factory=RewardCallConfig)
    mask_truncated: bool = False
    ref_sync_every: int = 0
    ref_sync_alpha: float = 0.6

    def __post_init__(self):
        algo = get_algorithm(self.algorithm)
        needs = algo.needs(self.advantage, self.loss)
        chained = chain(*self.transforms)
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError(f"RLConfig: epochs and minibatches must be >= 1, got {self.epochs}, {self.minibatches}")
        if needs.groups and self.sampling.n > 1 and (self.sampling.is_greedy or self.sampling.top_k == 1
                                                     or self.sampling.min_p == 1.0):
            raise ValueError(f"RLConfig.sampling: {algo.name} compares the n={self.sampling.n} samples of each "
                             "prompt, and greedy decoding (temperature 0, greedy=True, top_k=1 or min_p=1) makes them "
                             "identical: every advantage would be 0")
        s = self.sampling
        if needs.teacher and (s.is_greedy or s.temperature != 1.0 or s.top_k or s.top_p < 1.0 or s.min_p > 0
                              or s.repetition_penalty != 1.0):
            # the reverse KL is estimated on samples of π weighed by the sampler's log π, both at temperature 1
            raise ValueError(f"RLConfig.sampling: {algo.name} estimates KL(π ‖ π_teacher) from samples of π itself, "
                             f"so it samples at temperature 1 without truncation or penalty; got "
                             f"temperature={s.temperature}, top_k={s.top_k}, top_p={s.top_p}, min_p={s.min_p}, "
                             f"repetition_penalty={s.repetition_penalty}, greedy={s.greedy}")
        if self.max_refills < 0:
            raise ValueError(f"RLConfig.max_refills: must be >= 0, got {self.max_refills}")
        if self.ref_sync_every < 0 or not 0 < self.ref_sync_alpha <= 1:
            raise ValueError(f"RLConfig: need ref_sync_every >= 0 (0: never) and 0 < ref_sync_alpha <= 1, got "
                             f"{self.ref_sync_every}, {self.ref_sync_alpha}")
        if self.ref_sync_every and not (needs.reference or self.track_kl):
            raise ValueError(f"RLConfig.ref_sync_every: {algo.name} has no KL term to the reference and track_kl is "
                             "off, so no reference is read; there is nothing to synchronise")
        if self.mask_truncated and s.eos_id < 0 and not s.stop_ids:
            raise ValueError("RLConfig.mask_truncated: the sampling has no stop id (eos_id=-1, no stop_ids), so every "
                             "completion runs to max_new_tokens and none would be trained on")
        if self.max_refills and not needs.group_filter:
            raise ValueError("RLConfig.max_refills: refilling replaces dropped groups, so it needs an estimator that "
                             "drops them (GroupAdvantageConfig(drop_equal_groups=True), e.g. algorithm='dapo')")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"RLConfig.target_kl: must be positive or None, got {self.target_kl}")
        if not isinstance(self.reward_call, RewardCallConfig):
            raise TypeError(f"RLConfig.reward_call: a RewardCallConfig, got {type(self.reward_call).__name__}")
        if self.critic_epochs < 1:
            raise ValueError(f"RLConfig.critic_epochs: must be >= 1, got {self.critic_epochs}")
        for name, opt, n in (("optimizer", self.optimizer, self.epochs * self.minibatches),
                             ("critic_optimizer", self.critic_optimizer or self.optimizer,
                              self.critic_epochs * self.minibatches)):
            if n % opt.grad_accum:
                raise ValueError(f"RLConfig.{name}.grad_accum={opt.grad_accum} does not divide the iteration's "
                                 f"{n} minibatch steps; an accumulation would straddle two iterations' rollouts")
        if self.target_kl is not None and self.optimizer.grad_accum > 1:
            # an early stop between micro-batches would leave a partial sum for the next iteration
            raise ValueError("RLConfig.target_kl: the early stop is checked per minibatch; use it with "
                             "optimizer.grad_accum = 1")
        if self.minibatches > 1 and algo.loss.needs(algo.configs(self.advantage, self.loss)[1]).groups:
            # the loss itself reads each prompt's n samples together (MRT's softmax Q over them); minibatches deal
            # rows, so a group would be split and a row alone in its minibatch get Q = 1 and no gradient
            raise ValueError(f"RLConfig.minibatches: {algo.name}'s loss ({algo.loss.name}) takes each prompt's "
                             f"{self.sampling.n} samples together, and minibatches={self.minibatches} would split "
                             "them; use minibatches=1 (epochs > 1 and grad_accum over epochs are fine)")
        if algo.loss.update is not None and (self.epochs, self.minibatches) != (1, 1):
            raise ValueError(f"RLConfig: {algo.name} has its own update rule, one step on the whole batch per "
                             f"iteration; got epochs={self.epochs}, minibatches={self.minibatches}")
        if self.staleness < 0 or self.actors < 1:
            raise ValueError(f"RLConfig: need staleness >= 0 and actors >= 1, got {self.staleness}, {self.actors}")
        check_staleness(algo, self.staleness)
        if "kl_coef" in chained.provides and not needs.kl_coef:
            raise ValueError(f"RLConfig.transforms: a KL controller sets the reward's KL coefficient, but "
                             f"{algo.name}'s estimator ({algo.estimator.name}) has no KL penalty in the reward; use "
                             "one that has (baseline, gae: e.g. reinforce, a2c, ppo)")
        if "baseline" in chained.provides and not needs.baseline:
            raise ValueError(f"RLConfig.transforms: a running baseline is given, but {algo.name}'s estimator "
                             f"({algo.estimator.name}) does not use one; use BaselineConfig('moving_average') "
                             "(RLConfig.advantage) or drop the transform")
        if needs.greedy and "rewards" in chained.provides:
            raise ValueError(f"RLConfig.transforms: {algo.name}'s baseline is the greedy decode's reward, as the "
                             "reward function returns it, while a transform here rescales the sampled rewards "
                             "(normalise_rewards): r and b would be on different scales (rewards of 2.0-2.1 "
                             "normalised to about ±1 against a baseline of 2.1). Drop the transform, or use a "
                             "baseline from the samples (rloo)")
        _check_transform_order(self.transforms)
        if needs.baseline and "baseline" not in chained.provides:
            raise ValueError(f"RLConfig.transforms: {algo.name}'s estimator needs a running baseline; add "
                             "rljax.transforms.moving_average_baseline(decay) to RLConfig.transforms")

    @property
    def algo(self) -> Algorithm:
        """The algorithm with this config's estimator and loss configs; a loss aggregated by a
        constant normaliser left None (Dr. GRPO's registry entry) gets C = sampling.max_new_tokens,
        the maximum completion length."""
        algo = get_algorithm(self.algorithm).with_config(advantage=self.advantage, loss=self.loss)
        loss = algo.loss.config
        if getattr(loss, "aggregation", None) == "constant" and getattr(loss, "constant", 0) is None:
            algo = algo.with_config(constant=float(self.sampling.max_new_tokens))
        return algo


def _check_transform_order(transforms: tuple[RewardTransform, ...]) -> None:
    """Refuse a transform providing "baseline" placed before one providing "rewards" (walked in
    order, a chain's provides in its order): the baseline would average the raw rewards while the
    estimator subtracts it from the replaced (e.g. normalised) ones."""
    def label(i):
        return f"transforms[{i}]" + (f" ({transforms[i].name})" if transforms[i].name else "")

    baseline = None
    for i, t in enumerate(transforms):
        for provided in t.provides:
            if provided == "baseline" and baseline is None:
                baseline = i
            elif provided == "rewards" and baseline is not None:
                raise ValueError(f"RLConfig.transforms: {label(baseline)} computes a running baseline from the raw "
                                 f"rewards, and {label(i)} then replaces the rewards (e.g. normalises them): the "
                                 "estimator would subtract a raw-scale baseline from rescaled rewards. Put the "
                                 "baseline after the transform that replaces the rewards")


def _per_iteration(opt: OptimizerConfig, updates: int) -> OptimizerConfig:
    """The optimizer whose schedule, given in RL iterations, advances over `updates` minibatch steps an
    iteration (updates / grad_accum optimizer updates: the schedule counts those)."""
    updates //= opt.grad_accum
    if updates == 1:
        return opt
    return dataclasses.replace(opt, warmup_steps=opt.warmup_steps * updates, total_steps=opt.total_steps * updates)


def create_rl_state(model, params, cfg: RLConfig, key, *, reference=None, critic_model=None,
                    critic_params=None, teacher_params=None, teacher_model=None) -> RLState:
    """The policy starts from a copy of `params` (`create_state` copies; updates donate their
    input, so the caller's arrays stay valid); the frozen reference is `reference` (default: `params`).
    With `model.mesh`, policy, optimizer state and reference are placed sharded.
    critic_model, critic_params: a separate critic (e.g. `with_value_head(model, params)` for
    one initialised from the policy, `critic_from_reward_model` from a reward model) with its
    own optimizer state (cfg.critic_optimizer, default cfg.optimizer). The reward transforms'
    state starts from cfg.transforms. teacher_params: a frozen teacher (on-policy distillation),
    kept as given (placed sharded by teacher_model's rules, default `model`'s, with a mesh); the
    iteration scores the samples with it through `make_rl_iteration(..., teacher_model=)`."""
    if not isinstance(cfg, RLConfig):
        raise TypeError(f"create_rl_state: takes the RLConfig (its optimizer, critic optimizer and transforms), got "
                        f"{type(cfg).__name__}")
    if critic_model is not None and (critic_params is None or "value" not in critic_model.config.heads):
        raise ValueError("create_rl_state: a separate critic needs critic_params and a critic_model with a "
                         "value head (see rljax.losses.actor_critic.with_value_head)")
    opt_cfg, critic_optimizer = cfg.optimizer, cfg.critic_optimizer or cfg.optimizer
    k_policy, k_rl, k_critic = jax.random.split(key, 3)
    mesh = model.mesh
    for name, m, p, o in (("policy", model, params, opt_cfg), ("critic", critic_model, critic_params,
                                                               critic_optimizer)):
        head = None if m is None or "value" not in m.config.heads else p["value_head"]
        # at fine-tuning learning rates (<= 1e-4) a zero head needs hundreds of Adam steps to reach E[reward]
        if head is not None and o.head_lr is None and o.lr <= 1e-4 and \
                getattr(head, "is_fully_addressable", True) and not np.any(np.asarray(jax.device_get(head))):
            warnings.warn(f"create_rl_state: the {name}'s value head is freshly initialised (zero) and trains at "
                          f"the backbone's learning rate {o.lr:g}; it will lag the rewards for many iterations. "
                          "Set OptimizerConfig.head_lr (e.g. 100x lr) to fit it faster.", stacklevel=2)
    policy = create_state(model, opt_cfg, k_policy, mesh=mesh, params=params)
    reference = params if reference is None else reference
    ref = reference if mesh is None else shard_params(reference, param_shardings(model, mesh))
    critic = None
    if critic_model is not None:
        critic = create_state(critic_model, critic_optimizer, k_critic, mesh=critic_model.mesh, params=critic_params)
    teacher = teacher_params
    if teacher is not None and mesh is not None:
        teacher = shard_params(teacher, param_shardings(teacher_model or model, mesh))
    step, rng, transforms = jnp.int32(0), k_rl, chain(*cfg.transforms).init()
    if mesh is not None:
        # replicated on the mesh, as create_state places its counters: a checkpoint restores every leaf onto
        # its target's sharding, and uncommitted single-device leaves came back committed to device 0, where
        # the resumed iteration could not mix them with the sharded policy. Made under jit: with several
        # processes the replicated sharding spans devices device_put cannot reach.
        step, rng, transforms = jax.jit(lambda r, t: (jnp.int32(0), r, t), out_shardings=replicated(mesh))(
            rng, transforms)
    return RLState(step=step, policy=policy, ref_params=ref, rng=rng, critic=critic, transforms=transforms,
                   teacher_params=teacher)


def _informative_groups(rewards: np.ndarray, n: int) -> np.ndarray:
    """[R] rewards, n per group (contiguous rows) -> [R / n] bool: the group's rewards are not all equal
    (`ops.advantages.group_range` > 0, on the host: the rewards are host arrays, and jnp's segment
    ops run eagerly would compile a dozen small programs)."""
    groups = np.asarray(rewards, np.float32).reshape(-1, n)
    return groups.max(axis=1) - groups.min(axis=1) > 0


class RLIteration(NamedTuple):
    """`iteration(state, tokens, mask, key=None, refill=None, **metadata) -> (state, metrics)`,
    made of its two halves: collect(params, tokens, mask, key, refill=None, **metadata)
    -> Collected (sampling, scoring) and learn(state, collected, key, lag=0) -> (state,
    metrics) (reference and value forwards, prepare, updates). Asynchronous actors call
    collect with a snapshot of the params and the learner calls learn."""

    collect: Callable
    learn: Callable

    def __call__(self, state: RLState, prompt_tokens, prompt_mask, key=None, refill=None, trainer_state=None,
                 **metadata):
        """key: defaults to fold_in(state.rng, state.step), so a resumed run samples the same. trainer_state:
        what reward functions taking it get (`TrainingProgress`; default: global_step = state.step, max_steps
        unknown; `rljax.phases.rl` passes its steps)."""
        key = jax.random.fold_in(state.rng, state.step) if key is None else key
        if trainer_state is None:
            trainer_state = TrainingProgress(int(jax.device_get(state.step)))
        collected = self.collect(state.policy.params, prompt_tokens, prompt_mask, key, refill=refill,
                                 trainer_state=trainer_state, **metadata)
        return self.learn(state, collected, key)


def _optimizer_step(tx, loss_fn) -> Callable:
    """step(state, batch) -> (state, metrics): one optimizer update on loss_fn (traceable)."""
    return lambda state, batch: apply_loss_gradients(state, tx, loss_fn, batch)


def _take(batch, rows):
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), batch)


def scan_updates(step: Callable, state, batch, key, *, epochs: int, minibatches: int, stop_fn: Callable | None = None,
                 constrain: Callable | None = None):
    """epochs × minibatches updates `step(state, minibatch) -> (state, metrics)` as one `lax.scan`
    (a single update, epochs = minibatches = 1, as one call of `step`).

    Each epoch draws a permutation of the R rows on device (key fold_in(key, epoch); one
    minibatch = the whole batch in order); minibatch j of an epoch is its rows
    [j·R/M, (j+1)·R/M). stop_fn(state, minibatch) -> bool (PPO's early stop): checked before
    every update but the first; once true, the remaining updates are masked (state and
    metrics kept). -> (state, metrics of the last update made, number of updates made).
    Traceable (runs inside the iteration's jitted update).
    """
    R = jax.tree.leaves(batch)[0].shape[0]
    if R % minibatches:
        raise ValueError(f"{R} sampled rows do not split into RLConfig.minibatches={minibatches}")

    def minibatch(rows):
        mb = batch if minibatches == 1 else _take(batch, rows)
        return mb if constrain is None else constrain(mb)

    if epochs * minibatches == 1:
        # one update (GRPO's default), never stopped, on the whole batch in order: no scan, and no
        # eval_shape of the step for the scan's carry, which traced the whole forward and backward
        # pass a second time (~0.6 s of the GRPO benchmark's first iteration on a 2-core EPYC)
        state, last = step(state, minibatch(None))
        return state, last, jnp.int32(1)
    size = R // minibatches
    if minibatches == 1:
        orders = jnp.broadcast_to(jnp.arange(R), (epochs, R))
    else:
        orders = jnp.stack([jax.random.permutation(jax.random.fold_in(key, e), R) for e in range(epochs)])
    orders = orders.reshape(epochs * minibatches, size)
    metrics0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(step, state, minibatch(orders[0]))[1])

    def body(carry, rows):
        state, last, stopped, made = carry
        mb = minibatch(rows)
        if stop_fn is not None:
            stopped = stopped | ((made > 0) & stop_fn(state, mb))
            state, last = jax.lax.cond(stopped, lambda s, l, b: (s, l), lambda s, l, b: step(s, b), state, last, mb)
        else:
            state, last = step(state, mb)
        return (state, last, stopped, made + (~stopped).astype(jnp.int32)), None

    (state, last, _, made), _ = jax.lax.scan(body, (state, metrics0, jnp.bool_(False), jnp.int32(0)), orders)
    return state, last, made


# The fields of a sample record (`make_rl_iteration(on_samples=)`) besides the monitors' and the reward terms'.
SAMPLE_FIELDS = ("prompt", "completion", "reward", "accuracy", "group", "completion_tokens", "stopped", "columns",
                 "extra")


def make_rl_iteration(model, cfg: RLConfig, reward_fn: Callable, decode: Callable,
                      accuracy_fn: Callable | None = None, critic_model=None,
                      decode_prompts: Callable | None = None, teacher_model=None,
                      monitors: dict[str, Callable] | None = None,
                      on_samples: Callable[[int, list[dict]], None] | None = None,
                      samples_every: int = 1) -> RLIteration:
    """Build `iteration(state, prompt_tokens, prompt_mask, key=None, refill=None, **metadata) -> (state, metrics)`
    (an `RLIteration`: its `collect` and `learn` halves are also usable apart).

    decode(ids [R, T]) -> list[str] turns token ids into the text the reward sees.
    accuracy_fn: optional, same protocol as reward_fn, 1 for a correct sample; its
    mean is reported as `accuracy`. monitors: {name: fn}, more functions of the reward_fn
    protocol measured on every sample and never trained on (e.g. the gold score behind a
    learned reward model, to see reward hacking); each one's mean is reported as
    `<name>_mean`. metadata: per-prompt lists (repeated for the n
    samples of each prompt). refill(k) -> (tokens, mask, metadata), k = 1, 2, ...:
    more prompts for dynamic sampling (cfg.max_refills). critic_model: the model of a
    separate critic (RLState.critic); without it, algorithms that need values use the
    policy's own value head. decode_prompts(ids [B, P]) -> list[str]: the prompts' text
    the reward sees (default `decode`); a chat-templated prompt holds stop tokens (Qwen's
    <|im_end|> closes every turn), which a decode that stops at eos would cut at, so pass
    one that does not, e.g. `functools.partial(tok.decode_batch, stop_at_eos=False)`.
    teacher_model: the model of the frozen teacher in RLState.teacher_params, for algorithms
    that need a teacher (default `model`: a teacher of the student's architecture); it may have
    another size but must share the tokenizer (the same vocab_size).
    on_samples(iteration, records): called after every samples_every-th update (on every process, with the
    same records; the records are built for those iterations alone) with the iteration's number (the step its metrics are logged under) and one dict per row trained
    on, in order: prompt and completion (their text: `decode_prompts`, `decode`), reward (the one
    trained on), each `RewardSum` term's reward ("reward_<name>", None where it returned None or its
    call failed), accuracy and each monitor's score when given, group (the row's prompt in the
    iteration), completion_tokens, stopped (ended at a stop id) and columns (the prompt's metadata), and
    extra ({column: value}) where a reward function logged values for the row through TRL's log_extra.
    `rljax.phases.rl(samples_every=)` writes them to <run_dir>/samples/.

    Several processes (`rljax.distributed`; model.mesh over all their devices, data x fsdp splitting
    the rows over the processes): every process calls the iteration with the same prompts, metadata
    and refill (the global batch: e.g. each process's prompt source built from the same prompts and seed).
    Each process samples its own block of the rows (`sample`), decodes and scores its own rows
    (reward_fn, accuracy_fn and monitors see only those) and the scores are gathered, so every process
    holds all R rewards; the reference, values and update run on the global arrays. The samples, the
    metrics and the parameters are then those of one process with the same mesh (up to float rounding).
    The rows (prompts x n) must split evenly over the processes.

    Metrics: reward mean/std (with a `RewardSum` reward_fn, also each term's, unweighted, over the
    samples it scored: reward_<name>_mean / reward_<name>_std), accuracy, KL to the reference of the sampled tokens
    (kl_k1, kl_k3; token mean), entropy (losses that compute it: not TRPO's update), clip
    fraction (clipped losses), completion length, truncated fraction, kept fraction, tokens/s of sampling and training,
    and seconds spent in sampling / scoring / reference log-probs / updates; with a teacher,
    the KL to it of the sampled tokens (teacher_kl_k1, teacher_kl_k3; token mean) and
    teacher_kl_per_sequence (Σ_t k1, the sequence-level reverse KL estimate); with
    cfg.reward_call.on_failure="value", the samples whose reward call failed and scored
    failure_value (reward_failed, accuracy_failed); and under its own name, the mean of every value a reward
    function logged through TRL's log_metric during the iteration (every process's). What one logs through
    log_extra goes to on_samples' records under "extra".
    """
    algo = cfg.algo
    loss_cfg = algo.loss.config
    transforms = chain(*cfg.transforms)
    transforms_structure = jax.tree.structure(transforms.init())
    checked_teacher: list[bool] = []  # set at the first iteration that scores with the teacher
    needs = algo.needs() | transforms.needs
    check_group_size(algo, cfg.sampling.n)
    mesh = model.mesh  # with a mesh, sampling, reference log-probs and updates all run sharded
    # Several processes: every process calls the iteration with the same (global) prompts; each samples
    # and scores its own rows (`process_slice`), the host-side work (decoding, refill decisions, metrics)
    # sees every row through `to_host`, and the arrays the jitted stages take are global ones.
    multi = jax.process_count() > 1
    if multi and mesh is None:
        raise ValueError(f"make_rl_iteration: {jax.process_count()} processes are running, so the model needs a "
                         "mesh over all their devices (Model(config, mesh=make_mesh(...)), data x fsdp splitting "
                         "the rows over the processes); without one every process would train its own copy")
    if needs.critic and critic_model is None:
        raise ValueError(f"{algo.name} fits a separate critic: pass critic_model= (and create the state with "
                         "critic_model, critic_params)")
    if critic_model is not None and not needs.values:
        raise ValueError(f"critic_model: {algo.name} uses no values (its estimator is {algo.estimator.name!r})")
    if needs.values and critic_model is None and "value" not in model.config.heads:
        raise ValueError(f"{algo.name} needs a value head: build the model and params with "
                         "rljax.losses.actor_critic.with_value_head(model, params), or pass a separate critic_model")
    if critic_model is None and (cfg.critic_optimizer is not None or cfg.critic_epochs != 1):
        # they configure a separate critic only (RLState.critic); a value head on the policy trains with the policy
        warnings.warn(f"RLConfig.critic_optimizer / critic_epochs are set (critic_epochs={cfg.critic_epochs}), but "
                      f"there is no separate critic (critic_model=None): {algo.name} does not use them"
                      + (" (its value head trains with the policy's optimizer and epochs)" if needs.values else ""),
                      stacklevel=2)
    if critic_model is not None and critic_model.mesh is not mesh:
        raise ValueError("critic_model: the critic must live on the policy's mesh (one jitted update trains both)")
    if teacher_model is not None and not needs.teacher:
        raise ValueError(f"teacher_model: {algo.name} uses no teacher (its estimator is {algo.estimator.name!r})")
    teacher_model = model if teacher_model is None else teacher_model
    if samples_every < 1:
        raise ValueError(f"make_rl_iteration: samples_every must be >= 1, got {samples_every}")
    monitors = dict(monitors or {})
    term_keys = {f"reward_{name}" for name in reward_fn.names} if isinstance(reward_fn, RewardSum) else set()
    for name in monitors:
        if name in ("reward", "accuracy") or not name.isidentifier():
            raise ValueError(f"monitors: {name!r} is not a usable name (an identifier other than 'reward' and "
                             "'accuracy', whose means the iteration reports already)")
        if name in SAMPLE_FIELDS:
            raise ValueError(f"monitors: {name!r} is a field of the sample records (on_samples: {SAMPLE_FIELDS}); "
                             "name the monitor otherwise")
        if name in term_keys:
            raise ValueError(f"monitors: {name!r} is the metric name of a term of the reward function "
                             f"({reward_fn.__name__}); name the monitor otherwise")
    if needs.teacher:  # distillation scores the student's tokens with the teacher
        check_scorer(teacher_model, model, "teacher_model (the teacher)")
    # the completions' token ids are gathered for the functions that take them (TRL's `completion_ids`) alone
    needs_ids = any(takes_completion_ids(f) for f in (reward_fn, accuracy_fn, *monitors.values()) if f is not None)

    updates = cfg.epochs * cfg.minibatches
    tx = make_optimizer(_per_iteration(cfg.optimizer, updates))
    policy_loss = functools.partial(algo.loss.loss, model=model, cfg=loss_cfg)
    if algo.loss.update is not None:
        policy_step = functools.partial(algo.loss.update, model=model, cfg=loss_cfg)
    else:
        policy_step = _optimizer_step(tx, policy_loss)
    critic_step = critic_tx = None
    if critic_model is not None:
        critic_tx = make_optimizer(_per_iteration(cfg.critic_optimizer or cfg.optimizer,
                                                  cfg.critic_epochs * cfg.minibatches))
        critic_step = _optimizer_step(critic_tx, functools.partial(value_loss, model=critic_model, cfg=loss_cfg))

    def early_stop(state, batch):
        lp = token_logprobs(state.params, batch.tokens, batch.attention_mask, model=model)
        kl = approx_kl(lp, batch.old_logprobs, target_mask(batch.loss_mask, batch.attention_mask))
        return kl > 1.5 * cfg.target_kl

    def constrain(batch):  # keep each minibatch split over the batch axes, as the rules table says
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim)), batch)

    def update(policy, critic, batch, key):
        """The iteration's whole update, one program: the policy's epochs × minibatches (or the
        algorithm's own step), then the critic's critic_epochs × minibatches regression steps."""
        shard = None if mesh is None else constrain
        policy, metrics, made = scan_updates(policy_step, policy, batch, key, epochs=cfg.epochs,
                                             minibatches=cfg.minibatches, constrain=shard,
                                             stop_fn=early_stop if cfg.target_kl is not None else None)
        if critic_step is not None:
            critic, critic_metrics, _ = scan_updates(critic_step, critic, batch, jax.random.fold_in(key, 1000),
                                                     epochs=cfg.critic_epochs, minibatches=cfg.minibatches,
                                                     constrain=shard)
            metrics = dict(metrics, **{f"critic_{k}": v for k, v in critic_metrics.items()})
        return policy, critic, dict(metrics, updates=made)

    remat = any(m is not None and m.config.rematerialised for m in (model, critic_model))
    if mesh is None:
        jitted_update = compile_step(update, donate_argnums=(0, 1), dtype=model.config.dtype, remat=remat)
    else:
        policy_sh = state_shardings(model, tx, mesh)
        critic_sh = None if critic_model is None else state_shardings(critic_model, critic_tx, mesh)
        jitted_update = compile_step(update, mesh=mesh, in_shardings=(policy_sh, critic_sh, BATCH, replicated(mesh)),
                                     out_shardings=(policy_sh, critic_sh, None), donate_argnums=(0, 1),
                                     dtype=model.config.dtype, remat=remat)
    ref_lp = jit_full_sequence(functools.partial(token_logprobs, model=model), dtype=model.config.dtype)
    values_fn = jit_full_sequence(functools.partial(token_values, model=critic_model or model),
                                  dtype=(critic_model or model).config.dtype)
    teacher_lp = jit_full_sequence(functools.partial(token_logprobs, model=teacher_model),
                                   dtype=teacher_model.config.dtype)
    greedy_cfg = cfg.sampling.replace(greedy=True, n=1)
    room = model.config.max_seq_len - cfg.sampling.max_new_tokens
    if room < 1:  # no room for a prompt: refused here, before a first iteration samples anything
        raise ValueError(f"RLConfig.sampling.max_new_tokens: {cfg.sampling.max_new_tokens} leaves no room for a "
                         f"prompt in the model's max_seq_len {model.config.max_seq_len}; ask for fewer new tokens "
                         "or build the model with a longer max_seq_len")
    n = cfg.sampling.n
    decode_prompts = decode if decode_prompts is None else decode_prompts

    def prepare_update(rollout, rewards, ref, values, teacher, greedy, transforms_state):
        """Everything between the forward passes and the update, traced into one program (compiled
        once per rollout shape; run op by op, its few dozen small operations compiled as many
        programs of their own, each kept for the process's life): the reward transforms, the
        estimator (`algorithms.prepare`), the kept rows' loss mask and the iteration's KL metrics.
        rewards, greedy [R] float32; ref, values, teacher [R, T-1] or None.
        -> (PolicyBatch, the transforms' new state, {metric: scalar})."""
        mask = target_mask(rollout.loss_mask, rollout.attention_mask)
        seq_kl = None if ref is None else jnp.mean(jnp.sum((rollout.logprobs - ref) * mask, axis=1))
        signals, transforms_state = transforms.update(Signals(rewards=rewards, seq_kl=seq_kl), transforms_state)
        inp = PrepareInput(rollout=rollout, rewards=signals.rewards, ref_logprobs=ref if needs.reference else None,
                           values=values, greedy_rewards=greedy, baseline=signals.baseline, kl_coef=signals.kl_coef,
                           teacher_logprobs=teacher)
        batch, keep = prepare(algo, inp)
        keep = jnp.asarray(keep)
        if cfg.mask_truncated:  # after the estimator: a truncated row's reward still counts in its group
            keep = jnp.logical_and(keep, rollout.stopped_at_eos)
        batch = batch.replace(loss_mask=batch.loss_mask * keep.astype(batch.loss_mask.dtype)[:, None])
        stats = {"kept_fraction": jnp.mean(keep.astype(jnp.float32))}
        if ref is not None:  # KL(π_old ‖ π_ref) over the sampled completion tokens
            stats.update(kl_metrics(rollout.logprobs, ref, mask), kl_per_sequence=seq_kl)
        if signals.kl_coef is not None:
            stats["kl_coef"] = signals.kl_coef
        if teacher is not None:  # KL(π_old ‖ π_teacher) over the completion tokens: what distillation lowers
            stats.update({f"teacher_{k}": v for k, v in kl_metrics(rollout.logprobs, teacher, mask).items()})
            stats["teacher_kl_per_sequence"] = jnp.mean(jnp.sum((rollout.logprobs - teacher) * mask, axis=1))
        return batch, transforms_state, stats

    jitted_prepare = jax.jit(prepare_update)

    def sync_reference(params, ref):
        """θ_ref ← α θ + (1 − α) θ_ref leaf by leaf, in float32, kept in the reference's dtypes (cfg.ref_sync_alpha);
        the policy's leaves the reference lacks (a value head) are left out."""
        a = cfg.ref_sync_alpha
        own = {k: params[k] for k in ref}
        return jax.tree.map(lambda p, r: (a * p.astype(jnp.float32) + (1 - a) * r.astype(jnp.float32)).astype(r.dtype),
                            own, ref)

    jitted_sync = jax.jit(sync_reference)  # the reference is not donated: a sync is rare, a fresh copy is safe
    own_metrics: set[str] = set()  # the names the iteration's metrics have had so far

    def check_logged(names, own):
        """A name a reward function logged through log_metric that one of the iteration's own metrics has: an
        error (before the update, once the iteration has reported that metric once)."""
        clash = sorted(set(names) & set(own))
        if clash:
            raise ValueError(f"a reward function logged {clash[0]!r} through log_metric, the name of one of the "
                             "iteration's own metrics; log it under another name")

    def fit(tokens, mask):
        """Truncate (or reject, naming the row) prompts longer than the cache allows."""
        if not cfg.truncate_prompts:
            return tokens, mask, 0
        return truncate_prompts(tokens, mask, room, pad_id=cfg.sampling.pad_id)

    def host_tokens(rollout) -> np.ndarray:
        """The rollout's tokens [R, T] on the host, every row on every process (gathered when they span
        processes: a collective, reached by every process at the same point)."""
        return to_host(rollout.tokens)

    def scored(fn, completions, prompt_text, metadata, k, failed, what="reward", parts=None, texts=None,
               lengths=None, progress=None, logged=None):
        """The rewards [R] float32 of the completions [R, N] (host token ids; k rows per prompt of
        prompt_text; lengths [R], the rollout's, given when a function takes the ids: `needs_ids`; progress:
        the `TrainingProgress` passed as trainer_state to the functions taking it); adds the
        samples whose call failed (scored cfg.reward_call.failure_value) to failed[what]. A `RewardSum` is scored term by term (each term may return None for a sample
        it does not apply to) and combined (`RewardSum.total`); parts, a dict, then receives each
        term's rewards [R] under "reward_<name>" (NaN where it returned None or its call failed).
        On several processes each scores its own rows (`process_slice(R)`) and the rewards, failed
        samples and whether a call raised are gathered, so every process returns all R rewards, the
        same everywhere (the refill decisions and metrics that read them agree), and a reward function
        raising on one process stops every process instead of leaving them waiting. texts: the completions'
        text, this process's rows (`own_text`; decoded here when None). logged: {"metrics": {name: [values]},
        "extra": {column: [R]}}, receiving what the functions log through TRL's log_metric / log_extra (every
        process's, gathered; a column None where nothing was logged for a row)."""
        for key, vals in metadata.items():  # checked per prompt, before the repeat for the k samples
            if key in TRL_KEYWORDS:
                raise ValueError(f"metadata {key!r}: the iteration passes the reward functions that take it TRL's "
                                 f"{key} under that name; rename the column")
            if len(vals) != len(prompt_text):
                raise ValueError(f"metadata {key!r}: {len(vals)} entries for {len(prompt_text)} prompts (one per "
                                 f"prompt; the iteration repeats each for the prompt's {k} samples)")
        meta = {key: [v for v in vals for _ in range(k)] for key, vals in metadata.items()}
        prompts = [p for p in prompt_text for _ in range(k)]
        rows = own_rows(len(completions))
        texts = decode(completions[rows]) if texts is None else texts
        own = {key: vals[rows] for key, vals in meta.items()}
        if lengths is not None:
            own[COMPLETION_IDS] = completion_id_lists(completions[rows], lengths[rows])
        if progress is not None:
            own[TRAINER_STATE] = progress

        def one(f, allow_none):  # -> (rewards [R], failed [R] bool): f on this process's rows, gathered
            n_own = len(texts)
            # the same answer on every process (a signature), so all or none reach the gather of what was logged
            log = RewardLog(n_own) if logged is not None and any(takes_keyword(f, k) for k in LOGGERS) else None
            loggers = {} if log is None else log.bind(range(n_own))
            if not multi:
                s = score_with_failures(f, prompts, texts, call_config=cfg.reward_call, allow_none=allow_none, **own,
                                        **loggers)
                if log is not None:
                    keep_log([(log.metrics, log.extra)], [n_own])
                return s.rewards, s.failed
            error = None
            try:
                s = score_with_failures(f, prompts[rows], texts, call_config=cfg.reward_call, allow_none=allow_none,
                                        **own, **loggers)
                local = np.concatenate([s.rewards, s.failed, [0]]).astype(np.float32)
            except Exception as e:  # noqa: BLE001 - raised below, once the other processes know
                error, local = e, np.zeros(2 * n_own + 1, np.float32)
                local[-1] = 1
            table = process_allgather(local)  # [processes, 2 x own rows + 1]: rewards, failed, raised
            raise_failed(table[:, -1], error, f"the {what} function ({getattr(f, '__name__', f)})")
            if log is not None:
                keep_log([tuple(x) for x in process_objects([log.metrics, log.extra])], [n_own] * jax.process_count())
            return table[:, :n_own].reshape(-1), table[:, n_own:2 * n_own].reshape(-1) > 0

        def keep_log(per_process, sizes):  # every process's (metrics, extra) into logged, in row order
            for metrics, _ in per_process:
                for name, values in metrics.items():
                    logged["metrics"].setdefault(name, []).extend(values)
            for column in sorted({c for _, extra in per_process for c in extra}):
                values = [v for (_, extra), n in zip(per_process, sizes) for v in extra.get(column, [None] * n)]
                before = logged["extra"].get(column)  # another function's: its values stay where this one's are None
                logged["extra"][column] = values if before is None else \
                    [b if v is None else v for b, v in zip(before, values)]

        if not isinstance(fn, RewardSum):
            rewards, bad = one(fn, False)
        else:
            got = [one(f, True) for _, f in fn.terms]
            rewards, bad = fn.total([r for r, _ in got], [b for _, b in got],
                                    failure_value=cfg.reward_call.failure_value,
                                    describe=lambda i: f"prompt {prompts[i]!r}, completion "
                                                       f"{decode(completions[i:i + 1])[0]!r}")
            if parts is not None:
                parts.update({f"reward_{name}": np.where(b, np.nan, r) for name, (r, b) in zip(fn.names, got)})
        failed[what] = failed.get(what, 0) + int(bad.sum())
        return rewards

    def to_rows(x):
        """A host array [R, ...] (the same on every process) as the global array the jitted stages take:
        on several processes each places its own rows; on one, as it is."""
        return x if x is None or not multi else shard_batch(local_rows(x), mesh)

    def own_rows(R: int):
        """The rows of R this process scores: its own block on several processes, all on one."""
        return process_slice(R) if multi else slice(None)

    def rollout_of(params, tokens, mask, metadata, key, times, failed, texts, progress, metrics):
        t0 = time.perf_counter()
        rollout = jax.block_until_ready(sample(params, tokens, mask, key, model=model, cfg=cfg.sampling))
        t1 = time.perf_counter()
        ids, P = host_tokens(rollout), rollout.prompt_length
        prompt_text = decode_prompts(ids[::n, :P])
        completions = ids[:, P:]
        own_text = decode(completions[own_rows(len(completions))])  # once, for every function scoring them
        lengths = to_host(rollout.lengths) if needs_ids else None
        if on_samples is not None:  # every row's text, on every process (the ids are on every process)
            texts["prompt"].append([p for p in prompt_text for _ in range(n)])
            texts["completion"].append(decode(completions) if multi else own_text)
            texts["columns"].append([{key: vals[i // n] for key, vals in metadata.items()}
                                     for i in range(len(completions))])
        terms: dict[str, np.ndarray] = {}
        logged = {"metrics": metrics, "extra": {}}  # the iteration's log_metric values; this rollout's columns
        rewards = scored(reward_fn, completions, prompt_text, metadata, n, failed, parts=terms, texts=own_text,
                         lengths=lengths, progress=progress, logged=logged)
        correct = scored(accuracy_fn, completions, prompt_text, metadata, n, failed, "accuracy", texts=own_text,
                         lengths=lengths, progress=progress, logged=logged) if accuracy_fn else None
        watched = {name: scored(fn, completions, prompt_text, metadata, n, failed, name, texts=own_text,
                                lengths=lengths, progress=progress, logged=logged)
                   for name, fn in monitors.items()} | terms
        if on_samples is not None:  # log_extra's columns, every row's on every process
            extra = logged["extra"]
            texts["extra"].append([{c: v[i] for c, v in extra.items() if v[i] is not None}
                                   for i in range(len(completions))])
        times["sample"] += t1 - t0
        times["score"] += time.perf_counter() - t1
        return rollout, rewards, correct, prompt_text, watched

    def collect(params, prompt_tokens, prompt_mask, key, refill=None, trainer_state=None, **metadata) -> Collected:
        """Sample (with refills when the estimator filters groups), score and, when the
        algorithm needs a greedy baseline, decode greedily with `params`. trainer_state: a `TrainingProgress`
        for the reward functions that take it (None: a function needing it raises; not a metadata column)."""
        if trainer_state is not None and not isinstance(trainer_state, TrainingProgress):
            raise TypeError(f"trainer_state: a rljax.rewards.TrainingProgress, got {type(trainer_state).__name__} "
                            "(the reward functions get it under that name, so a metadata column cannot have it)")
        k_sample, k_greedy, _ = jax.random.split(key, 3)
        times = dict(sample=0.0, score=0.0, ref=0.0, values=0.0, update=0.0)
        failed = dict(reward=0, accuracy=0)
        texts = dict(prompt=[], completion=[], columns=[], extra=[])  # per sampled rollout, with on_samples
        logged: dict[str, list] = {}  # what the functions log through log_metric: {name: [every value]}
        prompt_tokens, prompt_mask, cut = fit(prompt_tokens, prompt_mask)
        rollout, rewards, correct, prompt_text, watched = rollout_of(params, prompt_tokens, prompt_mask, metadata,
                                                                     k_sample, times, failed, texts, trainer_state,
                                                                     logged)
        sampled, all_watched = [(rollout, rewards, correct)], [watched]
        G = rollout.tokens.shape[0] // n
        informative, rounds = int(_informative_groups(rewards, n).sum()), 0
        if needs.group_filter and cfg.max_refills and refill is None:
            raise ValueError(f"RLConfig.max_refills={cfg.max_refills}, but the iteration got no refill= function "
                             "(refill(k) -> (tokens, mask, metadata)); rljax.phases.rl passes one")
        while needs.group_filter and refill is not None and informative < G and rounds < cfg.max_refills:
            rounds += 1
            more = refill(rounds)
            if not isinstance(more, tuple) or len(more) != 3:
                raise TypeError(f"refill({rounds}) must return (tokens, mask, metadata), got "
                                f"{type(more).__name__}{f' of {len(more)}' if isinstance(more, tuple) else ''}")
            tokens, mask, meta = more
            tokens, mask, more_cut = fit(tokens, mask)
            cut += more_cut
            r, rw, c, _, w = rollout_of(params, tokens, mask, meta, jax.random.fold_in(k_sample, rounds), times,
                                        failed, texts, trainer_state, logged)
            sampled.append((r, rw, c))
            all_watched.append(w)
            informative += int(_informative_groups(rw, n).sum())
        all_rewards = np.concatenate([s[1] for s in sampled])
        all_correct = np.concatenate([s[2] for s in sampled]) if accuracy_fn else None
        rows = np.arange(len(rewards))  # the sampled rows trained on, in order
        if rounds:  # the first G groups with unequal rewards, topped up with equal ones (then dropped)
            parts = [s[0] for s in sampled]
            if multi:  # joined and picked on the host: a process's rows afterwards are not the ones it sampled
                parts = [to_host(r) for r in parts]
            rollout = concat_rollouts(parts, pad_id=cfg.sampling.pad_id)
            good = _informative_groups(all_rewards, n)
            groups = np.concatenate([np.flatnonzero(good), np.flatnonzero(~good)])[:G]
            rows = (groups[:, None] * n + np.arange(n)).ravel()
            rollout = jax.tree.map(lambda x: x[rows], rollout)
            rollout = rollout.replace(group_ids=jnp.arange(G * n, dtype=jnp.int32) // n)
            if multi:  # back to one global rollout, each process placing its own rows
                rollout = to_rows(to_host(rollout))
            rewards = all_rewards[rows]

        greedy = None
        if needs.greedy:  # the greedy decode's reward is the baseline (SCST)
            t0 = time.perf_counter()
            g = sample(params, prompt_tokens, prompt_mask, k_greedy, model=model, cfg=greedy_cfg)
            times["sample"] += time.perf_counter() - t0
            greedy = np.repeat(scored(reward_fn, host_tokens(g)[:, g.prompt_length:], prompt_text, metadata, 1,
                                      failed, lengths=to_host(g.lengths) if needs_ids else None,
                                      progress=trainer_state, logged={"metrics": logged, "extra": {}}), n)
        monitored = {name: np.concatenate([w[name] for w in all_watched]) for name in all_watched[0]}
        text = {k: [x for part in v for x in part] for k, v in texts.items()} if on_samples is not None else None
        return Collected(rollout, rewards, all_rewards, all_correct, greedy, sampled, cut, rounds, times, failed,
                         monitored, text, rows, logged)

    def records_of(c: Collected, lengths, stopped) -> list[dict]:
        """on_samples' records: one per row trained on (c.rows of the sampled rows), lengths and stopped
        [R] of the rollout trained on."""
        records = []
        for j, i in enumerate(c.rows):
            record = {"prompt": c.texts["prompt"][i], "completion": c.texts["completion"][i],
                      "reward": float(c.rewards[j])}
            for name, values in c.monitored.items():  # the monitors' and the terms' ("reward_<name>") scores
                record[name] = None if np.isnan(values[i]) else float(values[i])
            if accuracy_fn:
                record["accuracy"] = float(c.all_correct[i])
            record.update(group=j // n, completion_tokens=int(lengths[j]), stopped=bool(stopped[j]),
                          columns=c.texts["columns"][i])
            if c.texts["extra"][i]:  # what the reward functions logged for the row through log_extra
                record["extra"] = c.texts["extra"][i]
            records.append(record)
        return records

    def learn(state: RLState, c: Collected, key, lag: int = 0):
        """Prepare and update on collected samples. lag: updates the learner has made since
        the params that sampled them (asynchronous actors); > 0 turns on the clipped
        importance weights of losses that have them (a2c's is_clip)."""
        _, _, k_perm = jax.random.split(key, 3)
        rollout, rewards, times, params = c.rollout, c.rewards, dict(c.times), state.policy.params
        if critic_model is not None and state.critic is None:
            raise ValueError("a critic_model was given but the RLState has no critic: create_rl_state(..., "
                             "critic_model=, critic_params=)")
        if needs.teacher and state.teacher_params is None:
            raise ValueError(f"{algo.name} distils from a teacher, but RLState.teacher_params is None: create the "
                             "state with create_rl_state(..., teacher_params=) (and pass teacher_model= to the "
                             "iteration when the teacher's architecture differs from the student's)")
        if needs.teacher and not checked_teacher:  # once: the teacher is frozen
            check_params_fit(state.teacher_params, teacher_model, "RLState.teacher_params",
                             "; pass the teacher's model as make_rl_iteration(..., teacher_model=)"
                             if teacher_model is model else " (teacher_model)")
            checked_teacher.append(True)
        if jax.tree.structure(state.transforms) != transforms_structure:
            raise ValueError("RLState.transforms does not match RLConfig.transforms: create the state with "
                             "create_rl_state(model, params, cfg, key) for this cfg")
        ref = None
        if needs.reference or cfg.track_kl:
            t0 = time.perf_counter()
            ref = jax.block_until_ready(ref_lp(state.ref_params, rollout.tokens, rollout.attention_mask))
            times["ref"] = time.perf_counter() - t0
        values = None
        if needs.values:
            t0 = time.perf_counter()
            critic_params = params if critic_model is None else state.critic.params
            values = jax.block_until_ready(values_fn(critic_params, rollout.tokens, rollout.attention_mask))
            times["values"] = time.perf_counter() - t0
        teacher = None
        if needs.teacher:
            t0 = time.perf_counter()
            teacher = jax.block_until_ready(teacher_lp(state.teacher_params, rollout.tokens, rollout.attention_mask))
            times["teacher"] = time.perf_counter() - t0
        check_logged(c.logged, own_metrics)  # the state is donated to the update below: refuse before it
        greedy = None if c.greedy is None else np.asarray(c.greedy, np.float32)
        batch, transform_state, stats = jitted_prepare(rollout, to_rows(np.asarray(rewards, np.float32)), ref,
                                                       values, teacher, to_rows(greedy), state.transforms)
        if lag:
            R = rollout.tokens.shape[0]
            batch = batch.replace(lag=to_rows(np.full((R,), lag, np.int32)) if multi else
                                  jnp.full((R,), lag, jnp.int32))

        if mesh is not None:  # prepare's outputs may sit replicated; the update takes them split over the batch
            batch = shard_batch(batch, mesh)
        t0 = time.perf_counter()
        policy, critic, metrics = jitted_update(state.policy, state.critic, batch, k_perm)
        metrics = jax.device_get(metrics)
        times["update"] = time.perf_counter() - t0
        # the host's view of every row (one gather where the rows span processes)
        lengths, attention, stopped, sampled_lengths = to_host(
            (rollout.lengths, rollout.attention_mask, rollout.stopped_at_eos, [s[0].lengths for s in c.sampled]))
        made = int(metrics.pop("updates"))
        out = {k: float(v) for k, v in metrics.items()}
        out.update({
            "reward_mean": float(np.mean(c.all_rewards)), "reward_std": float(np.std(c.all_rewards)),
            "completion_length": float(lengths.mean()),
            "tokens": float(attention.sum()),
            "truncated_fraction": float(np.mean(~stopped)),
            "sample_tokens_per_s": float(sum(int(x.sum()) for x in sampled_lengths) / max(times["sample"], 1e-9)),
            "train_tokens_per_s": float(made * attention.sum() / cfg.minibatches / max(times["update"], 1e-9)),
            **{f"time_{k}_s": v for k, v in times.items()},
        })
        if accuracy_fn:
            out["accuracy"] = float(np.mean(c.all_correct))
        for name, values in c.monitored.items():  # over every sampled row, like reward_mean
            if name not in monitors:  # a RewardSum's term: over the rows it scored (NaN: None or a failed call)
                if not np.isnan(values).all():
                    out[f"{name}_mean"], out[f"{name}_std"] = float(np.nanmean(values)), float(np.nanstd(values))
                continue
            out[f"{name}_mean"] = float(np.mean(values))
        if cfg.reward_call.on_failure == "value":  # samples scored failure_value, over every call this iteration
            out["reward_failed"] = float(c.failed.get("reward", 0))
            if accuracy_fn:
                out["accuracy_failed"] = float(c.failed.get("accuracy", 0))
        if cfg.truncate_prompts:
            out["truncated_prompts"] = float(c.cut)
        if needs.group_filter:
            out["refill_rounds"] = float(c.rounds)
        if lag:
            out["staleness"] = float(lag)
        if cfg.target_kl is not None:
            out["updates"] = float(made)
        out.update({k: float(v) for k, v in jax.device_get(stats).items()})
        iteration = int(jax.device_get(state.step)) + 1
        if on_samples is not None and iteration % samples_every == 0:
            on_samples(iteration, records_of(c, lengths, stopped))
        ref_params = state.ref_params
        if cfg.ref_sync_every:
            synced = iteration % cfg.ref_sync_every == 0
            if synced:
                ref_params = jitted_sync(policy.params, ref_params)
            out["ref_synced"] = float(synced)
        own_metrics.update(out)
        check_logged(c.logged, out)  # a metric the iteration reports for the first time
        out.update({name: float(np.mean(values)) for name, values in c.logged.items()})  # log_metric's: their means
        return state.replace(step=state.step + 1, policy=policy, critic=critic, transforms=transform_state,
                             ref_params=ref_params), out

    return RLIteration(collect, learn)
