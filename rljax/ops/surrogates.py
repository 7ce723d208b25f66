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
