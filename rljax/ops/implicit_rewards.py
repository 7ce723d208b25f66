"""Kernels for implicit rewards: inverse-propensity click targets and implicit-PRM step rewards."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def ipw_targets(signal: jax.Array, propensity: jax.Array, *, min_propensity: float = 0.0) -> jax.Array:
    """Inverse-propensity targets c / max(P(examined), p_min) (Joachims et al. 2017): signal,
    propensity [B] -> [B]. A click is observed only if the item was examined, so
    E[c] = P(examined) · relevance and E[c / P(examined)] = relevance. Clipping the
    propensity at p_min bounds the weights (less variance, a little bias)."""
    chex.assert_equal_shape([signal, propensity])
    return signal.astype(jnp.float32) / jnp.maximum(propensity.astype(jnp.float32), min_propensity)


def implicit_q(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, beta: float) -> jax.Array:
    """q_t = β Σ_{i ≤ t} m_i (log π_θ(y_i) − log π_ref(y_i)): [B, T-1] -> [B, T-1]. The implicit
    reward of the whole completion, r_θ(y), is q at its last token."""
    chex.assert_equal_shape([logprobs, ref_logprobs, mask])
    return beta * jnp.cumsum((logprobs - ref_logprobs) * mask.astype(jnp.float32), axis=1)


def implicit_step_rewards(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, step_ends: jax.Array,
                          beta: float) -> jax.Array:
    """Implicit PRM (Yuan et al. 2024): the reward of step k is q at its last token minus q at
    the previous step's last token (0 before the first step). logprobs, ref_logprobs,
    mask, step_ends [B, T-1] (step_ends 1 at each step's last token) -> [B, T-1], non-zero
    only at step ends. The step rewards of a row sum to q at its last step end, which is
    r_θ(y) when the last step ends at the last completion token."""
    chex.assert_equal_shape([logprobs, step_ends])
    q = implicit_q(logprobs, ref_logprobs, mask, beta)
    ends = step_ends.astype(bool)

    def scan_row(q_row, end_row):
        def body(prev, x):
            qt, e = x
            return jnp.where(e, qt, prev), jnp.where(e, qt - prev, 0.0)
        _, out = jax.lax.scan(body, jnp.float32(0.0), (q_row, end_row))
        return out

    return jax.vmap(scan_row)(q, ends)
