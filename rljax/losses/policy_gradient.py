"""Policy-gradient losses: REINFORCE (baselines, RLOO, SCST) and MRT; GRPO is in grpo.py.

Every loss is `loss(params, batch, *, model, cfg) -> (scalar, metrics)` over a
`PolicyBatch` that the algorithm's `prepare` step filled in on the host side of
the RL iteration (advantages from rewards, group ids, the sampler's and the
reference's log-probabilities). Log-probabilities are aligned with
`token_logprobs`: entry t scores tokens[t+1]; the mask is loss_mask[:, 1:].
"""
from __future__ import annotations

from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp

from rljax.data.batch import PolicyBatch
from rljax.models.logprobs import sequence_token_stats, target_mask
from rljax.ops.aggregate import AGGREGATIONS, LOSS_WEIGHT, aggregate, aggregate_count
from rljax.ops.kl import KL_ESTIMATORS, kl_k1, kl_k3

def _validate_common(cfg):
    if cfg.aggregation not in AGGREGATIONS:
        raise ValueError(f"{type(cfg).__name__}.aggregation: {cfg.aggregation!r} not in {AGGREGATIONS}")
    if cfg.aggregation == "constant" and cfg.constant is not None and not cfg.constant > 0:
        # None is left for the RL loop to fill in: RLConfig.algo sets the sampling's max_new_tokens
        raise ValueError(f"{type(cfg).__name__}.constant: must be positive with aggregation='constant' (or None: "
                         f"the maximum completion length, RLConfig's sampling.max_new_tokens), got {cfg.constant}")
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{type(cfg).__name__}.kl_estimator: {cfg.kl_estimator!r} not in {tuple(KL_ESTIMATORS)}")
    if cfg.kl_coef < 0:
        raise ValueError(f"{type(cfg).__name__}.kl_coef: must be >= 0, got {cfg.kl_coef}")


def _policy_terms(params, batch: PolicyBatch, model, with_entropy=True):
    stats = ("logprobs", "entropy") if with_entropy else ("logprobs",)
    out = sequence_token_stats(params, batch.tokens, batch.attention_mask, model=model, stats=stats)
    mask = target_mask(batch.loss_mask, batch.attention_mask)
    return out, mask


def _is_zero(coef) -> bool:
    """Whether a KL coefficient is a concrete 0 (a config's float; a traced one is never skipped)."""
    return isinstance(coef, (int, float)) and coef == 0


def _masked_pair(logprobs, ref_logprobs, mask):
    """(ℓ, ℓ^ref) with both set to 0 off the mask, so every estimator is exactly 0 there with a
    zero gradient. Selected (jnp.where), not multiplied: `aggregate` multiplies by the mask, and
    k3 = expm1(ℓ^ref − ℓ) overflows where a prompt or padding position has ℓ^ref − ℓ > 88.7, so
    inf·0 = NaN in the loss, and 0·inf = NaN in the gradient of a masked product."""
    on = mask > 0
    return jnp.where(on, logprobs, 0.0), jnp.where(on, ref_logprobs, 0.0)


def _kl_terms(logprobs, batch, cfg, mask):
    """(penalty [B, T-1], metrics): the per-token KL penalty (cfg's estimator) and k1/k3 metrics.
    The penalty is exactly 0 off the mask (`_masked_pair`), and everywhere when cfg.kl_coef is 0:
    the estimate is then skipped, because an in-mask k3 that overflows (ℓ^ref − ℓ > 88.7) would
    make 0·inf = NaN in kl_coef·penalty and in its gradient. Zeros, no metrics, without a reference."""
    if batch.ref_logprobs is None:
        if cfg.kl_coef > 0:
            raise ValueError("kl_coef > 0 needs batch.ref_logprobs (the reference policy's log-probs)")
        z = jnp.zeros_like(logprobs)
        return z, {}
    metrics = kl_metrics(logprobs, batch.ref_logprobs, mask)
    if _is_zero(cfg.kl_coef):
        return jnp.zeros_like(logprobs, dtype=jnp.float32), metrics
    lp, ref = _masked_pair(logprobs, batch.ref_logprobs, mask)
    return KL_ESTIMATORS[cfg.kl_estimator](lp, ref), metrics


def kl_metrics(logprobs, ref_logprobs, mask) -> dict:
    """Token means of the k1 and k3 estimates of KL(π ‖ π_ref) over `mask` ([B, T-1] each); off-mask
    positions are selected out first (`_masked_pair`) so they cannot turn the means into NaN."""
    lp, ref = _masked_pair(logprobs, ref_logprobs, mask)
    return {"kl_k1": aggregate(kl_k1(lp, ref), mask, "token_mean"),
            "kl_k3": aggregate(kl_k3(lp, ref), mask, "token_mean")}


# ----------------------------------------------------------------------------- REINFORCE family


