"""Policy-gradient surrogate kernels."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def clipped_surrogate(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, *,
                      eps_low: float = 0.2, eps_high: float | None = None) -> tuple[jax.Array, jax.Array]:
    """PPO/GRPO per-token loss −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A), ρ = exp(ℓ − ℓ_old).

    All inputs [B, T] (advantages may be [B, 1] or [B] broadcast per sequence).
    Returns (loss [B, T], clipped [B, T] float: 1 where the clipped term was the
    minimum and differs, i.e. the token gets no gradient). eps_high defaults to
    eps_low (symmetric); eps_high > eps_low is DAPO's clip-higher.
    """
    chex.assert_equal_shape([logprobs, old_logprobs])
    eps_high = eps_low if eps_high is None else eps_high
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    ratio = jnp.exp((logprobs - old_logprobs).astype(jnp.float32))
    unclipped = ratio * advantages
    clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clipped = clipped_ratio * advantages
    loss = -jnp.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).astype(jnp.float32)
    return loss, was_clipped


def sequence_ratio(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """GSPO's sequence importance ratio s_i = exp((1/|y_i|) Σ_t m_t (ℓ_t − ℓ^old_t)), the geometric
    mean of the token ratios over the completion. [B, T] (mask [B, T]) -> [B]; 1 for an empty row."""
    chex.assert_equal_shape([logprobs, old_logprobs, mask])
    m = mask.astype(jnp.float32)
    mean_log_ratio = ((logprobs - old_logprobs).astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
    return jnp.exp(mean_log_ratio)


def sequence_clipped_surrogate(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                               mask: jax.Array, *, eps_low: float, eps_high: float | None = None
                               ) -> tuple[jax.Array, jax.Array]:
    """GSPO (Zheng et al. 2025) per sequence: −min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i) with
    s_i = `sequence_ratio` (gradient through every token of the row, each weighted 1/|y_i|).
    advantages [B]. Returns (loss [B], clipped [B] float: 1 where the clipped term won and
    differs, i.e. the whole sequence gets no gradient)."""
    chex.assert_rank(advantages, 1)
    eps_high = eps_low if eps_high is None else eps_high
    s = sequence_ratio(logprobs, old_logprobs, mask)
    unclipped = s * advantages
    clipped = jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def clipped_is_weight(logprobs: jax.Array, old_logprobs: jax.Array, *, eps_low: float | None,
                      eps_high: float) -> tuple[jax.Array, jax.Array]:
    """CISPO's (MiniMax-M1) weight sg(clip(ρ_t, 1 − ε_low, 1 + ε_high)), ρ_t = exp(ℓ_t − ℓ^old_t), with
    no gradient: the policy-gradient term −w_t A ℓ_t keeps every token's gradient, only its size is
    capped (PPO's clip instead drops the tokens outside the range). eps_low None: no lower bound.
    [B, T] -> (weight [B, T], clipped [B, T] float: 1 where the bound applied)."""
    chex.assert_equal_shape([logprobs, old_logprobs])
    ratio = jnp.exp((logprobs - old_logprobs).astype(jnp.float32))
    low = 0.0 if eps_low is None else 1.0 - eps_low
    w = jnp.clip(ratio, low, 1.0 + eps_high)
    return jax.lax.stop_gradient(w), (w != ratio).astype(jnp.float32)
