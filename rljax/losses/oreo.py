"""OREO losses (Wang et al. 2024): a soft value and a policy from offline trajectories.

With ℓ_t = log π_θ(a_t|s_t) − log π_ref(a_t|s_t), terminal reward R and V_t the value
model at position t (all per-token arrays aligned with `token_logprobs`):

    value loss   L_V = agg_t (V_φ(s_t) − R + β Σ_{i≥t} sg[ℓ_i])²
    policy loss  L_π = agg_k (sg[V(s_k)] − R + β Σ_{i∈a_k} ℓ_i + sg[β Σ_{i after a_k} ℓ_i])²
                       + α · agg_t KL(π_θ ‖ π_ref)(s_t)

where the actions a_k are tokens (level "token"), reasoning steps ("step") or the whole
response ("response", only the k = 0 residual). The KL term is the exact
full-vocabulary KL from both models' logits (as the released code) or the k3 estimate
on the taken tokens. The value model is a separate backbone with a scalar value head
(`rljax.oreo_training.value_model_of`, `value_params_from`); the policy loss reads the values computed before the
value model's update (batch.values), the value loss the policy's log-ratios before its
update (batch.log_ratios): `rljax.oreo_training.make_oreo_step` fills both in one jitted step.
"""
from __future__ import annotations

from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp

from rljax.data.batch import OREOBatch
from rljax.losses.actor_critic import token_values
from rljax.models.logprobs import head_token_kl, head_token_stats, target_mask
from rljax.ops.aggregate import AGGREGATIONS, aggregate
from rljax.ops.kl import kl_k3
from rljax.ops.soft_bellman import first_completion_token, oreo_policy_residuals, oreo_value_residuals

# The paper's KL coefficient α for each action level.
OREO_LEVELS = {"token": 0.01, "step": 0.1, "response": 0.3}
OREO_KL_ESTIMATORS = ("exact", "k3")


@dataclass(frozen=True)
class OREOConfig:
    """beta β: the KL-regularised objective's temperature (paper 0.03); level: "token",
    "step" (needs batch.step_starts) or "response"; kl_coef α of the KL regulariser
    (None: the paper's value for the level, OREO_LEVELS); kl_estimator: "exact" (full
    vocabulary, from both models' logits) or "k3" (on the taken tokens); aggregation of
    the squared residuals and the KL over tokens/steps (default: mean over each row's
    actions, then over rows, the paper's 1/T Σ_t); chunk_size: positions per LM-head
    chunk (None: automatic)."""

    beta: float = 0.03
    level: str = "token"
    kl_coef: float | None = None
    kl_estimator: str = "exact"
    aggregation: str = "seq_mean_token_mean"
    chunk_size: int | None = None

    def __post_init__(self):
        bad = lambda field, why: ValueError(f"OREOConfig.{field}: {why}")  # noqa: E731
        if self.beta <= 0:
            raise bad("beta", f"must be positive, got {self.beta}")
        if self.level not in OREO_LEVELS:
            raise bad("level", f"{self.level!r} not in {tuple(OREO_LEVELS)}")
        if self.kl_coef is not None and self.kl_coef < 0:
            raise bad("kl_coef", f"must be >= 0 or None, got {self.kl_coef}")
        if self.kl_estimator not in OREO_KL_ESTIMATORS:
            raise bad("kl_estimator", f"{self.kl_estimator!r} not in {OREO_KL_ESTIMATORS}")
        if self.aggregation not in AGGREGATIONS or self.aggregation == "constant":
            raise bad("aggregation", f"{self.aggregation!r} not in "
                                     f"{tuple(a for a in AGGREGATIONS if a != 'constant')}")

    @property
    def alpha(self) -> float:
        return OREO_LEVELS[self.level] if self.kl_coef is None else self.kl_coef


# OREO by name, in the style of the other registries: the three action levels with their defaults.
OREO_METHODS = {f"oreo_{level}": OREOConfig(level=level) for level in OREO_LEVELS}

def action_starts(batch: OREOBatch, mask: jax.Array, level: str) -> jax.Array:
    """[B, T-1] float32: 1 where an action of the given level starts (token: every
    completion token; step: the first token of each step; response: the first
    completion token), aligned with `token_logprobs`."""
    if level == "token":
        return mask
    if level == "response":
        return first_completion_token(mask)
    if batch.step_starts is None:
        raise ValueError("OREOConfig.level='step' needs batch.step_starts: collate the trajectories with a "
                         "step separator (rljax.oreo_training.collate_trajectories(..., separator=...))")
    return batch.step_starts[:, 1:].astype(jnp.float32) * mask


