"""Ranking kernels for reward models: scores in, per-pair / per-list losses out, no batch reduction.

Notation (docs/algorithms.md, "Reward models"): L(z) = −log σ(z) = softplus(−z).
A ranked list of K answers to one prompt carries `rank [B, K]` int32: 0 is the
best, larger is worse, equal ranks are ties (no preference), −1 marks an absent
answer (lists shorter than K are padded).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def bradley_terry(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | float = 0.0) -> jax.Array:
    """L(r_w − r_l − m): chosen, rejected [B] (margin scalar or [B]) -> [B]."""
    chex.assert_equal_shape([chosen, rejected])
    return jax.nn.softplus(-(chosen - rejected - margin))


def preferred_pairs(rank: jax.Array) -> jax.Array:
    """rank [B, K] -> [B, K, K] bool: entry (i, j) is True when answers i and j are
    both present and i is ranked strictly above j (ties and absent answers give no pair)."""
    chex.assert_rank(rank, 2)
    present = rank >= 0
    return (rank[:, :, None] < rank[:, None, :]) & present[:, :, None] & present[:, None, :]


def pairwise_ranking(scores: jax.Array, rank: jax.Array,
                     margin: jax.Array | float = 0.0) -> tuple[jax.Array, jax.Array]:
    """K-wise comparison loss (InstructGPT): every preferred pair (i, j) of a list
    contributes L(r_i − r_j − m), averaged over the list's pairs.

    scores [B, K] float, rank [B, K] int32, margin scalar or [B] -> (loss [B], pairs [B]
    float32: how many pairs each list has). A list with no pair has loss 0.
    With K = 2 and rank (0, 1) this is `bradley_terry(scores[:, 0], scores[:, 1], margin)`.
    """
    chex.assert_equal_shape([scores, rank])
    pairs = preferred_pairs(rank).astype(jnp.float32)
    m = jnp.asarray(margin, jnp.float32)
    m = m[:, None, None] if m.ndim == 1 else m
    per_pair = jax.nn.softplus(-(scores[:, :, None] - scores[:, None, :] - m))
    count = pairs.sum(axis=(1, 2))
    return (per_pair * pairs).sum(axis=(1, 2)) / jnp.maximum(count, 1.0), count


def pair_centring(scores: jax.Array, rank: jax.Array) -> jax.Array:
    """Reward centring (Eisenstein et al. 2023), per list: mean over its preferred
    pairs of (r_i + r_j)², which pulls each prompt's rewards toward zero sum.
    scores, rank [B, K] -> [B] (0 for a list without pairs)."""
    chex.assert_equal_shape([scores, rank])
    pairs = preferred_pairs(rank).astype(jnp.float32)
    sq = jnp.square(scores[:, :, None] + scores[:, None, :])
    return (sq * pairs).sum(axis=(1, 2)) / jnp.maximum(pairs.sum(axis=(1, 2)), 1.0)


def tied_lists(rank: jax.Array) -> jax.Array:
    """rank [B, K] -> [B] bool: True where a list ranks two present answers equally and also
    prefers one answer to another (a partial order). A list whose answers all tie has no
    preference and counts for nothing in either objective, so it is not flagged."""
    chex.assert_rank(rank, 2)
    present = rank >= 0
    K = rank.shape[1]
    same = (rank[:, :, None] == rank[:, None, :]) & present[:, :, None] & present[:, None, :] & ~jnp.eye(K, dtype=bool)
    return same.any(axis=(1, 2)) & preferred_pairs(rank).any(axis=(1, 2))


def plackett_luce(scores: jax.Array, rank: jax.Array) -> jax.Array:
    """Negative log-likelihood of a full ranking τ under Plackett–Luce:
    Σ_k [logsumexp_{j ≥ k} r_τ(j) − r_τ(k)] over the present answers.

    scores [B, K] float, rank [B, K] int32 (a strict order of the present answers) -> [B].
    Equal scores give log K!; K = 2 gives Bradley–Terry. A list with tied answers and a
    preference (`tied_lists`) gives NaN: the likelihood of a partial order is the sum over
    the orders of each tied group (exponential in its size), and breaking the tie by the
    answers' listing order would make the loss depend on that order. (`pairwise_ranking`
    scores ties as "no preference"; a list whose answers all tie has no preference either
    and gives a finite value that `ranking_loss` leaves out.)
    """
    chex.assert_equal_shape([scores, rank])
    K = rank.shape[1]
    present = rank >= 0
    # sort best first; absent answers go last and are −inf inside the suffix logsumexp
    key = jnp.where(present, rank, jnp.iinfo(jnp.int32).max // 2) * K + jnp.arange(K)[None, :]
    order = jnp.argsort(key, axis=1)
    s = jnp.take_along_axis(scores.astype(jnp.float32), order, axis=1)
    live = jnp.take_along_axis(present, order, axis=1)
    suffix = jax.lax.cumlogsumexp(jnp.where(live, s, -jnp.inf), axis=1, reverse=True)
    nll = jnp.where(live, suffix - s, 0.0).sum(axis=1)
    return jnp.where(tied_lists(rank), jnp.nan, nll)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """−y log σ(z) − (1 − y) log(1 − σ(z)) = softplus(z) − y z, elementwise; labels are
    floats in [0, 1] (soft labels stay soft)."""
    chex.assert_equal_shape([logits, labels])
    z = logits.astype(jnp.float32)
    return jax.nn.softplus(z) - labels.astype(jnp.float32) * z
