"""Actor-critic losses: A2C and PPO (RLHF style), with a value head on the policy backbone.

Advantages and value targets R_t = A_t + V_t come from the GAE estimator
(`rljax.estimators.GAEConfig`: per-token rewards with the KL penalty, GAE(γ, λ)). All per-token
arrays are aligned with `token_logprobs`: entry t belongs to the state
tokens[:t+1] and the action tokens[t+1]; V_t is the value head at position t.

    A2C:  L = −agg(w A ℓ) + c_V · ½ agg((V − R)²) − c_H agg(H),
          w = 1 on-policy; w = min(c̄, sg(π_θ / π_behaviour)) for rows sampled by params
          `lag` > 0 updates old (A3C-style actors; IMPALA's truncated importance weight)
    PPO:  L = agg(−min(ρA, clip(ρ, 1 ± ε) A)) + c_V · ½ agg(max((V − R)², (V_old + clip(V − V_old, ±ε_V) − R)²))
              − c_H agg(H)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from rljax.data.batch import PolicyBatch
from rljax.models import add_head
from rljax.models.logprobs import head_token_stats, target_mask
from rljax.ops.aggregate import AGGREGATIONS, LOSS_WEIGHT, aggregate, aggregate_count
from rljax.ops.surrogates import clipped_surrogate


def check_actor_critic_config(cfg):
    """The fields the actor-critic loss configs share (A2C, PPO, TRPO): non-negative
    coefficients, a value clip > 0 or None, a per-token aggregation."""
    name = type(cfg).__name__
    for f in ("value_coef", "entropy_coef"):
        if not getattr(cfg, f, 0.0) >= 0:  # NaN fails too
            raise ValueError(f"{name}.{f}: must be >= 0, got {getattr(cfg, f)}")
    if cfg.value_clip is not None and not 0 < cfg.value_clip < math.inf:
        raise ValueError(f"{name}.value_clip: must be positive and finite, or None, got {cfg.value_clip}")
    if cfg.aggregation not in AGGREGATIONS or cfg.aggregation == "constant":
        raise ValueError(f"{name}.aggregation: {cfg.aggregation!r} not in "
                         f"{tuple(a for a in AGGREGATIONS if a != 'constant')}")


@dataclass(frozen=True)
class A2CConfig:
    """value_coef c_V, entropy_coef c_H; value_clip ε_V (None: plain regression); is_clip c̄:
    the truncation of the importance weight of stale rows (batch.lag > 0). The advantages
    (GAE with λ = 1: Monte-Carlo returns minus V) come from `rljax.estimators.GAEConfig`."""

    value_coef: float = 0.5
    entropy_coef: float = 0.0
    value_clip: float | None = None
    aggregation: str = "token_mean"
    is_clip: float = 1.0

    def __post_init__(self):
        check_actor_critic_config(self)
        if self.is_clip <= 0:
            raise ValueError(f"A2CConfig.is_clip: must be positive, got {self.is_clip}")


@dataclass(frozen=True)
class PPOConfig:
    """PPO's loss (defaults of the RLHF recipe): clip ε, value clip ε_V (None = no value
    clipping), value_coef, entropy_coef. The per-token KL penalty, GAE(γ = 1, λ = 0.95), reward
    and advantage whitening are the estimator's (`rljax.estimators.GAEConfig`). Epochs over
    each batch are the RL loop's: RLConfig(algorithm="ppo", epochs=4) for the paper's 4
    (RLConfig.epochs defaults to 1)."""

    eps: float = 0.2
    value_clip: float | None = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    aggregation: str = "token_mean"

    def __post_init__(self):
        check_actor_critic_config(self)
        if not 0 < self.eps < 1:
            raise ValueError(f"PPOConfig.eps: must be in (0, 1), got {self.eps}")


def policy_value_terms(params, batch: PolicyBatch, model):
    """One forward: log-probs, entropy and values, each [B, T-1], and the target mask.
    values is None when the model has no value head (the critic is a separate model)."""
    hidden, _ = model.forward(params, batch.tokens, batch.attention_mask)
    out = head_token_stats(params, hidden[:, :-1], batch.tokens[:, 1:], model=model, stats=("logprobs", "entropy"))
    live = batch.attention_mask[:, 1:].astype(jnp.float32)
    values = _values(params, hidden, batch.attention_mask, model) if "value" in model.config.heads else None
    mask = target_mask(batch.loss_mask, batch.attention_mask)
    return out["logprobs"] * live, out["entropy"] * live, values, mask


def _values(params, hidden, attention_mask, model):
    """Value head on hidden [B, T, D] -> V_t [B, T-1] (token_logprobs-aligned), 0 where tokens[t+1] is padding."""
    return model.values(params, hidden)[:, :-1] * attention_mask[:, 1:].astype(jnp.float32)


def token_values(params, tokens, attention_mask, *, model):
    """V_t of the value head for the state tokens[:t+1], aligned with token_logprobs:
    [B, T] -> [B, T-1] float32, zero where tokens[t+1] is padding."""
    hidden, _ = model.forward(params, tokens, attention_mask)
    return _values(params, hidden, attention_mask, model)


def with_value_head(model, params):
    """(model with a "value" head, params with a zero-initialised value head added):
    the critic shares the policy's backbone and starts at V = 0. No-op if present."""
    return add_head(model, params, "value")


