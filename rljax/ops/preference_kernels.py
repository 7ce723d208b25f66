"""Preference-optimisation kernels: per-sequence log-probabilities in, per-example losses out, no batch reduction.

Notation (docs/algorithms.md, "Preference optimisation"): S(y) = Σ_t m_t ℓ_t (summed
completion log-prob), A(y) = S(y)/|y| (averaged), ρ = S_θ − S_ref, Δ = ρ_w − ρ_l,
h = βΔ, L(z) = −log σ(z) = softplus(−z). Every function takes [B] arrays and
returns [B]; the loss in `rljax.losses.preference` reduces.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def sequence_logps(token_logps: jax.Array, mask: jax.Array, reduction: str = "sum") -> tuple[jax.Array, jax.Array]:
    """S = Σ_t m_t ℓ_t ("sum") or A = S / Σ_t m_t ("mean"), and the length |y| = Σ_t m_t.

    token_logps, mask [..., T] -> (logps [...], lengths [...]) float32. An empty
    completion (length 0) gets A = 0, never NaN (the loss masks such rows out).
    """
    chex.assert_equal_shape([token_logps, mask])
    mask = mask.astype(jnp.float32)
    total = jnp.sum(token_logps * mask, axis=-1)
    lengths = jnp.sum(mask, axis=-1)
    if reduction == "sum":
        return total, lengths
    if reduction == "mean":
        return total / jnp.maximum(lengths, 1.0), lengths
    raise ValueError(f"sequence_logps: reduction {reduction!r} not in ('sum', 'mean')")


def sigmoid_preference(h: jax.Array, label_smoothing: float | jax.Array = 0.0) -> jax.Array:
    """DPO and cDPO: (1 − ε) L(h) + ε L(−h). ε = 0 is DPO; a soft label y gives ε = 1 − y.

    h [B] -> [B]. Minimiser over h: h* = log((1 − ε)/ε).
    """
    eps = jnp.asarray(label_smoothing, jnp.float32)
    return (1.0 - eps) * jax.nn.softplus(-h) + eps * jax.nn.softplus(h)


def robust_preference(h: jax.Array, flip_rate: float) -> jax.Array:
    """Robust DPO (Chowdhury et al. 2024): ((1 − ε) L(h) − ε L(−h)) / (1 − 2ε), ε < ½.

    h [B] -> [B]. Unbiased for labels flipped with rate ε: (1 − ε) f(h) + ε f(−h) = L(h).
    """
    if not 0.0 <= flip_rate < 0.5:
        raise ValueError(f"robust_preference: flip_rate must be in [0, 0.5), got {flip_rate}")
    return ((1.0 - flip_rate) * jax.nn.softplus(-h) - flip_rate * jax.nn.softplus(h)) / (1.0 - 2.0 * flip_rate)


def hinge_preference(h: jax.Array) -> jax.Array:
    """SLiC-style hinge: relu(1 − h). h [B] -> [B]."""
    return jax.nn.relu(1.0 - h)


def ipo(delta: jax.Array, beta: float) -> jax.Array:
    """IPO (Azar et al. 2023): (Δ − 1/(2β))², minimised at Δ = 1/(2β) (β plays τ). delta [B] -> [B]."""
    return (delta - 1.0 / (2.0 * beta)) ** 2


def simpo(chosen_avg: jax.Array, rejected_avg: jax.Array, beta: float, gamma: float) -> jax.Array:
    """SimPO (Meng et al. 2024): L(β (A(y_w) − A(y_l)) − γ), no reference. [B], [B] -> [B]."""
    chex.assert_equal_shape([chosen_avg, rejected_avg])
    return jax.nn.softplus(-(beta * (chosen_avg - rejected_avg) - gamma))


def log_odds(avg_logp: jax.Array) -> jax.Array:
    """log(p / (1 − p)) with log p = A < 0: A − log(1 − e^A), computed stably. [B] -> [B]."""
    a = jnp.minimum(avg_logp, -1e-6)  # p = 1 exactly has infinite odds
    return a - jnp.log(-jnp.expm1(a))


def odds_ratio(chosen_avg: jax.Array, rejected_avg: jax.Array) -> jax.Array:
    """ORPO's preference term (Hong et al. 2024): L(log odds(y_w) − log odds(y_l)) on averaged
    log-probs. [B], [B] -> [B] (the loss adds NLL(y_w) and weights this by λ)."""
    chex.assert_equal_shape([chosen_avg, rejected_avg])
    return jax.nn.softplus(-(log_odds(chosen_avg) - log_odds(rejected_avg)))


def kto(rho: jax.Array, z0: jax.Array, desirable: jax.Array, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> jax.Array:
    """KTO (Ethayarajh et al. 2024): λ_D (1 − σ(β(ρ − z₀))) for desirable y, λ_U (1 − σ(β(z₀ − ρ)))
    for undesirable y. rho [B], desirable [B] (1 or 0), z0 scalar (already stop-gradient) -> [B]."""
    chex.assert_equal_shape([rho, desirable])
    d = desirable.astype(jnp.float32)
    return (d * desirable_weight * (1.0 - jax.nn.sigmoid(beta * (rho - z0)))
            + (1.0 - d) * undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - rho))))


def kto_reference_point(mismatched_rho: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """z₀ = max(0, mean over mismatched pairs (x_i, y_j) of S_θ − S_ref), gradient stopped.

    mismatched_rho [B] (valid [B] optional weights) -> scalar.
    """
    if valid is None:
        valid = jnp.ones_like(mismatched_rho)
    valid = valid.astype(jnp.float32)
    mean = jnp.sum(mismatched_rho * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))
