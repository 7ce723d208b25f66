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
