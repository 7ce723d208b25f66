"""Per-token KL estimators (Schulman, "Approximating KL divergence", 2020).

With samples from π_θ and log ρ_t = ℓ^ref_t − ℓ_t:
  k1 = −log ρ            unbiased, can be negative
  k2 = ½ (log ρ)²        biased, low variance
  k3 = (ρ − 1) − log ρ   unbiased, ≥ 0 (GRPO's choice)
All take logprobs, ref_logprobs of the same shape and return that shape.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    chex.assert_equal_shape([logprobs, ref_logprobs])
    return (logprobs - ref_logprobs).astype(jnp.float32)


def kl_k2(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    chex.assert_equal_shape([logprobs, ref_logprobs])
    d = (ref_logprobs - logprobs).astype(jnp.float32)
    return 0.5 * d * d


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    chex.assert_equal_shape([logprobs, ref_logprobs])
    d = (ref_logprobs - logprobs).astype(jnp.float32)
    return jnp.expm1(d) - d  # expm1 keeps precision when π_θ ≈ π_ref


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def importance_weighted(kl: jax.Array, logprobs: jax.Array, old_logprobs: jax.Array) -> jax.Array:
    """ρ_t · kl_t with ρ_t = exp(ℓ_t − ℓ^old_t) (gradient through both): a per-token KL estimate of
    KL(π_θ ‖ π_ref) for tokens sampled from π_old instead of π_θ. With k3, E_{π_old}[ρ k3] =
    E_{π_θ}[k3] = KL(π_θ ‖ π_ref) exactly, and its gradient is that KL's (TRL's
    use_bias_correction_kl; DeepSeek-V3.2's unbiased KL). All [B, T] -> [B, T]."""
    chex.assert_equal_shape([kl, logprobs, old_logprobs])
    return jnp.exp((logprobs - old_logprobs).astype(jnp.float32)) * kl
