"""`aggregate`: the one place where per-token values are reduced to a scalar."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")


def aggregate(x: jax.Array, mask: jax.Array, mode: str, *, constant: float | None = None) -> jax.Array:
    """Reduce per-token values x [B, T] over mask [B, T] (1 = counts) to a scalar.

      token_mean:           Σ_{b,t} m x / Σ_{b,t} m
      seq_mean_token_mean:  mean over sequences with Σ_t m > 0 of Σ_t m x / Σ_t m
      seq_mean_token_sum:   mean over sequences of Σ_t m x
      constant:             Σ_{b,t} m x / (B · constant)   (e.g. constant = max length, Dr. GRPO)

    An all-zero mask gives 0, not NaN.
    """
    chex.assert_equal_shape([x, mask])
    chex.assert_rank(x, 2)
    m = mask.astype(jnp.float32)
    x = x.astype(jnp.float32) * m
    if mode == "token_mean":
        return x.sum() / jnp.maximum(m.sum(), 1.0)
    if mode == "seq_mean_token_mean":
        count = m.sum(axis=1)
        per_seq = x.sum(axis=1) / jnp.maximum(count, 1.0)
        live = (count > 0).astype(jnp.float32)
        return (per_seq * live).sum() / jnp.maximum(live.sum(), 1.0)
    if mode == "seq_mean_token_sum":
        return x.sum(axis=1).mean()
    if mode == "constant":
        if constant is None or constant <= 0:
            raise ValueError(f"aggregate mode 'constant' needs a positive constant, got {constant}")
        return x.sum() / (x.shape[0] * constant)
    raise ValueError(f"unknown aggregation {mode!r}; choose from {AGGREGATIONS}")
