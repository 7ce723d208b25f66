"""Policy-gradient losses: REINFORCE (baselines, RLOO, SCST) and MRT; GRPO is in grpo.py.

Every loss is `loss(params, batch, *, model, cfg) -> (scalar, metrics)` over a
`PolicyBatch` that the algorithm's `prepare` step filled in on the host side of
the RL iteration (advantages from rewards, group ids, the sampler's and the
reference's log-probabilities). Log-probabilities are aligned with
`token_logprobs`: entry t scores tokens[t+1]; the mask is loss_mask[:, 1:].
"""
from __future__ import annotations

from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp
from flax import struct

from rljax.models.logprobs import sequence_token_stats, target_mask
from rljax.ops.advantages import leave_one_out_baseline
from rljax.ops.aggregate import AGGREGATIONS, aggregate
from rljax.ops.kl import KL_ESTIMATORS, kl_k1, kl_k3

BASELINES = ("none", "batch_mean", "leave_one_out", "greedy", "moving_average")


@struct.dataclass
class PolicyBatch:
    """tokens, attention_mask, loss_mask [B, T]; old_logprobs, ref_logprobs [B, T-1]
    (sampler's policy and the frozen reference; ref may be None without a KL term);
    advantages [B] (one per sequence) or [B, T-1] (per token, actor-critic);
    rewards [B]; group_ids [B] (prompt index); actor-critic only: returns and
    old_values [B, T-1] (value targets and the sampler-time values), lag [B] (updates
    between the params that sampled a row and the learner's; None = on-policy)."""

    tokens: jax.Array
    attention_mask: jax.Array
    loss_mask: jax.Array
    old_logprobs: jax.Array
    advantages: jax.Array
    rewards: jax.Array
    group_ids: jax.Array
    ref_logprobs: jax.Array | None = None
    returns: jax.Array | None = None
    old_values: jax.Array | None = None
    lag: jax.Array | None = None


def _validate_common(cfg):
    if cfg.aggregation not in AGGREGATIONS:
        raise ValueError(f"{type(cfg).__name__}.aggregation: {cfg.aggregation!r} not in {AGGREGATIONS}")
    if cfg.aggregation == "constant" and not (cfg.constant and cfg.constant > 0):
        raise ValueError(f"{type(cfg).__name__}.constant: must be positive with aggregation='constant'")
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{type(cfg).__name__}.kl_estimator: {cfg.kl_estimator!r} not in {tuple(KL_ESTIMATORS)}")
    if cfg.kl_coef < 0:
        raise ValueError(f"{type(cfg).__name__}.kl_coef: must be >= 0, got {cfg.kl_coef}")


def _policy_terms(params, batch: PolicyBatch, model, with_entropy=True):
    stats = ("logprobs", "entropy") if with_entropy else ("logprobs",)
    out = sequence_token_stats(params, batch.tokens, batch.attention_mask, model=model, stats=stats)
    mask = target_mask(batch.loss_mask, batch.attention_mask)
    return out, mask


def _kl_terms(logprobs, batch, cfg, mask):
    """Per-token KL penalty (cfg's estimator) and k1/k3 metrics; zeros without a reference."""
    if batch.ref_logprobs is None:
        if cfg.kl_coef > 0:
            raise ValueError("kl_coef > 0 needs batch.ref_logprobs (the reference policy's log-probs)")
        z = jnp.zeros_like(logprobs)
        return z, {}
    penalty = KL_ESTIMATORS[cfg.kl_estimator](logprobs, batch.ref_logprobs)
    return penalty, kl_metrics(logprobs, batch.ref_logprobs, mask)


def kl_metrics(logprobs, ref_logprobs, mask) -> dict:
    """Token means of the k1 and k3 estimates of KL(π ‖ π_ref) over `mask` ([B, T-1] each)."""
    return {"kl_k1": aggregate(kl_k1(logprobs, ref_logprobs), mask, "token_mean"),
            "kl_k3": aggregate(kl_k3(logprobs, ref_logprobs), mask, "token_mean")}


# ----------------------------------------------------------------------------- REINFORCE family


@dataclass(frozen=True)
class ReinforceConfig:
    """REINFORCE: L = −agg((r − b) · ℓ_t) + β · agg(KL_t). The baseline b is chosen
    in `prepare` (none, batch mean, leave-one-out = RLOO, greedy decode = SCST,
    moving average); the default aggregation, seq_mean_token_sum, is the textbook
    −E[(r − b) Σ_t ℓ_t].

    kl_in_reward: instead of a KL loss term, shape the reward r − β Σ_t (ℓ^old_t − ℓ^ref_t)
    (k1 of the sampled tokens, no gradient). Its expected gradient is exactly that of
    E[r] − β KL(π‖π_ref), whose optimum is π* ∝ π_ref exp(r/β); a k3 loss term's
    expected gradient is that of the reverse KL(π_ref‖π) instead."""

    baseline: str = "leave_one_out"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    aggregation: str = "seq_mean_token_sum"
    constant: float | None = None

    def __post_init__(self):
        _validate_common(self)
        if self.baseline not in BASELINES:
            raise ValueError(f"ReinforceConfig.baseline: {self.baseline!r} not in {BASELINES}")


