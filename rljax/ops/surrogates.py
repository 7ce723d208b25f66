"""Policy-gradient surrogate kernels."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

# Log-ratios ℓ − ℓ_old are clamped from above at this bound before `exp` (verl clamps at ±20 too):
# exp overflows float32 past log-ratio ≈ 88.7, and the backward pass of jnp.minimum / jnp.clip then
# multiplies a zero cotangent by ρ = inf, giving NaN (and ρ·Â = inf·0 = NaN when Â = 0). e^20 ≈ 4.9e8
# is far outside any clip range, so wherever the clipped term wins (Â ≥ 0) nothing changes.
LOG_RATIO_BOUND = 20.0


def _bounded_log_ratio(log_ratio: jax.Array, eps_high) -> tuple[jax.Array, jax.Array]:
    """(min(log_ratio, bound), saturated: log_ratio > bound) with bound = max(LOG_RATIO_BOUND,
    log(1 + ε_high) + 1), always past the upper clip point so the clip decides as with the exact ratio."""
    bound = jnp.maximum(LOG_RATIO_BOUND, jnp.log1p(eps_high) + 1.0)
    saturated = log_ratio > bound
    # a select, not jnp.minimum: its backward passes the whole cotangent at log_ratio == bound (minimum
    # halves it at a tie) and 0 past the bound, never 0·inf
    return jnp.where(saturated, bound, log_ratio), saturated


def clipped_surrogate(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, *,
                      eps_low: float = 0.2, eps_high: float | None = None) -> tuple[jax.Array, jax.Array]:
    """PPO/GRPO per-token loss −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A), ρ = exp(min(ℓ − ℓ_old, b)).

    All inputs [B, T] (advantages may be [B, 1] or [B] broadcast per sequence).
    Returns (loss [B, T], clipped [B, T] float: 1 where the token gets no gradient from the
    surrogate, i.e. the clipped term was the minimum and differs, or A < 0 and the log-ratio is
    past b). eps_high defaults to eps_low (symmetric); eps_high > eps_low is DAPO's clip-higher.

    b = max(20, log(1 + ε_high) + 1) (`LOG_RATIO_BOUND`) keeps loss and gradient finite for any
    finite log-ratio: A ≥ 0 gives exactly the unbounded values (past b the clipped term
    (1 + ε_high)·A wins either way; A = 0 gives 0, not inf·0); A < 0 with ℓ − ℓ_old > b gives
    e^b·|A| and no gradient, i.e. dual-clip PPO (Ye et al. 2020) with c = e^b ≈ 4.9e8, where the
    unbounded loss is e^(ℓ − ℓ_old)·|A| (inf in float32 past ≈ 88.7).
    """
    chex.assert_equal_shape([logprobs, old_logprobs])
    eps_high = eps_low if eps_high is None else eps_high
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    log_ratio, saturated = _bounded_log_ratio((logprobs - old_logprobs).astype(jnp.float32), eps_high)
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages
    clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clipped = clipped_ratio * advantages
    loss = -jnp.minimum(unclipped, clipped)
    was_clipped = ((clipped < unclipped) | (saturated & (advantages < 0))).astype(jnp.float32)
    return loss, was_clipped


def _mean_log_ratio(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """(1/|y_i|) Σ_t m_t (ℓ_t − ℓ^old_t), [B, T] -> [B]; 0 for an empty row. Off-mask entries are
    selected out (jnp.where), not multiplied by 0, so an inf there cannot make the sum NaN."""
    chex.assert_equal_shape([logprobs, old_logprobs, mask])
    m = mask.astype(jnp.float32)
    d = jnp.where(m > 0, (logprobs - old_logprobs).astype(jnp.float32), 0.0)
    return d.sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


def sequence_ratio(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """GSPO's sequence importance ratio s_i = exp((1/|y_i|) Σ_t m_t (ℓ_t − ℓ^old_t)), the geometric
    mean of the token ratios over the completion. [B, T] (mask [B, T]) -> [B]; 1 for an empty row."""
    return jnp.exp(_mean_log_ratio(logprobs, old_logprobs, mask))


def sequence_clipped_surrogate(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                               mask: jax.Array, *, eps_low: float, eps_high: float | None = None
                               ) -> tuple[jax.Array, jax.Array]:
    """GSPO (Zheng et al. 2025) per sequence: −min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i) with
    s_i = `sequence_ratio` (gradient through every token of the row, each weighted 1/|y_i|).
    logprobs, old_logprobs, mask [B, T]; advantages [B]. Returns (loss [B], clipped [B] float: 1
    where the whole sequence gets no gradient: the clipped term won and differs, or A < 0 and
    the mean log-ratio is past the bound). The mean log-ratio is bounded as in
    `clipped_surrogate` (exact for A ≥ 0; e^b·|A| and no gradient for A < 0 past b ≥ 20)."""
    chex.assert_rank(advantages, 1)
    eps_high = eps_low if eps_high is None else eps_high
    log_s, saturated = _bounded_log_ratio(_mean_log_ratio(logprobs, old_logprobs, mask), eps_high)
    s = jnp.exp(log_s)
    unclipped = s * advantages
    clipped = jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high) * advantages
    was_clipped = (clipped < unclipped) | (saturated & (advantages < 0))
    return -jnp.minimum(unclipped, clipped), was_clipped.astype(jnp.float32)


def clipped_is_weight(logprobs: jax.Array, old_logprobs: jax.Array, *, eps_low: float | None,
                      eps_high: float) -> tuple[jax.Array, jax.Array]:
    """CISPO's (MiniMax-M1) weight sg(clip(ρ_t, 1 − ε_low, 1 + ε_high)), ρ_t = exp(ℓ_t − ℓ^old_t), with
    no gradient: the policy-gradient term −w_t A ℓ_t keeps every token's gradient, only its size is
    capped (PPO's clip instead drops the tokens outside the range). The cap is 1 + ε_high (TRL's
    clamp(ρ, max=epsilon_high) caps at epsilon_high itself: epsilon_high = ε_high + 1). eps_low
    None: no lower bound. An overflowing ρ (log-ratio > 88.7) gives the cap: no gradient flows
    through w, so nothing multiplies inf.
    [B, T] -> (weight [B, T], clipped [B, T] float: 1 where the bound applied)."""
    chex.assert_equal_shape([logprobs, old_logprobs])
    ratio = jnp.exp((logprobs - old_logprobs).astype(jnp.float32))
    low = 0.0 if eps_low is None else 1.0 - eps_low
    w = jnp.clip(ratio, low, 1.0 + eps_high)
    return jax.lax.stop_gradient(w), (w != ratio).astype(jnp.float32)
