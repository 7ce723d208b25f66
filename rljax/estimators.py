"""Advantage estimators: sampled rows and their rewards -> advantages (the `prepare` half of an algorithm).

An estimator is a config plus a pure function `estimate(inp: PrepareInput, cfg) -> Estimate`,
independent of the policy loss that consumes its output, so any estimator pairs with any
loss that accepts its output kind (verl's `core_algos` keeps the two apart the same way;
`rljax.algorithms.compose` checks the pairing). The RL iteration fills a typed
`PrepareInput` with what the algorithm declared it needs: a field it did not fill is None,
and an estimator that needs it raises naming the field.

    group          (GroupAdvantageConfig)  Â_i = (r_i − μ_g)/(σ_g + ε) or r_i − μ_g  [R]   GRPO, Dr. GRPO, DAPO
    baseline       (BaselineConfig)        A_i = r_i − b_i                           [R]   REINFORCE, RLOO, SCST
    gae            (GAEConfig)             GAE(γ, λ) on per-token rewards             [R, T-1] A2C, PPO, TRPO
    distill        (DistillConfig)         A_t = Σ_k γ^k λ (ℓ^T − ℓ^S)_{t+k}           [R, T-1] on-policy distillation

Rewards may carry a KL penalty to the reference (`kl_coef` of the baseline and GAE configs:
"KL in the reward"); a policy loss's own `kl_coef` is the KL as a loss term instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rljax.models.logprobs import target_mask
from rljax.ops.advantages import (discounted_returns, gae, group_advantages, group_range, leave_one_out_baseline,
                                  place_at_last, whiten)
from rljax.ops.kl import kl_k1

BASELINES = ("none", "batch_mean", "leave_one_out", "greedy", "moving_average")


@struct.dataclass
class PrepareInput:
    """What the RL iteration hands an estimator (R rows = prompts × n, T tokens a row).

    rollout: the sampled `Rollout` (tokens, masks, the sampler's log-probs, group_ids);
    rewards [R] float32, after the iteration's reward transforms (e.g. a running normaliser);
    ref_logprobs [R, T-1]: the reference policy's log-probs of the sampled tokens;
    values [R, T-1]: V_old of the sampled tokens (the shared value head or the critic);
    greedy_rewards [R]: the reward of a greedy decode of each row's prompt (SCST);
    teacher_logprobs [R, T-1]: a frozen teacher's log-probs of the sampled tokens (distillation);
    baseline: scalar running mean of past rewards (a moving-average transform);
    kl_coef: scalar β set by a KL controller, overriding the config's kl_coef.
    Fields the algorithm did not declare are None."""

    rollout: Any
    rewards: jax.Array
    ref_logprobs: jax.Array | None = None
    values: jax.Array | None = None
    greedy_rewards: jax.Array | None = None
    baseline: jax.Array | None = None
    kl_coef: jax.Array | None = None
    teacher_logprobs: jax.Array | None = None

    def require(self, field: str, who: str):
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"{who}: PrepareInput.{field} is missing; the algorithm's declared needs should have "
                             f"made the RL iteration fill it")
        return value

    @property
    def mask(self) -> jax.Array:
        """[R, T-1] 1 where tokens[t+1] is a completion token (aligned with log-probs)."""
        return target_mask(self.rollout.loss_mask, self.rollout.attention_mask)


@struct.dataclass
class Estimate:
    """advantages [R] (per sequence) or [R, T-1] (per token); rewards [R] as the estimator
    used them (KL-shaped when it shapes); keep [R] bool: False marks rows to drop (a group
    filter); returns [R, T-1]: value targets (GAE only, else None)."""

    advantages: jax.Array
    rewards: jax.Array
    keep: jax.Array
    returns: jax.Array | None = None


@dataclass(frozen=True)
class Needs:
    """What an estimator, a policy loss or a reward transform needs from the RL iteration.

    reference: the reference's log-probs of the sampled tokens; values: V_old of the sampled
    tokens (a value head on the policy, or a separate critic); critic: a separate critic
    model with its own update; greedy: the reward of a greedy decode per prompt; groups: n ≥ 2
    samples per prompt; group_filter: the estimator drops rows (keep = False) and the
    iteration may refill with more prompts; baseline: a running baseline from the reward
    transforms; kl_coef: the reward's KL coefficient is adjustable (a KL controller may set it);
    teacher: a frozen teacher's log-probs of the sampled tokens (`RLState.teacher_params`, on-policy
    distillation)."""

    reference: bool = False
    values: bool = False
    critic: bool = False
    greedy: bool = False
    groups: bool = False
    group_filter: bool = False
    baseline: bool = False
    kl_coef: bool = False
    teacher: bool = False

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(**{f: getattr(self, f) or getattr(other, f) for f in self.__dataclass_fields__})


def _check_kl(cfg) -> None:
    if cfg.kl_coef < 0:
        raise ValueError(f"{type(cfg).__name__}.kl_coef: must be >= 0, got {cfg.kl_coef}")


def _reward_kl(inp: PrepareInput, cfg):
    """(ref_logprobs, β) of the KL penalty in the reward: β is a controller's (inp.kl_coef) or the
    config's; ref_logprobs is None when there is no penalty (no controller and kl_coef = 0)."""
    if inp.kl_coef is None and cfg.kl_coef == 0:
        return None, cfg.kl_coef
    ref = inp.require("ref_logprobs", f"{type(cfg).__name__}.kl_coef={cfg.kl_coef} (or a KL controller)")
    return ref, cfg.kl_coef if inp.kl_coef is None else inp.kl_coef


