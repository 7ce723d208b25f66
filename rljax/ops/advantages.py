"""Advantage kernels: group statistics, leave-one-out baselines, whitening,
discounted returns and GAE. Arrays in, per-sample or per-token arrays out."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _check_group_ids(group_ids, R: int) -> None:
    """Concrete group ids must lie in [0, R): segment sums drop the others silently (a GRPO advantage
    of r / ε, an RLOO one of 0). Traced ids (inside jit: the sampler's, always in range) pass unchecked."""
    if isinstance(group_ids, jax.core.Tracer):
        return
    g = np.asarray(group_ids)
    if g.size and (g.min() < 0 or g.max() >= R):
        bad = int(np.flatnonzero((g < 0) | (g >= R))[0])
        raise ValueError(f"group_ids[{bad}] = {int(g[bad])} is outside [0, {R}): a group id is a prompt's index "
                         f"among the batch's {R} rows (renumber them, e.g. np.unique(ids, return_inverse=True)[1])")


def group_stats(x: jax.Array, group_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample statistics of each sample's group.

    x [R] float, group_ids [R] int in [0, R) (any order, any group sizes) ->
    (mean_g [R], std_g [R] (population), count_g [R]) gathered back to samples.
    """
    chex.assert_rank([x, group_ids], 1)
    chex.assert_equal_shape([x, group_ids])
    R = x.shape[0]
    _check_group_ids(group_ids, R)
    x = x.astype(jnp.float32)
    count = jax.ops.segment_sum(jnp.ones_like(x), group_ids, num_segments=R)
    mean = jax.ops.segment_sum(x, group_ids, num_segments=R) / jnp.maximum(count, 1.0)
    dev = x - mean[group_ids]
    var = jax.ops.segment_sum(dev * dev, group_ids, num_segments=R) / jnp.maximum(count, 1.0)
    return mean[group_ids], jnp.sqrt(var)[group_ids], count[group_ids]


def group_range(x: jax.Array, group_ids: jax.Array) -> jax.Array:
    """max − min of each sample's group: [R] -> [R] (0 when the group's values are all equal)."""
    chex.assert_equal_shape([x, group_ids])
    R = x.shape[0]
    x = x.astype(jnp.float32)
    hi = jax.ops.segment_max(x, group_ids, num_segments=R)
    lo = jax.ops.segment_min(x, group_ids, num_segments=R)
    return (hi - lo)[group_ids]


def group_advantages(rewards: jax.Array, group_ids: jax.Array, *, scale_by_std: bool = True,
                     eps: float = 1e-6, std_scope: str = "group") -> jax.Array:
    """GRPO: Â_i = (r_i − μ_g) / (σ_g + ε), or r_i − μ_g without std scaling (Dr. GRPO). [R] -> [R].
    std_scope "batch": Â_i = (r_i − μ_g) / (σ + ε) with σ the population std of all R rewards (the
    group mean, the batch's scale: "Lite PPO", TRL's scale_rewards="batch").

    A group whose rewards are all equal (including a group of one) gets Â = 0 exactly: set by
    `group_range`, not left to the division, because float32 rounding leaves μ_g a few ulps off
    such a group's reward (eight rewards of 0.7: r − μ ≈ 6e-8, σ ≈ 6e-8), and dividing by σ + ε
    would blow that up to Â ≈ 0.06 for every sample of the group. ε = 0 is then safe too.
    """
    if std_scope not in ("group", "batch"):
        raise ValueError(f"group_advantages: std_scope must be 'group' or 'batch', got {std_scope!r}")
    mean, std, _ = group_stats(rewards, group_ids)
    centred = rewards.astype(jnp.float32) - mean
    if std_scope == "batch":
        std = jnp.std(rewards.astype(jnp.float32))
    advantages = centred / (std + eps) if scale_by_std else centred
    return jnp.where(group_range(rewards, group_ids) > 0, advantages, 0.0)


def leave_one_out_baseline(rewards: jax.Array, group_ids: jax.Array) -> jax.Array:
    """RLOO: b_i = (Σ_{j in g, j≠i} r_j) / (n_g − 1). [R] -> [R].

    Then r_i − b_i = n_g/(n_g − 1) · (r_i − μ_g). A group of one has no other
    sample: its baseline is r_i itself (advantage 0, no learning signal).
    """
    mean, _, count = group_stats(rewards, group_ids)
    r = rewards.astype(jnp.float32)
    others = (mean * count - r) / jnp.maximum(count - 1.0, 1.0)
    return jnp.where(count > 1, others, r)


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x − mean) / (std + ε) over the masked entries (population std); 0 off the mask. Any shape.

    Masked entries that are all equal (one entry, or every reward the same) have no spread to
    divide by: with shift_mean they give 0 exactly, without it x unscaled. Dividing would turn
    float32 rounding into signal: eight entries of 0.7 leave mean − x ≈ 6e-8 and std ≈ 6e-8, so
    (x − mean)/(std + ε) read 0.856 each, and rewards of 1.0 scaled by 1/ε became 1e8."""
    chex.assert_equal_shape([x, mask])
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    on = m > 0
    spread = jnp.max(jnp.where(on, x, -jnp.inf)) - jnp.min(jnp.where(on, x, jnp.inf))
    varies = spread > 0  # False also when nothing is masked in (inf - inf = nan)
    out = jnp.where(varies, x - mean, 0.0) if shift_mean else x
    return out / jnp.where(varies, jnp.sqrt(var) + eps, 1.0) * m


def place_at_last(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token array with values[b] at row b's last masked position, 0 elsewhere
    (a sequence reward placed on the last completion token; any padding side).
    values [B], mask [B, T] -> [B, T]; a row with an empty mask gets nothing."""
    chex.assert_rank([values, mask], [1, 2])
    m = mask.astype(jnp.float32)
    T = m.shape[1]
    last = T - 1 - jnp.argmax(m[:, ::-1] > 0, axis=1)  # index of the last 1 per row
    onehot = (jnp.arange(T)[None, :] == last[:, None]) & (m.sum(axis=1, keepdims=True) > 0)
    return onehot.astype(jnp.float32) * values.astype(jnp.float32)[:, None]


def discounted_returns(rewards: jax.Array, mask: jax.Array, gamma: float) -> jax.Array:
    """G_t = Σ_{j≥0} γ^j r_{k_j} over the masked positions k_0 = t < k_1 < k_2 < … of the row,
    computed backwards; 0 where mask is 0. rewards, mask [B, T] -> [B, T].

    γ is applied once per masked token, never across an unmasked one: a hole in the mask
    (an unmasked position between masked ones) is skipped, as `gae` skips it, so GAE with
    λ = 1 gives A_t = G_t − V_t with holes too. Without holes this is Σ_{k≥t} γ^{k−t} m_k r_k.
    """
    chex.assert_rank([rewards, mask], 2)
    chex.assert_equal_shape([rewards, mask])
    m = mask.astype(jnp.float32)
    r = rewards.astype(jnp.float32) * m

    def back(carry, xs):
        r_t, m_t = xs
        g = r_t + gamma * carry
        # an unmasked position passes the return through undiscounted (gae keeps its carry there too)
        return jnp.where(m_t > 0, g, carry), g

    _, g = lax.scan(back, jnp.zeros(r.shape[0], jnp.float32), (r.T, m.T), reverse=True)
    return g.T * m


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float,
        bootstrap: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016).

    δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}, backwards over the masked
    tokens of each row; after a row's last masked token V = 0 (finished) or
    `bootstrap` [B] (truncated). rewards, values, mask [B, T] ->
    (advantages [B, T], returns R_t = A_t + V_t [B, T]), both 0 off the mask.
    Known: λ = 1 gives A_t = G_t − V_t; λ = 0 gives A_t = δ_t.
    """
    chex.assert_rank([rewards, values, mask], 2)
    chex.assert_equal_shape([rewards, values, mask])
    m = mask.astype(jnp.float32)
    r, v = rewards.astype(jnp.float32) * m, values.astype(jnp.float32) * m
    B = r.shape[0]
    tail = jnp.zeros((B,), jnp.float32) if bootstrap is None else bootstrap.astype(jnp.float32)

    def back(carry, xs):
        next_v, next_a, next_live = carry
        r_t, v_t, m_t = xs
        # Past the row's last masked token the "next" value is the tail value.
        nv = jnp.where(next_live > 0, next_v, tail)
        delta = r_t + gamma * nv - v_t
        a = (delta + gamma * lam * next_a * next_live) * m_t
        # Unmasked tokens (prompt, padding) leave the carry untouched.
        on = m_t > 0
        return (jnp.where(on, v_t, next_v), jnp.where(on, a, next_a), jnp.where(on, m_t, next_live)), a

    init = (jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.float32))
    _, adv = lax.scan(back, init, (r.T, v.T, m.T), reverse=True)
    adv = adv.T * m
    return adv, (adv + v) * m