def critic_from_reward_model(model, params):
    """(model with a value head, params) whose value head starts as the reward model's
    head: V_t = the reward head read at every position (the RLHF initialisation)."""
    if "reward" not in model.config.heads:
        raise ValueError("critic_from_reward_model: the model has no reward head (config.heads "
                         f"{model.config.heads})")
    outputs = getattr(model.config, "reward_outputs", 1)
    if outputs != 1:
        raise ValueError(f"critic_from_reward_model: the reward head has {outputs} outputs (reward_outputs), but a "
                         "value head has one; start the critic from a single-output reward model")
    critic_model, critic = with_value_head(model, params)
    return critic_model, {**critic, "value_head": jnp.array(params["reward_head"]),
                          "value_bias": jnp.array(params["reward_bias"])}


def value_loss(params, batch: PolicyBatch, *, model, cfg):
    """A separate critic's regression loss ½ agg((V − R)²), clipped around
    V_old by cfg.value_clip when it is set (PPO)."""
    values = token_values(params, batch.tokens, batch.attention_mask, model=model)
    mask = target_mask(batch.loss_mask, batch.attention_mask)
    err = aggregate(_value_error(values, batch, cfg.value_clip), mask, cfg.aggregation)
    return err, {"value_loss": err, "value_mean": aggregate(values, mask, "token_mean"),
                 LOSS_WEIGHT: aggregate_count(mask, cfg.aggregation)}


def _critic_term(values, batch, cfg, mask, value_clip):
    """c_V · value loss with a shared value head; 0 when the critic is a separate model."""
    if values is None:
        return jnp.float32(0.0), {}
    err = aggregate(_value_error(values, batch, value_clip), mask, cfg.aggregation)
    return cfg.value_coef * err, {"value_loss": err, "value_mean": aggregate(values, mask, "token_mean")}


def _value_error(values, batch: PolicyBatch, value_clip):
    if batch.returns is None or (value_clip is not None and batch.old_values is None):
        missing = "returns" if batch.returns is None else "old_values"
        raise ValueError(f"value loss: PolicyBatch.{missing} is None; it comes from a value estimator (GAEConfig: "
                         "`rljax.estimators.actor_critic_targets`, or prepare() with an algorithm whose estimator "
                         "gives returns, e.g. a2c or ppo)")
    err = (values - batch.returns) ** 2
    if value_clip is None:
        return 0.5 * err
    clipped = batch.old_values + jnp.clip(values - batch.old_values, -value_clip, value_clip)
    return 0.5 * jnp.maximum(err, (clipped - batch.returns) ** 2)


def approx_kl(logprobs, old_logprobs, mask):
    """k3 estimate of KL(π_old ‖ π_θ) on tokens sampled from π_old, token mean over
    mask (PPO's early-stop statistic). All [B, T-1] -> scalar. Off-mask log-ratios are selected
    out (set to 0), not multiplied by 0 in `aggregate`: an overflowing exp there would give NaN."""
    log_ratio = jnp.where(mask > 0, logprobs - old_logprobs, 0.0)
    return aggregate(jnp.exp(log_ratio) - 1.0 - log_ratio, mask, "token_mean")


def a2c_loss(params, batch: PolicyBatch, *, model, cfg: A2CConfig):
    lp, ent, values, mask = policy_value_terms(params, batch, model)
    adv = jax.lax.stop_gradient(batch.advantages)
    metrics = {}
    if batch.lag is not None:  # stale rows: truncated importance weight; on-policy rows keep exactly 1
        rho = jnp.exp(jax.lax.stop_gradient(lp) - batch.old_logprobs)
        w = jnp.where((batch.lag > 0)[:, None], jnp.minimum(cfg.is_clip, rho), 1.0)
        adv = adv * w
        metrics["importance_weight"] = aggregate(w, mask, "token_mean")
    actor = aggregate(-adv * lp, mask, cfg.aggregation)
    critic, critic_metrics = _critic_term(values, batch, cfg, mask, cfg.value_clip)
    entropy = aggregate(ent, mask, cfg.aggregation)
    loss = actor + critic - cfg.entropy_coef * entropy
    return loss, {"actor_loss": actor, "entropy": entropy, "approx_kl": approx_kl(lp, batch.old_logprobs, mask),
                  **critic_metrics, **metrics, LOSS_WEIGHT: aggregate_count(mask, cfg.aggregation)}


def ppo_loss(params, batch: PolicyBatch, *, model, cfg: PPOConfig):
    lp, ent, values, mask = policy_value_terms(params, batch, model)
    surrogate, clipped = clipped_surrogate(lp, batch.old_logprobs, batch.advantages, eps_low=cfg.eps)
    actor = aggregate(surrogate, mask, cfg.aggregation)
    critic, critic_metrics = _critic_term(values, batch, cfg, mask, cfg.value_clip)
    entropy = aggregate(ent, mask, cfg.aggregation)
    loss = actor + critic - cfg.entropy_coef * entropy
    return loss, {"actor_loss": actor, "entropy": entropy, "clip_fraction": aggregate(clipped, mask, "token_mean"),
                  "approx_kl": approx_kl(lp, batch.old_logprobs, mask), **critic_metrics,
                  LOSS_WEIGHT: aggregate_count(mask, cfg.aggregation)}