# ----------------------------------------------------------------------------- group


@dataclass(frozen=True)
class GroupAdvantageConfig:
    """Â_i = (r_i − μ_g)/(σ_g + std_eps) over each prompt's n samples (GRPO), or r_i − μ_g
    with scale_by_std=False (Dr. GRPO); std_scope="batch" divides by the std of the whole batch's
    rewards instead of the group's ("Lite PPO", TRL's scale_rewards="batch":
    `get_algorithm("grpo").with_config(advantage=GroupAdvantageConfig(std_scope="batch"))`).
    drop_equal_groups: rows of a group whose rewards are all equal carry no signal and are dropped
    (DAPO's dynamic sampling; the iteration refills with RLConfig.max_refills more prompt batches)."""

    scale_by_std: bool = True
    std_eps: float = 1e-6
    drop_equal_groups: bool = False
    std_scope: str = "group"

    def __post_init__(self):
        if self.std_eps < 0:
            raise ValueError(f"GroupAdvantageConfig.std_eps: must be >= 0, got {self.std_eps}")
        if self.std_scope not in ("group", "batch"):
            raise ValueError(f"GroupAdvantageConfig.std_scope: 'group' or 'batch', got {self.std_scope!r}")


def group_estimate(inp: PrepareInput, cfg: GroupAdvantageConfig) -> Estimate:
    r = jnp.asarray(inp.rewards, jnp.float32)
    g = jnp.asarray(inp.rollout.group_ids)
    adv = group_advantages(r, g, scale_by_std=cfg.scale_by_std, eps=cfg.std_eps, std_scope=cfg.std_scope)
    keep = (group_range(r, g) > 0) if cfg.drop_equal_groups else jnp.ones(r.shape, bool)
    return Estimate(advantages=adv, rewards=r, keep=keep)


def group_needs(cfg: GroupAdvantageConfig) -> Needs:
    return Needs(groups=True, group_filter=cfg.drop_equal_groups)


# ----------------------------------------------------------------------------- baseline (REINFORCE family)


