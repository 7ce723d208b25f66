"""Per-token log-probabilities and entropies from logits."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def logprobs_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] = logits[target] - logsumexp(logits).

    logits [..., V], targets [...] int -> [...] float32.
    """
    chex.assert_equal_shape_prefix([logits, targets], targets.ndim)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v.  logits [..., V] -> [...]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


def mean_logprob_from_logits(logits: jax.Array) -> jax.Array:
    """(1/V) Σ_v log p_v = mean(z) - logsumexp(z): the uniform-target term of label smoothing.

    logits [..., V] -> [...].
    """
    logits = logits.astype(jnp.float32)
    return jnp.mean(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1)
