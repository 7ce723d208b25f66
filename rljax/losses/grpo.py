"""Group policy losses: GRPO's clipped surrogate (its variants Dr. GRPO and DAPO are other defaults
of this config and of the group advantage estimator, `rljax.estimators.GroupAdvantageConfig`) and
GSPO's sequence-level clipped surrogate, CISPO's clipped stop-gradient importance weight."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from rljax.data.batch import PolicyBatch
from rljax.losses.policy_gradient import _is_zero, _kl_terms, _policy_terms, _validate_common
from rljax.ops.aggregate import LOSS_WEIGHT, aggregate, aggregate_count, high_entropy_mask
from rljax.ops.kl import importance_weighted
from rljax.ops.surrogates import clipped_is_weight, clipped_surrogate, sequence_clipped_surrogate, sequence_ratio


def _ratio_metric(logprobs, old_logprobs, mask):
    """Token mean of ρ_t = exp(ℓ_t − ℓ^old_t) over the mask (a metric, no gradient). Off-mask ratios
    are selected out, not multiplied by 0: an overflowing one there (inf) would make the mean NaN."""
    on = mask > 0
    ratio = jnp.exp(jnp.where(on, logprobs - old_logprobs, 0.0))
    return aggregate(ratio, mask, "token_mean")


def _check_clip_config(cfg) -> None:
    """The common fields, and a clip range 0 <= eps_low < 1, eps_high >= 0 (GRPO, GSPO)."""
    _validate_common(cfg)
    if not (0 <= cfg.eps_low < 1 and cfg.eps_high >= 0):
        raise ValueError(f"{type(cfg).__name__}: need 0 <= eps_low < 1 and eps_high >= 0, got {cfg.eps_low}, "
                         f"{cfg.eps_high}")


def _check_entropy_quantile(cfg) -> None:
    rho = cfg.top_entropy_quantile
    if not (isinstance(rho, (int, float)) and 0 < rho <= 1):
        raise ValueError(f"{type(cfg).__name__}.top_entropy_quantile: must be in (0, 1] (1: every token), got {rho!r}")


def _high_entropy_only(per_token, entropy, mask, cfg, metrics: dict):
    """per_token [B, T] kept on the top cfg.top_entropy_quantile of the tokens by entropy (`high_entropy_mask`),
    0 on the others, which still count in the loss's denominator, as in TRL; adds the fraction of the masked
    tokens kept to metrics ("entropy_kept_fraction"). As it is for top_entropy_quantile = 1."""
    if cfg.top_entropy_quantile >= 1:
        return per_token
    keep = high_entropy_mask(entropy, mask, cfg.top_entropy_quantile)
    metrics["entropy_kept_fraction"] = aggregate(keep, mask, "token_mean")
    return per_token * keep


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO (DeepSeekMath) per token: −min(ρ Â, clip(ρ, 1 − ε_low, 1 + ε_high) Â) + β k3,
    ρ = exp(ℓ − ℓ_old), aggregated by `aggregation`; Â from the group estimator.
    kl_ratio_weighted: the KL term is ρ_t · k3_t (TRL's use_bias_correction_kl), an estimate of
    KL(π_θ ‖ π_ref) that stays unbiased when the tokens come from π_old (later minibatches and
    epochs), where plain k3 estimates it under π_old's token distribution.
    top_entropy_quantile ρ_H < 1: the surrogate of the tokens whose entropy H_t (under π_θ) is below the
    (1 − ρ_H) quantile of the batch's completion tokens' is 0 (Wang et al. 2025 train on the top 20%:
    ρ_H = 0.2; TRL's top_entropy_quantile); the KL term and the denominators keep every token, as in TRL.
    With gradient accumulation or minibatches the quantile is each micro-batch's, as TRL's.

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
    kl_ratio_weighted: bool = False
    top_entropy_quantile: float = 1.0

    def __post_init__(self):
        _check_clip_config(self)
        _check_entropy_quantile(self)


def grpo_loss(params, batch: PolicyBatch, *, model, cfg: GRPOConfig):
    out, mask = _policy_terms(params, batch, model)
    lp = out["logprobs"]
    surrogate, clipped = clipped_surrogate(lp, batch.old_logprobs, batch.advantages, eps_low=cfg.eps_low,
                                           eps_high=cfg.eps_high)
    masked: dict = {}
    surrogate = _high_entropy_only(surrogate, out["entropy"], mask, cfg, masked)
    kl, kl_metrics = _kl_terms(lp, batch, cfg, mask)
    if cfg.kl_ratio_weighted and not _is_zero(cfg.kl_coef):
        # off the mask ℓ = ℓ_old (ρ = 1, and the penalty there is 0): an overflowing ρ there would give inf·0
        lp_on = jnp.where(mask > 0, lp, batch.old_logprobs)
        kl = importance_weighted(kl, lp_on, batch.old_logprobs)
    loss = aggregate(surrogate + cfg.kl_coef * kl, mask, cfg.aggregation, constant=cfg.constant)
    return loss, {"clip_fraction": aggregate(clipped, mask, "token_mean"),
                  "ratio_mean": _ratio_metric(lp, batch.old_logprobs, mask),
                  "entropy": aggregate(out["entropy"], mask, "token_mean"), **kl_metrics, **masked,
                  LOSS_WEIGHT: aggregate_count(mask, cfg.aggregation)}


@dataclass(frozen=True)
class GSPOConfig:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, s_i = exp(mean_t (ℓ_t − ℓ^old_t)),
    clipped as a whole: L = mean_i −min(s_i Â_i, clip(s_i, 1 − ε_low, 1 + ε_high) Â_i) + β agg(k3).
    Defaults are the paper's (ε 3e-4 / 4e-4, β = 0): the ratio of a whole sequence moves far less
    than a token's. The KL term, when β > 0, is aggregated by `aggregation`."""

    eps_low: float = 3e-4
    eps_high: float = 4e-4
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "seq_mean_token_mean"
    constant: float | None = None

    def __post_init__(self):
        _check_clip_config(self)


