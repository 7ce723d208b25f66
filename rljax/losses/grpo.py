"""GRPO and its variants (Dr. GRPO, DAPO) as one loss with configurable defaults."""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from rljax.losses.policy_gradient import PolicyBatch, _kl_terms, _policy_terms, _validate_common
from rljax.ops.advantages import group_advantages, group_range
from rljax.ops.aggregate import aggregate
from rljax.ops.surrogates import clipped_surrogate


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO (DeepSeekMath): Â_i = (r_i − μ_g)/(σ_g + ε) per sequence, per token
    −min(ρ Â, clip(ρ, 1 − ε_low, 1 + ε_high) Â) + β k3, aggregated by `aggregation`.

    Variants are other defaults: Dr. GRPO (scale_by_std=False, aggregation
    "constant" with constant = max completion length), DAPO (eps_high 0.28,
    token_mean, kl_coef 0, drop_equal_groups, overlong shaping in the reward).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    aggregation: str = "seq_mean_token_mean"
    constant: float | None = None
    scale_by_std: bool = True
    std_eps: float = 1e-6
    drop_equal_groups: bool = False

    def __post_init__(self):
        _validate_common(self)
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"GRPOConfig: need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, "
                             f"{self.eps_high}")


def grpo_advantages(rewards, group_ids, cfg: GRPOConfig):
    """Group-normalised advantages [B]; with drop_equal_groups a group whose rewards
    are all equal is marked for removal (returned keep mask [B], 1 = keep)."""
    r = jnp.asarray(rewards, jnp.float32)
    g = jnp.asarray(group_ids)
    adv = group_advantages(r, g, scale_by_std=cfg.scale_by_std, eps=cfg.std_eps)
    keep = (group_range(r, g) > 0) if cfg.drop_equal_groups else jnp.ones(r.shape, bool)
    return adv, keep


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