def _check(batch: OREOBatch, name: str, field: str):
    if getattr(batch, field) is None:
        raise ValueError(f"{name}: batch.{field} is None; the OREO step fills it in (rljax.oreo_training.make_oreo_step)")
    chex.assert_shape(getattr(batch, field), (batch.tokens.shape[0], batch.tokens.shape[1] - 1))
    chex.assert_shape(batch.rewards, (batch.tokens.shape[0],))


def oreo_value_loss(params, batch: OREOBatch, *, model, cfg: OREOConfig):
    """L_V over every completion token, with batch.log_ratios the policy's ℓ_t (no
    gradient flows to them). model: the value model (a "value" head)."""
    return oreo_value_loss_on_values(token_values(params, batch.tokens, batch.attention_mask, model=model), batch,
                                     cfg=cfg)


def oreo_value_loss_on_values(values, batch: OREOBatch, *, cfg: OREOConfig):
    """`oreo_value_loss` given the value model's V_t [B, T-1] (differentiable in them), so a
    step that already ran the value forward pulls the gradient back through it."""
    _check(batch, "oreo_value_loss", "log_ratios")
    mask = target_mask(batch.loss_mask, batch.attention_mask)
    res = oreo_value_residuals(values, batch.log_ratios, batch.rewards, mask, beta=cfg.beta)
    loss = aggregate(res * res, mask, cfg.aggregation)
    first = first_completion_token(mask)
    return loss, {"value_loss": loss, "value_mean": aggregate(values, mask, "token_mean"),
                  "value_start": aggregate(values, first, "token_mean")}


def oreo_policy_terms(params, batch: OREOBatch, *, model, cfg: OREOConfig, ref_params):
    """(L_π, (metrics, log-ratios ℓ [B, T-1] with no gradient)): the policy loss and the
    log-ratios the value loss of the same step needs, from one forward pass of each model.
    batch.values holds V_t of the value model before its update."""
    _check(batch, "oreo_policy_loss", "values")
    hidden, _ = model.forward(params, batch.tokens, batch.attention_mask)
    ref_hidden, _ = model.forward(ref_params, batch.tokens, batch.attention_mask)
    ref_hidden = jax.lax.stop_gradient(ref_hidden)
    targets = batch.tokens[:, 1:]
    if cfg.kl_estimator == "exact":
        out = head_token_kl(params, hidden[:, :-1], ref_params, ref_hidden[:, :-1], targets, model=model,
                            chunk_size=cfg.chunk_size)
        logp, ref_logp, kl = out["logprobs"], out["ref_logprobs"], out["kl"]
    else:
        logp = head_token_stats(params, hidden[:, :-1], targets, model=model, chunk_size=cfg.chunk_size)["logprobs"]
        ref_logp = head_token_stats(ref_params, ref_hidden[:, :-1], targets, model=model,
                                    chunk_size=cfg.chunk_size)["logprobs"]
        kl = kl_k3(logp, jax.lax.stop_gradient(ref_logp))
    mask = target_mask(batch.loss_mask, batch.attention_mask)
    log_ratios = (logp - jax.lax.stop_gradient(ref_logp)) * mask
    starts = action_starts(batch, mask, cfg.level)
    res = oreo_policy_residuals(batch.values, log_ratios, batch.rewards, mask, starts, beta=cfg.beta)
    policy = aggregate(res * res, starts, cfg.aggregation)
    kl_term = aggregate(kl * mask, mask, cfg.aggregation)
    loss = policy + cfg.alpha * kl_term
    sg = jax.lax.stop_gradient(log_ratios)
    metrics = {"policy_loss": policy, "kl": kl_term, "log_ratio_sum": aggregate(sg, mask, "seq_mean_token_sum"),
               "residual_abs": aggregate(jnp.abs(res), starts, "token_mean")}
    return loss, (metrics, sg)


def oreo_policy_loss(params, batch: OREOBatch, *, model, cfg: OREOConfig, ref_params):
    """L_π with batch.values the value model's V_t (no gradient flows to them):
    `loss(params, batch, *, model, cfg, ref_params) -> (scalar, metrics)`."""
    loss, (metrics, _) = oreo_policy_terms(params, batch, model=model, cfg=cfg, ref_params=ref_params)
    return loss, metrics