@dataclass(frozen=True)
class BaselineConfig:
    """A_i = r_i − b_i with b from `baseline`: none (b = 0), batch_mean, leave_one_out (RLOO:
    the mean of the other samples of the prompt), greedy (SCST: the reward of the prompt's
    greedy decode), moving_average (a running mean of past rewards, from a
    `moving_average_baseline` reward transform).

    kl_coef β > 0 shapes the reward r − β Σ_t (ℓ^old_t − ℓ^ref_t) (k1 of the sampled tokens, no
    gradient) before the baseline: its expected gradient is exactly that of E[r] − β KL(π‖π_ref),
    whose optimum is π* ∝ π_ref exp(r/β). batch_mean and leave_one_out average the shaped rewards.
    Two baselines do not carry the penalty, so their advantages are (r − βΣk1) − b, −βΣk1 on top
    of r − b: the greedy baseline (SCST) is the greedy decode's reward as the reward function gives
    it (its KL is not computed), and the moving_average one averages the rewards the reward
    transforms see, which run before this estimator shapes them (e.g. rewards 1 and Σk1 = 3 at
    β = 0.5 give advantages −1.5, where batch_mean gives 0). Both baselines are independent of the
    sample (except the moving average's first iteration, which is that batch's own mean, as
    batch_mean is), so the gradient stays unbiased, with the variance of a baseline that misses
    the mean of −βΣk1 (a moving average of stationary rewards centres the advantages at about
    −β E[Σk1] instead of 0)."""

    baseline: str = "leave_one_out"
    kl_coef: float = 0.0

    def __post_init__(self):
        if self.baseline not in BASELINES:
            raise ValueError(f"BaselineConfig.baseline: {self.baseline!r} not in {BASELINES}")
        _check_kl(self)


def kl_shaped_rewards(rewards, old_logprobs, ref_logprobs, mask, kl_coef):
    """r − β Σ_t m_t (ℓ^old_t − ℓ^ref_t): the sequence reward with a k1 KL penalty. [R] -> [R]."""
    return jnp.asarray(rewards, jnp.float32) - kl_coef * (kl_k1(old_logprobs, ref_logprobs) * mask).sum(axis=1)


def baseline_advantages(rewards, group_ids, baseline: str, *, greedy_rewards=None, running=None):
    """A = r − b per sequence ([R] -> [R]); b by `baseline` (see BaselineConfig).
    greedy_rewards [R] and the scalar running mean are needed by those baselines."""
    r = jnp.asarray(rewards, jnp.float32)
    if baseline == "none":
        return r
    if baseline == "batch_mean":
        return r - r.mean()
    if baseline == "leave_one_out":
        return r - leave_one_out_baseline(r, jnp.asarray(group_ids))
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("baseline='greedy' (SCST) needs greedy_rewards")
        return r - jnp.asarray(greedy_rewards, jnp.float32)
    if running is None:
        raise ValueError("baseline='moving_average' needs the running mean of past rewards")
    return r - running


def baseline_estimate(inp: PrepareInput, cfg: BaselineConfig) -> Estimate:
    r = jnp.asarray(inp.rewards, jnp.float32)
    ref, beta = _reward_kl(inp, cfg)
    if ref is not None:
        r = kl_shaped_rewards(r, inp.rollout.logprobs, ref, inp.mask, beta)
    greedy = inp.require("greedy_rewards", "baseline='greedy'") if cfg.baseline == "greedy" else None
    running = inp.require("baseline", "baseline='moving_average'") if cfg.baseline == "moving_average" else None
    adv = baseline_advantages(r, inp.rollout.group_ids, cfg.baseline, greedy_rewards=greedy, running=running)
    return Estimate(advantages=adv, rewards=r, keep=jnp.ones(r.shape, bool))


def baseline_needs(cfg: BaselineConfig) -> Needs:
    return Needs(reference=cfg.kl_coef > 0, greedy=cfg.baseline == "greedy", groups=cfg.baseline == "leave_one_out",
                 baseline=cfg.baseline == "moving_average", kl_coef=True)


# ----------------------------------------------------------------------------- GAE (actor-critic)