@dataclass(frozen=True)
class ReinforceConfig:
    """REINFORCE's loss: L = −agg(A · ℓ_t) + β · agg(KL_t), with A from the advantage estimator
    (`rljax.estimators`: a baseline — none, batch mean, leave-one-out = RLOO, greedy decode =
    SCST, moving average — and optionally a KL penalty in the reward). The default
    aggregation, seq_mean_token_sum, is the textbook −E[(r − b) Σ_t ℓ_t]. kl_coef β here is a
    KL loss term (estimator kl_estimator) on the sampled tokens. On-policy, with no gradient
    through the sampling, its expected gradient at each token's state is: k2, that of
    β·KL(π‖π_ref) = β Σ_y π(y) log(π(y)/π_ref(y)), the divergence the estimator's KL in the reward
    also penalises (optimum π* ∝ π_ref exp(r/β)); k3, that of β·KL(π_ref‖π) = β Σ_y π_ref(y)
    log(π_ref(y)/π(y)), with π_ref first (optimum π(y) = β π_ref(y) / (β + E_π[r] − r(y)));
    k1, zero. The optima are a one-step bandit's with an unbiased baseline; a baseline that
    includes the sample itself (batch_mean over N rows) scales the reward term by (N − 1)/N, so β
    acts as β·N/(N − 1). tests/test_kl_optima.py measures both optima on a bandit."""

    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "seq_mean_token_sum"
    constant: float | None = None

    def __post_init__(self):
        _validate_common(self)


def reinforce_loss(params, batch: PolicyBatch, *, model, cfg: ReinforceConfig):
    chex.assert_rank(batch.advantages, 1)
    out, mask = _policy_terms(params, batch, model)
    lp = out["logprobs"]
    pg = -jax.lax.stop_gradient(batch.advantages)[:, None] * lp
    kl, kl_metrics = _kl_terms(lp, batch, cfg, mask)
    loss = aggregate(pg + cfg.kl_coef * kl, mask, cfg.aggregation, constant=cfg.constant)
    return loss, {"pg_loss": aggregate(pg, mask, cfg.aggregation, constant=cfg.constant),
                  "entropy": aggregate(out["entropy"], mask, "token_mean"), **kl_metrics,
                  LOSS_WEIGHT: aggregate_count(mask, cfg.aggregation)}


# ----------------------------------------------------------------------------- MRT


@dataclass(frozen=True)
class MRTConfig:
    """Minimum risk training: over each prompt's n samples, Q(y) = p(y)^α / Σ p(y')^α
    with log p(y) = Σ_t m_t ℓ_t, and L = mean over prompts of Σ_y Q(y) (1 − r(y)).
    Gradient flows through Q. α → 0: uniform Q (constant loss, no gradient)."""

    alpha: float = 0.5
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token_mean"  # only for the KL term
    constant: float | None = None

    def __post_init__(self):
        _validate_common(self)
        if self.alpha < 0:
            raise ValueError(f"MRTConfig.alpha: must be >= 0, got {self.alpha}")


def mrt_distribution(seq_logprobs, group_ids, alpha, valid=None):
    """Q_i = exp(α s_i) / Σ_{j in g(i), valid} exp(α s_j), a softmax within each group over its valid
    samples (valid [B] bool, default all; an invalid sample gets Q = 0, a group with none all 0). [B] -> [B]."""
    B = seq_logprobs.shape[0]
    valid = jnp.ones(B, bool) if valid is None else valid
    z = jnp.where(valid, alpha * seq_logprobs, -jnp.inf)
    zmax = jax.ops.segment_max(z, group_ids, num_segments=B)[group_ids]
    zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
    e = jnp.where(valid, jnp.exp(jnp.where(valid, z, 0.0) - jax.lax.stop_gradient(zmax)), 0.0)
    total = jax.ops.segment_sum(e, group_ids, num_segments=B)[group_ids]
    return e / jnp.where(total > 0, total, 1.0)


def mrt_loss(params, batch: PolicyBatch, *, model, cfg: MRTConfig):
    out, mask = _policy_terms(params, batch, model)
    lp = out["logprobs"]
    # a row with no counted token (a dropped or padding row) has log p = 0, i.e. p = 1: it would take the
    # group's mass, so it is left out of Q and of the count of groups
    valid = mask.sum(axis=1) > 0
    q = mrt_distribution((lp * mask).sum(axis=1), batch.group_ids, cfg.alpha, valid)
    cost = 1.0 - batch.rewards.astype(jnp.float32)
    B = q.shape[0]
    n_groups = jnp.maximum((jax.ops.segment_sum(valid.astype(jnp.float32), batch.group_ids, num_segments=B)
                            > 0).sum(), 1)
    risk = (q * cost).sum() / n_groups
    kl, kl_metrics = _kl_terms(lp, batch, cfg, mask)
    loss = risk + cfg.kl_coef * aggregate(kl, mask, cfg.aggregation, constant=cfg.constant)
    return loss, {"risk": risk, "entropy": aggregate(out["entropy"], mask, "token_mean"), **kl_metrics}