def gspo_loss(params, batch: PolicyBatch, *, model, cfg: GSPOConfig):
    out, mask = _policy_terms(params, batch, model)
    lp = out["logprobs"]
    per_seq, clipped = sequence_clipped_surrogate(lp, batch.old_logprobs, batch.advantages, mask,
                                                  eps_low=cfg.eps_low, eps_high=cfg.eps_high)
    live = (mask.sum(axis=1) > 0).astype(jnp.float32)  # rows with no completion token (or dropped) do not count

    def row_mean(x):
        return (x * live).sum() / jnp.maximum(live.sum(), 1.0)

    kl, kl_metrics = _kl_terms(lp, batch, cfg, mask)
    loss = row_mean(per_seq) + cfg.kl_coef * aggregate(kl, mask, cfg.aggregation, constant=cfg.constant)
    metrics = {"clip_fraction": row_mean(clipped),
               "ratio_mean": row_mean(sequence_ratio(lp, batch.old_logprobs, mask)),
               "entropy": aggregate(out["entropy"], mask, "token_mean"), **kl_metrics}
    # a mean over live rows; with a KL term aggregated another way the loss has two denominators
    # and no one count makes accumulation exact, so it is left at equal micro-batch weights
    if cfg.kl_coef == 0 or cfg.aggregation == "seq_mean_token_mean":
        metrics[LOSS_WEIGHT] = live.sum()
    return loss, metrics


@dataclass(frozen=True)
class CISPOConfig:
    """CISPO (MiniMax-M1, 2025): L = −agg(sg(clip(ρ_t, 1 − ε_low, 1 + ε_high)) Â ℓ_t) + β agg(k3), a
    REINFORCE term whose importance weight is clipped and carries no gradient, so no token's
    gradient is dropped (PPO's clip zeroes the tokens outside the range). eps_low None: no lower
    bound (MiniMax-M1's setting); token_mean over the batch's completion tokens as in the paper.

    The weight's cap is 1 + ε_high, the paper's clip(r, 1 − ε_low, 1 + ε_high) form. The default
    ε_high = 4.0 gives a cap of 5: TRL's cispo loss is clamp(ρ, max=epsilon_high), a cap written
    without the 1 +, with recommended epsilon_high = 5.0 (ScaleRL's ε_max). TRL's
    epsilon_high = e is ε_high = e − 1 here. top_entropy_quantile: as `GRPOConfig`'s."""

    eps_low: float | None = None
    eps_high: float = 4.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token_mean"
    constant: float | None = None
    top_entropy_quantile: float = 1.0

    def __post_init__(self):
        _validate_common(self)
        _check_entropy_quantile(self)
        if self.eps_low is not None and not 0 <= self.eps_low <= 1:
            raise ValueError(f"CISPOConfig.eps_low: must be in [0, 1] or None, got {self.eps_low}")
        if self.eps_high < 0:
            raise ValueError(f"CISPOConfig.eps_high: must be >= 0, got {self.eps_high}")


def cispo_loss(params, batch: PolicyBatch, *, model, cfg: CISPOConfig):
    out, mask = _policy_terms(params, batch, model)
    lp = out["logprobs"]
    weight, clipped = clipped_is_weight(lp, batch.old_logprobs, eps_low=cfg.eps_low, eps_high=cfg.eps_high)
    adv = batch.advantages if batch.advantages.ndim == 2 else batch.advantages[:, None]
    masked: dict = {}
    pg = _high_entropy_only(-weight * jax.lax.stop_gradient(adv) * lp, out["entropy"], mask, cfg, masked)
    kl, kl_metrics = _kl_terms(lp, batch, cfg, mask)
    loss = aggregate(pg + cfg.kl_coef * kl, mask, cfg.aggregation, constant=cfg.constant)
    return loss, {"clip_fraction": aggregate(clipped, mask, "token_mean"),
                  "ratio_mean": _ratio_metric(lp, batch.old_logprobs, mask),
                  "entropy": aggregate(out["entropy"], mask, "token_mean"), **kl_metrics, **masked,
                  LOSS_WEIGHT: aggregate_count(mask, cfg.aggregation)}