@dataclass(frozen=True)
class GAEConfig:
    """Per-token rewards (Ziegler et al. 2019) r_t = −β k1_t on every completion token plus the
    sequence reward on the last one; advantages by GAE(gamma, lam) against V_old; value
    targets R_t = A_t + V_t. whiten_rewards: sequence rewards scaled to unit std over the batch
    (no mean shift), then clipped to ±reward_clip (None = no clipping), before the KL penalty;
    whiten_advantages over the batch's completion tokens. kl_coef β (a KL controller may set
    it every iteration). The defaults are PPO's for RLHF; A2C's preset uses λ = 1, β = 0 and no
    whitening (Monte-Carlo returns minus V).

    bootstrap_truncated: V after a row's last completion token is 0 for a finished row (the
    rollout's stopped_at_eos) and, with this on, bootstrapped for a truncated one (stopped at the
    length limit). The state after the last token is not in V_old [R, T-1] (its last entry
    belongs to the state before the last token, and a truncated row's last token sits at the
    last position), so the bootstrap is V_old at the row's last completion position t_L, the
    value of the state before the last token: δ_{t_L} = r_{t_L} + γ V_{t_L} − V_{t_L}, which is
    r_{t_L} alone at γ = 1. Off (the default): V = 0 after every row's last token."""

    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    reward_clip: float | None = None
    bootstrap_truncated: bool = False

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"GAEConfig.gamma: must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"GAEConfig.lam: must be in [0, 1], got {self.lam}")
        _check_kl(self)
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise ValueError(f"GAEConfig.reward_clip: must be positive or None, got {self.reward_clip}")


def token_rewards(rewards, mask, old_logprobs, ref_logprobs, kl_coef):
    """r_t = −β (ℓ_old,t − ℓ_ref,t) on masked tokens + the sequence reward on each
    row's last masked token. rewards [R]; mask, logprobs [R, T-1] -> [R, T-1]."""
    r = place_at_last(jnp.asarray(rewards, jnp.float32), mask)
    if ref_logprobs is not None:
        r = r - kl_coef * kl_k1(old_logprobs, ref_logprobs) * mask.astype(jnp.float32)
    return r


def truncation_bootstrap(values, mask, stopped):
    """V after each row's last completion token, GAE's `bootstrap` [R]: 0 for a row that stopped
    (stopped [R] bool), else V at the row's last masked position (values, mask [R, T-1]; see
    GAEConfig.bootstrap_truncated for why that position). 0 for a row with an empty mask."""
    last = place_at_last(jnp.ones(values.shape[0], jnp.float32), mask) > 0  # one-hot of t_L per row
    v_last = jnp.where(last, jnp.asarray(values, jnp.float32), 0.0).sum(axis=1)
    return jnp.where(jnp.asarray(stopped, bool), 0.0, v_last)


def actor_critic_targets(rewards, values, old_logprobs, ref_logprobs, mask, cfg: GAEConfig, *, kl_coef=None,
                         stopped=None):
    """-> (advantages, returns) [R, T-1] from sequence rewards [R] and V_old [R, T-1];
    kl_coef (default cfg.kl_coef) is β of the per-token penalty (ref_logprobs None: no penalty).
    stopped [R] bool (the rollout's stopped_at_eos) is needed with cfg.bootstrap_truncated: rows
    that did not stop bootstrap with `truncation_bootstrap`."""
    r = jnp.asarray(rewards, jnp.float32)
    if cfg.whiten_rewards:
        r = whiten(r[None, :], jnp.ones((1, r.shape[0])), shift_mean=False)[0]
    if cfg.reward_clip is not None:
        r = jnp.clip(r, -cfg.reward_clip, cfg.reward_clip)
    beta = cfg.kl_coef if kl_coef is None else kl_coef
    per_token = token_rewards(r, mask, old_logprobs, ref_logprobs, beta)
    bootstrap = None
    if cfg.bootstrap_truncated:
        if stopped is None:
            raise ValueError("GAEConfig.bootstrap_truncated: actor_critic_targets needs stopped= (the rollout's "
                             "stopped_at_eos [R]) to tell truncated rows from finished ones")
        bootstrap = truncation_bootstrap(values, mask, stopped)
    adv, returns = gae(per_token, values, mask, gamma=cfg.gamma, lam=cfg.lam, bootstrap=bootstrap)
    if cfg.whiten_advantages:
        adv = whiten(adv, mask)
    return adv, returns


