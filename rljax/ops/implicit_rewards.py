"""Kernels for implicit rewards: inverse-propensity click targets and implicit-PRM step rewards."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def ipw_targets(signal: jax.Array, propensity: jax.Array, *, min_propensity: float = 0.05) -> jax.Array:
    """Inverse-propensity targets c / max(P(examined), p_min) (Joachims et al. 2017): signal,
    propensity [B] -> [B]. A click is observed only if the item was examined, so
    E[c] = P(examined) · relevance and E[c / P(examined)] = relevance. Clipping the
    propensity at p_min bounds the weights at 1 / p_min (less variance, a little bias);
    p_min must be in (0, 1] (the default 0.05 is FeedbackConfig's): p_min = 0 would let a
    zero propensity give c / 0 = inf, or NaN for c = 0."""
    if not 0.0 < min_propensity <= 1.0:
        raise ValueError(f"ipw_targets: min_propensity must be in (0, 1], got {min_propensity}")
    chex.assert_equal_shape([signal, propensity])
    return signal.astype(jnp.float32) / jnp.maximum(propensity.astype(jnp.float32), min_propensity)


def implicit_q(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, beta: float) -> jax.Array:
    """q_t = β Σ_{i ≤ t} m_i (log π_θ(y_i) − log π_ref(y_i)): [B, T-1] -> [B, T-1]. The implicit
    reward of the whole completion, r_θ(y), is q at its last token."""
    chex.assert_equal_shape([logprobs, ref_logprobs, mask])
    return beta * jnp.cumsum((logprobs - ref_logprobs) * mask.astype(jnp.float32), axis=1)


def step_ends_from(label_mask: jax.Array) -> jax.Array:
    """A PRM's step ends on the token grid -> the same step ends on the log-prob grid:
    label_mask [B, T] (`collate_steps`: 1 at each step's last token) -> step_ends [B, T-1],

        step_ends[:, t] = label_mask[:, t + 1]

    since entry t of `token_logprobs` (and of `target_mask`) is the prediction of
    tokens[t + 1]: the step ending at token e ends at log-prob entry e − 1. Token 0 has no
    prediction; it is bos or the prompt, never a step end, unless an empty prompt without
    bos starts with a one-token step, whose end is then dropped."""
    chex.assert_rank(label_mask, 2)
    return label_mask[:, 1:]


def implicit_step_rewards(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, step_ends: jax.Array,
                          beta: float) -> jax.Array:
    """Implicit PRM (Yuan et al. 2024): the reward of step k is q at its last token minus q at
    the previous step's last token (0 before the first step),

        r_k = q_{e_k} − q_{e_{k−1}},   q_t = β Σ_{i ≤ t} m_i (log π_θ(y_i) − log π_ref(y_i)),  q_{e_0} = 0

    logprobs, ref_logprobs, mask, step_ends [B, T-1] -> [B, T-1], non-zero only at step ends.
    Everything is on the log-prob grid (entry t predicts tokens[t + 1]): mask is
    `target_mask(loss_mask, attention_mask)` and step_ends is `step_ends_from(label_mask)`
    of `collate_steps`' token-grid label_mask (label_mask[:, 1:]; the unshifted mask would
    end every step one token early). The step rewards of a row sum to q at its last step
    end: r_θ(y) less the terms after it. With `collate_steps`' encoding the last step ends
    at its last text token and the [eos] after it is a completion token, so

        Σ_k r_k = r_θ(y) − β (log π_θ(eos) − log π_ref(eos))

    (a separator between steps belongs to the next step's reward)."""
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
