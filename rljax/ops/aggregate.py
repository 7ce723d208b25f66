"""`aggregate`: the one place where per-token values are reduced to a scalar."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")
# The metrics key under which a loss reports the count its value is a mean over (`aggregate_count`);
# the train step pops it and weights the micro-batch's gradient by it under gradient accumulation.
LOSS_WEIGHT = "loss_weight"


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
            raise ValueError(f"aggregate mode 'constant' needs a positive constant, got {constant} (an RLConfig sets a "
                             "loss's constant=None to its sampling.max_new_tokens; a loss called directly needs one)")
        return x.sum() / (x.shape[0] * constant)
    raise ValueError(f"unknown aggregation {mode!r}; choose from {AGGREGATIONS}")


def aggregate_count(mask: jax.Array, mode: str) -> jax.Array:
    """N, the count that `aggregate(x, mask, mode)` divides a sum by (float32 scalar):

      token_mean:           Σ_{b,t} m                       (tokens)
      seq_mean_token_mean:  #{b : Σ_t m_{b,t} > 0}          (sequences with a counted token)
      seq_mean_token_sum:   B                               (rows)
      constant:             B                               (the constant is the same for every batch)

    So aggregate = S / N with S a sum over rows or tokens, and over micro-batches m
    Σ_m N_m aggregate_m / Σ_m N_m = Σ_m S_m / Σ_m N_m is the aggregate of the whole batch;
    gradient accumulation weights micro-batch gradients by N for this reason. (For
    token_mean, `aggregate` divides by max(N, 1): exact whenever the whole batch counts at
    least one token.)
    """
    chex.assert_rank(mask, 2)
    m = mask.astype(jnp.float32)
    if mode == "token_mean":
        return m.sum()
    if mode == "seq_mean_token_mean":
        return (m.sum(axis=1) > 0).astype(jnp.float32).sum()
    if mode in ("seq_mean_token_sum", "constant"):
        return jnp.float32(mask.shape[0])
    raise ValueError(f"unknown aggregation {mode!r}; choose from {AGGREGATIONS}")


def high_entropy_mask(entropy: jax.Array, mask: jax.Array, top_quantile: float) -> jax.Array:
    """The tokens of mask [B, T] whose entropy is in the top `top_quantile` ρ of the masked tokens' (Wang et
    al. 2025, "Beyond the 80/20 rule": the policy gradient through the high-entropy "forking" tokens alone;
    TRL's top_entropy_quantile): m_t · [H_t ≥ q], q = the (1 − ρ) quantile of {H_t : m_t = 1} with linear
    interpolation (numpy's and torch.quantile's default) -> float32 [B, T], no gradient. The quantile is over
    every masked token of the arrays given (on a mesh, the global batch); ρ = 1 keeps every masked token,
    an all-zero mask gives zeros."""
    chex.assert_equal_shape([entropy, mask])
    on = mask > 0
    h = jax.lax.stop_gradient(entropy.astype(jnp.float32))
    q = jnp.nanquantile(jnp.where(on, h, jnp.nan), 1.0 - top_quantile)  # NaN (no token kept) for an empty mask
    return (on & (h >= q)).astype(jnp.float32)
