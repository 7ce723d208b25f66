"""Per-token log-probabilities and entropies from logits."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax


def logprobs_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] = logits[target] - logsumexp(logits).

    logits [..., V], targets [...] int -> [...] float32. Differentiated through
    `_picked_logprob`'s rule, whose gradient g (onehot(target) - softmax) is elementwise.
    """
    chex.assert_equal_shape_prefix([logits, targets], targets.ndim)
    return _picked_logprob(logits.astype(jnp.float32), targets.astype(jnp.int32))


def _picked_minus(logits, targets, lse):
    """logits[..., target] - lse: [..., V], [...] int, [...] -> [...]."""
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse


@jax.custom_jvp
def _picked_logprob(logits, targets):
    return _picked_minus(logits, targets, jax.nn.logsumexp(logits, axis=-1))


@_picked_logprob.defjvp
def _picked_logprob_jvp(primals, tangents):
    """d ℓ = Σ_v (onehot(target)_v - p_v) dz_v, with the one-hot written as a comparison with
    iota rather than as the gather's tangent: its transpose (the backward pass) is then
    g (onehot - p), one elementwise pass over [..., V] that XLA fuses with the cast the LM head's
    backward matmul reads, where the gather's transpose is a scatter into a zero [..., V] array
    (on an H200, Qwen2.5-0.5B at 8 x 1024 tokens: a 5 GB float32 scatter, a multiply and a cast,
    4.3 ms of a 66 ms train step)."""
    (logits, targets), (dlogits, _) = primals, tangents
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    out = _picked_minus(logits, targets, lse[..., 0])
    onehot = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    return out, jnp.sum((onehot - jnp.exp(logits - lse)) * dlogits, axis=-1)


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