def kl_shaped_rewards(rewards, old_logprobs, ref_logprobs, mask, kl_coef):
    """r − β Σ_t m_t (ℓ^old_t − ℓ^ref_t): the sequence reward with a k1 KL penalty. [B] -> [B]."""
    return jnp.asarray(rewards, jnp.float32) - kl_coef * (kl_k1(old_logprobs, ref_logprobs) * mask).sum(axis=1)


def reinforce_advantages(rewards, group_ids, cfg: ReinforceConfig, *, greedy_rewards=None, ema=None):
    """A = r − b per sequence ([B] -> [B]); b by cfg.baseline. `greedy_rewards` [B]
    (SCST: each row's prompt's greedy-decode reward) and `ema` (a scalar running mean
    of past rewards) are needed by those baselines."""
    r = jnp.asarray(rewards, jnp.float32)
    if cfg.baseline == "none":
        return r
    if cfg.baseline == "batch_mean":
        return r - r.mean()
    if cfg.baseline == "leave_one_out":
        return r - leave_one_out_baseline(r, jnp.asarray(group_ids))
    if cfg.baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("baseline='greedy' (SCST) needs greedy_rewards")
        return r - jnp.asarray(greedy_rewards, jnp.float32)
    if ema is None:
        raise ValueError("baseline='moving_average' needs the running mean `ema`")
    return r - ema


def reinforce_loss(params, batch: PolicyBatch, *, model, cfg: ReinforceConfig):
    chex.assert_rank(batch.advantages, 1)
    out, mask = _policy_terms(params, batch, model)
    lp = out["logprobs"]
    pg = -jax.lax.stop_gradient(batch.advantages)[:, None] * lp
    kl, kl_metrics = _kl_terms(lp, batch, cfg, mask)
    beta = 0.0 if cfg.kl_in_reward else cfg.kl_coef  # with kl_in_reward the penalty is in the advantages
    loss = aggregate(pg + beta * kl, mask, cfg.aggregation, constant=cfg.constant)
    return loss, {"pg_loss": aggregate(pg, mask, cfg.aggregation, constant=cfg.constant),
                  "entropy": aggregate(out["entropy"], mask, "token_mean"), **kl_metrics}


# ----------------------------------------------------------------------------- MRT


@dataclass(frozen=True)
class MRTConfig:
    """Minimum risk training: over each prompt's n samples, Q(y) = p(y)^α / Σ p(y')^α
    with log p(y) = Σ_t m_t ℓ_t, and L = mean over prompts of Σ_y Q(y) (1 − r(y)).
    Gradient flows through Q. α → 0: uniform Q (constant loss, no gradient)."""

    alpha: float = 0.5
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token_mean"  # only for the KL term
    constant: float | None = None

    def __post_init__(self):
        _validate_common(self)
        if self.alpha < 0:
            raise ValueError(f"MRTConfig.alpha: must be >= 0, got {self.alpha}")


def mrt_distribution(seq_logprobs, group_ids, alpha):
    """Q_i = exp(α s_i) / Σ_{j in g(i)} exp(α s_j), a softmax within each group. [B] -> [B]."""
    B = seq_logprobs.shape[0]
    z = alpha * seq_logprobs
    zmax = jax.ops.segment_max(z, group_ids, num_segments=B)[group_ids]
    e = jnp.exp(z - jax.lax.stop_gradient(zmax))
    return e / jax.ops.segment_sum(e, group_ids, num_segments=B)[group_ids]


def mrt_loss(params, batch: PolicyBatch, *, model, cfg: MRTConfig):
    out, mask = _policy_terms(params, batch, model)
    lp = out["logprobs"]
    q = mrt_distribution((lp * mask).sum(axis=1), batch.group_ids, cfg.alpha)
    cost = 1.0 - batch.rewards.astype(jnp.float32)
    B = q.shape[0]
    n_groups = jnp.maximum((jax.ops.segment_sum(jnp.ones(B), batch.group_ids, num_segments=B) > 0).sum(), 1)
    risk = (q * cost).sum() / n_groups
    kl, kl_metrics = _kl_terms(lp, batch, cfg, mask)
    loss = risk + cfg.kl_coef * aggregate(kl, mask, cfg.aggregation, constant=cfg.constant)
    return loss, {"risk": risk, "entropy": aggregate(out["entropy"], mask, "token_mean"), **kl_metrics}
