"""GRPO's clipped-surrogate loss; its variants (Dr. GRPO, DAPO) are other defaults of this
config and of the group advantage estimator (`rljax.estimators.GroupAdvantageConfig`)."""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from rljax.data.batch import PolicyBatch
from rljax.losses.policy_gradient import _kl_terms, _policy_terms, _validate_common
from rljax.ops.aggregate import aggregate
from rljax.ops.surrogates import clipped_surrogate


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO (DeepSeekMath) per token: −min(ρ Â, clip(ρ, 1 − ε_low, 1 + ε_high) Â) + β k3,
    ρ = exp(ℓ − ℓ_old), aggregated by `aggregation`; Â from the group estimator.

    Variants are other defaults: Dr. GRPO (aggregation "constant" with constant = max
    completion length, β = 0; no std scaling in the estimator), DAPO (eps_high 0.28,
    token_mean, β = 0; the estimator drops equal-reward groups; overlong shaping is a reward).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    aggregation: str = "seq_mean_token_mean"
    constant: float | None = None

    def __post_init__(self):
        _validate_common(self)
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"GRPOConfig: need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, "
                             f"{self.eps_high}")


def grpo_loss(params, batch: PolicyBatch, *, model, cfg: GRPOConfig):
    out, mask = _policy_terms(params, batch, model)
    lp = out["logprobs"]
    surrogate, clipped = clipped_surrogate(lp, batch.old_logprobs, batch.advantages, eps_low=cfg.eps_low,
                                           eps_high=cfg.eps_high)
    kl, kl_metrics = _kl_terms(lp, batch, cfg, mask)
    loss = aggregate(surrogate + cfg.kl_coef * kl, mask, cfg.aggregation, constant=cfg.constant)
    ratio = jnp.exp(lp - batch.old_logprobs)
    return loss, {"clip_fraction": aggregate(clipped, mask, "token_mean"),
                  "ratio_mean": aggregate(ratio, mask, "token_mean"),
                  "entropy": aggregate(out["entropy"], mask, "token_mean"), **kl_metrics}
