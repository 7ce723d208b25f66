"""OREO kernels (Wang et al. 2024): soft-Bellman residuals of a value and a policy.

The MDP is token-level: state s_t = prompt + completion tokens before a_t, reward
R ∈ {0, 1} at the end only, objective E[R − β Σ_t log π/π_ref]. Its optimum satisfies
V*(s_t) = R − β Σ_{i≥t} log π*(a_i|s_i)/π_ref(a_i|s_i) on every path, so for a value
V and a policy with log-ratios ℓ_i = log π_θ(a_i|s_i) − log π_ref(a_i|s_i):

    value residual   δ^V_t = V_t − R + β Σ_{i≥t} sg[ℓ_i]
    policy residual  δ^π_t = sg[V_t] − R + β ℓ_t + sg[β Σ_{i>t} ℓ_i]            (token level)
    step residual    δ^π_k = sg[V_{t_k}] − R + β Σ_{i∈step k} ℓ_i + sg[β Σ_{i>step k} ℓ_i]

Both are zero on every path exactly when (V, π) = (V*, π*). Arrays are aligned with
`token_logprobs`: entry t belongs to the state tokens[:t+1] and the action tokens[t+1],
so V_t is the value head read at position t. All kernels are per token (or per step),
with no reduction: shapes [B, T-1] (rewards [B]), masks 1 on completion actions.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def suffix_sums(x: jax.Array, mask: jax.Array) -> jax.Array:
    """S_t = Σ_{i≥t} m_i x_i along the last axis: [B, T] -> [B, T] float32."""
    chex.assert_equal_shape([x, mask])
    xm = x.astype(jnp.float32) * mask.astype(jnp.float32)
    return jnp.flip(jnp.cumsum(jnp.flip(xm, -1), axis=-1), -1)


def oreo_value_residuals(values, log_ratios, rewards, mask, *, beta: float) -> jax.Array:
    """δ^V_t = V_t − R + β Σ_{i≥t} sg[ℓ_i]; gradient reaches V only.

    values, log_ratios, mask [B, T-1]; rewards [B] -> [B, T-1] (0 off the mask)."""
    chex.assert_equal_shape([values, log_ratios, mask])
    chex.assert_shape(rewards, (values.shape[0],))
    m = mask.astype(jnp.float32)
    future = suffix_sums(jax.lax.stop_gradient(log_ratios), m)
    return (values.astype(jnp.float32) - rewards[:, None].astype(jnp.float32) + beta * future) * m


def oreo_policy_residuals(values, log_ratios, rewards, mask, starts, *, beta: float) -> jax.Array:
    """Policy residuals of actions that start at `starts` and run to the next start.

    For an action occupying completion tokens [t, n(t)) (n(t): the next start, or the
    end of the row):

        δ^π_t = sg[V_t] − R + β Σ_{t≤i<n(t)} ℓ_i + sg[β Σ_{i≥n(t)} ℓ_i]

    so the gradient reaches only the action's own tokens. starts = mask gives the token
    level (each token an action: δ^π_t = sg[V_t] − R + β ℓ_t + sg[β Σ_{i>t} ℓ_i]); 1 at the
    first token of every reasoning step gives the step level; 1 at the first completion
    token only gives the response level.

    values, log_ratios, mask, starts [B, T-1] (starts ⊆ mask); rewards [B] ->
    [B, T-1], the residual at each start and 0 elsewhere.
    """
    chex.assert_equal_shape([values, log_ratios, mask, starts])
    chex.assert_shape(rewards, (values.shape[0],))
    m = mask.astype(jnp.float32)
    s = starts.astype(jnp.float32) * m
    n = values.shape[1]
    S = jnp.pad(suffix_sums(log_ratios, m), ((0, 0), (0, 1)))  # [B, T]: S[:, T-1] = 0 past the end
    # n(t): the first start after t (index T-1, where S = 0, when there is none)
    idx = jnp.where(s > 0, jnp.arange(n)[None, :], n)
    after = jnp.concatenate([idx[:, 1:], jnp.full((idx.shape[0], 1), n, idx.dtype)], axis=1)
    nxt = jax.lax.cummin(after, axis=1, reverse=True)
    S_next = jnp.take_along_axis(S, nxt, axis=1)
    own = S[:, :n] - S_next  # Σ_{t≤i<n(t)} ℓ_i, differentiable in exactly those ℓ_i
    v = jax.lax.stop_gradient(values.astype(jnp.float32))
    res = v - rewards[:, None].astype(jnp.float32) + beta * (own + jax.lax.stop_gradient(S_next))
    return res * s


def first_completion_token(mask: jax.Array) -> jax.Array:
    """1 at each row's first masked entry (the response-level action's start): [B, T] -> [B, T] float32."""
    m = mask.astype(jnp.float32)
    return m * (jnp.cumsum(m, axis=1) == 1)