def gae_estimate(inp: PrepareInput, cfg: GAEConfig) -> Estimate:
    values = inp.require("values", "GAE")
    ref, beta = _reward_kl(inp, cfg)
    adv, returns = actor_critic_targets(inp.rewards, values, inp.rollout.logprobs, ref, inp.mask, cfg, kl_coef=beta,
                                        stopped=inp.rollout.stopped_at_eos if cfg.bootstrap_truncated else None)
    r = jnp.asarray(inp.rewards, jnp.float32)
    return Estimate(advantages=adv, rewards=r, keep=jnp.ones(r.shape, bool), returns=returns)


def gae_needs(cfg: GAEConfig) -> Needs:
    return Needs(reference=cfg.kl_coef > 0, values=True, kl_coef=True)



# ----------------------------------------------------------------------------- on-policy distillation


@dataclass(frozen=True)
class DistillConfig:
    """On-policy distillation with the reverse KL (Agarwal et al. 2024, GKD's on-policy setting;
    the per-token form of Thinking Machines' "on-policy distillation", 2025): the student π_S
    samples, a frozen teacher π_T scores the sampled tokens, and each completion token gets

        r_t = λ (log π_T(y_t | x, y_<t) − log π_S(y_t | x, y_<t)) = −λ k1_t,

    minus λ times the per-token estimate of KL(π_S ‖ π_T) (λ = teacher_coef; log π_S is the
    sampler's log-prob ℓ^old, so r carries no gradient). The advantage is the discounted sum to
    go A_t = Σ_{k≥t} γ^{k−t} r_k over the row's completion tokens. With a policy-gradient loss
    (−A_t ℓ_t at ρ = 1), γ = 0 (the default, Tinker's kl_discount_factor = 0: A_t = r_t) has the
    expected gradient of λ Σ_s d(s) KL(π_S(·|s) ‖ π_T(·|s)), the per-state KLs weighted by the
    distribution d of visited states held fixed; γ = 1 that of the sequence-level
    λ KL(π_S(y|x) ‖ π_T(y|x)) (a later token's KL is credited to the earlier choices), unbiased
    but of higher variance. Sample at temperature 1 without truncation: ℓ^old is π_S's log-prob
    at temperature 1. The task reward plays no part; the estimate's rewards [R] are Σ_t r_t."""

    teacher_coef: float = 1.0
    gamma: float = 0.0

    def __post_init__(self):
        if not self.teacher_coef > 0:
            raise ValueError(f"DistillConfig.teacher_coef: must be > 0, got {self.teacher_coef}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"DistillConfig.gamma: must be in [0, 1], got {self.gamma}")


def distill_advantages(student_logprobs, teacher_logprobs, mask, *, teacher_coef: float = 1.0, gamma: float = 0.0):
    """-> (advantages, rewards), both [R, T-1] and 0 off the mask: r_t = λ m_t (ℓ^T_t − ℓ^S_t),
    A_t = Σ_{k≥t} γ^{k−t} r_k (`discounted_returns`; γ = 0 gives A = r).
    student_logprobs, teacher_logprobs, mask [R, T-1] (aligned with `token_logprobs`)."""
    m = jnp.asarray(mask, jnp.float32)
    r = -teacher_coef * kl_k1(jnp.asarray(student_logprobs), jnp.asarray(teacher_logprobs)) * m
    adv = r if gamma == 0 else discounted_returns(r, m, gamma)
    return adv, r


def distill_estimate(inp: PrepareInput, cfg: DistillConfig) -> Estimate:
    teacher = inp.require("teacher_logprobs", "on-policy distillation (DistillConfig)")
    adv, r = distill_advantages(inp.rollout.logprobs, teacher, inp.mask, teacher_coef=cfg.teacher_coef,
                                gamma=cfg.gamma)
    seq = r.sum(axis=1)
    return Estimate(advantages=adv, rewards=seq, keep=jnp.ones(seq.shape, bool))


def distill_needs(cfg: DistillConfig) -> Needs:
    return Needs(teacher=True)
