"""TRPO (Schulman et al. 2015): a natural-gradient step under a KL trust region.

    maximise  L(θ) = agg_t[ρ_t A_t],  ρ_t = exp(ℓ_t(θ) − ℓ_t(θ_old))
    subject to  D(θ) = agg_t[KL(π_old(·|s_t) ‖ π_θ(·|s_t))] ≤ δ

g = ∇L(θ_old); F = ∇²D(θ_old) (the Fisher information); solve (F + λI) s = g by
conjugate gradient with Fisher-vector products Fv = ∇(∇D · v) (a jvp of a grad:
F is never formed); the largest step along s within the quadratic model of the
trust region is β = sqrt(2δ / sᵀFs); a backtracking line search θ_old + 0.5^k β s,
k = 0..K−1, takes the first step whose surrogate improves and whose measured KL is
≤ δ, and otherwise keeps θ_old. ρ_t is bounded as in the clipped losses: ℓ_t − ℓ_t(θ_old) is
capped at LOG_RATIO_BOUND = 20 (a stale sampler's log-probs can put it past 88.7, where exp
overflows float32 and would make L, g and the step NaN; a capped token weighs e^20·A_t and has no
gradient) and set to 0 off the mask. A step whose L(θ_old) or g is still not finite (NaN
logits or advantages) is skipped (metrics["skipped"] = 1, θ_old kept, no line search), which
the training loop counts like an optimizer's skipped step. Every operation is a pytree operation, so
sharded parameters stay sharded. The KL is the exact one over the vocabulary
(the old distribution is a constant), whose Hessian at θ_old is the Fisher; it
materialises [B, T, V] float32 logits for θ and θ_old.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from rljax.data.batch import PolicyBatch
from rljax.losses.actor_critic import check_actor_critic_config
from rljax.losses.policy_gradient import _policy_terms
from rljax.models import Model
from rljax.models.logprobs import target_mask
from rljax.ops.aggregate import aggregate
from rljax.ops.surrogates import LOG_RATIO_BOUND


@dataclass(frozen=True)
class TRPOConfig:
    """max_kl: δ (mean per-token KL of the step); cg_iters, damping λ: the CG solve of
    (F + λI) s = g; backtrack_steps K and backtrack_ratio: the line search;
    aggregation: how per-token surrogate and KL terms reduce (see `aggregate`).
    In the RL loop (algorithm "trpo", with a separate critic): advantages from the GAE
    estimator; the critic regresses on the returns (clipped around V_old by value_clip
    when set)."""

    max_kl: float = 0.01
    cg_iters: int = 10
    damping: float = 0.1
    backtrack_steps: int = 10
    backtrack_ratio: float = 0.5
    aggregation: str = "token_mean"
    value_clip: float | None = None

    def __post_init__(self):
        check_actor_critic_config(self)
        if not 0 < self.max_kl < math.inf:  # NaN too: the line search would never accept a step
            raise ValueError(f"TRPOConfig.max_kl: must be positive and finite, got {self.max_kl}")
        if self.cg_iters < 1 or self.backtrack_steps < 1:
            raise ValueError(f"TRPOConfig: cg_iters and backtrack_steps must be >= 1, got {self.cg_iters}, "
                             f"{self.backtrack_steps}")
        if not 0 <= self.damping < math.inf:
            raise ValueError(f"TRPOConfig.damping: must be >= 0 and finite, got {self.damping}")
        if not 0 < self.backtrack_ratio < 1:
            raise ValueError(f"TRPOConfig.backtrack_ratio: must be in (0, 1), got {self.backtrack_ratio}")


def _axpy(alpha, x, y):
    """alpha · x + y over pytrees."""
    return jax.tree.map(lambda xi, yi: (alpha * xi + yi).astype(yi.dtype), x, y)


def conjugate_gradient(matvec: Callable, b, *, iters: int = 10, residual_tol: float = 1e-10):
    """Solve A x = b for symmetric positive-definite A given only x -> A x, on pytrees.

    Hestenes-Stiefel CG from x = 0: at most `iters` iterations, stopping early once
    rᵀr < residual_tol. Exact arithmetic converges in ≤ dim(b) iterations.
    Returns (x, rᵀr of the final residual). Jit-able (a `lax.while_loop`).
    """
    x0 = jax.tree.map(jnp.zeros_like, b)
    rr0 = optax.tree.vdot(b, b)

    def cond(c):
        i, _, _, _, rr = c
        return (i < iters) & (rr >= residual_tol)

    def body(c):
        i, x, r, p, rr = c
        Ap = matvec(p)
        alpha = rr / optax.tree.vdot(p, Ap)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, Ap, r)
        rr_new = optax.tree.vdot(r, r)
        p = _axpy(rr_new / rr, p, r)
        return i + 1, x, r, p, rr_new

    _, x, _, _, rr = lax.while_loop(cond, body, (jnp.int32(0), x0, b, b, rr0))
    return x, rr


def fisher_vector_product(kl_fn: Callable, params) -> Callable:
    """v -> ∇²kl_fn(params) v, as the jvp of the gradient (forward-over-reverse).
    With kl_fn(θ) = KL(π_old ‖ π_θ) and params = θ_old this is the Fisher times v."""
    grad = jax.grad(kl_fn)
    return lambda v: jax.jvp(grad, (params,), (v,))[1]


def _log_softmax_all(params, batch: PolicyBatch, model) -> jax.Array:
    """[B, T-1, V] log π(· | tokens[:t+1]) for the positions that predict tokens[t+1]."""
    logits = model(params, batch.tokens, batch.attention_mask)[:, :-1]
    return jax.nn.log_softmax(logits, axis=-1)


def _trpo_objectives(params_old, batch: PolicyBatch, *, model, cfg: TRPOConfig):
    """(surrogate, gain, kl): `make_trpo_objectives`'s two and gain(θ) = agg[(ρ(θ) − ρ(θ_old)) · A],
    L(θ) − L(θ_old) summed token by token. The line search compares gains, not L(θ) with L(θ_old):
    a token capped at e^20 (a stale sampler's) puts ~1e8·A into L, where float32 cannot hold a gain
    of 0.1, and adds exactly 0 to the gain (its ρ is the cap at both)."""
    kl_model = model
    if model.config.recompute_swiglu or model.config.low_precision_backward:
        kl_model = Model(model.config.replace(recompute_swiglu=False, low_precision_backward=False), model.mesh)
    mask = target_mask(batch.loss_mask, batch.attention_mask)
    old = lax.stop_gradient(_log_softmax_all(params_old, batch, kl_model))
    p_old = jnp.exp(old)
    adv = batch.advantages if batch.advantages.ndim == 2 else batch.advantages[:, None]

    def ratio(theta):
        out, _ = _policy_terms(theta, batch, model, with_entropy=False)
        # selected, not multiplied by the mask in `aggregate`: an overflowing ρ off the mask would give inf·0;
        # capped with a select, so past the bound the token has no gradient (never 0·inf)
        log_ratio = jnp.where(mask > 0, out["logprobs"] - batch.old_logprobs, 0.0).astype(jnp.float32)
        return jnp.exp(jnp.where(log_ratio > LOG_RATIO_BOUND, LOG_RATIO_BOUND, log_ratio))

    ratio_old = lax.stop_gradient(ratio(params_old))

    def surrogate(theta):
        return aggregate(ratio(theta) * adv, mask, cfg.aggregation)

    def gain(theta):
        return aggregate((ratio(theta) - ratio_old) * adv, mask, cfg.aggregation)

    def kl(theta):
        new = _log_softmax_all(theta, batch, kl_model)
        return aggregate(jnp.sum(p_old * (old - new), axis=-1), mask, cfg.aggregation)

    return surrogate, gain, kl


def make_trpo_objectives(params_old, batch: PolicyBatch, *, model, cfg: TRPOConfig):
    """(surrogate(θ), kl(θ)) as scalar functions for this batch, with π_old fixed at params_old.

    surrogate(θ) = agg[exp(min(ℓ(θ) − ℓ_old, 20)) · A] (the log-ratio 0 off the mask);
    A = batch.advantages ([B] per sequence or [B, T-1] per token);
    kl(θ) = agg[Σ_v π_old(v)(log π_old(v) − log π_θ(v))].
    kl runs the model with recompute_swiglu and low_precision_backward off (the same function;
    its plain derivative, free of custom VJPs), so that `fisher_vector_product` can differentiate
    its gradient in forward mode.
    """
    surrogate, _, kl = _trpo_objectives(params_old, batch, model=model, cfg=cfg)
    return surrogate, kl


def trpo_update(params, batch: PolicyBatch, *, model, cfg: TRPOConfig):
    """One TRPO step from params (= θ_old, the sampler's params) -> (new params, metrics).

    metrics: surrogate improvement, KL of the taken step, accepted (1/0), the line
    search's step fraction (0.5^k, 0 when rejected), sᵀFs, the CG residual rᵀr, the
    gradient norm, backtracks, and skipped (1 when L(θ_old) or its gradient is not finite:
    θ_old is kept without a line search). A candidate is accepted when its gain
    L(θ) − L(θ_old) (summed token by token, `_trpo_objectives`) is positive and its KL ≤ δ. Jit-able; pure.
    """
    _, gain, kl = _trpo_objectives(params, batch, model=model, cfg=cfg)
    gain0, g = jax.value_and_grad(gain)(params)  # gain0 = 0 (NaN when L(θ_old) is); its gradient is ∇L(θ_old)
    fvp = fisher_vector_product(kl, params)

    def damped(v):
        return _axpy(cfg.damping, v, fvp(v))

    s, residual = conjugate_gradient(damped, g, iters=cfg.cg_iters)
    sFs = optax.tree.vdot(s, damped(s))
    beta = jnp.sqrt(2.0 * cfg.max_kl / jnp.maximum(sFs, 1e-30))
    full = jax.tree.map(lambda x: beta * x, s)

    def candidate(k):
        frac = cfg.backtrack_ratio ** k.astype(jnp.float32)
        theta = _axpy(frac, full, params)
        return theta, frac, gain(theta), kl(theta)

    def cond(c):
        k, accepted = c[0], c[1]
        return (k < cfg.backtrack_steps) & ~accepted

    def body(c):
        k, _, _, _, _ = c
        _, frac, up, d = candidate(k)
        ok = (up > 0) & (d <= cfg.max_kl) & jnp.isfinite(up) & jnp.isfinite(d)
        return k + 1, ok, frac, up, d

    grad_norm = optax.tree.norm(g)
    finite = jnp.isfinite(gain0) & jnp.isfinite(grad_norm)
    # a non-finite start: no candidate could be trusted (NaN logits or advantages), so none is tried
    init = (jnp.where(finite, 0, cfg.backtrack_steps).astype(jnp.int32), jnp.bool_(False), jnp.float32(0.0),
            jnp.float32(0.0), jnp.float32(0.0))
    k, accepted, frac, up, d = lax.while_loop(cond, body, init)
    frac = jnp.where(accepted, frac, 0.0)
    new = jax.tree.map(lambda taken, p: jnp.where(accepted, taken, p), _axpy(frac, full, params), params)
    metrics = {"surrogate_gain": jnp.where(accepted, up, 0.0), "kl": jnp.where(accepted, d, 0.0),
               "accepted": accepted.astype(jnp.float32), "step_fraction": frac, "sFs": sFs,
               "cg_residual": residual, "grad_norm": grad_norm,
               "backtracks": jnp.where(finite, k, 0).astype(jnp.float32), "skipped": (~finite).astype(jnp.float32)}
    return new, metrics
