"""Kernels: arrays in, per-token arrays out, no reductions (rlax style)."""
from rljax.ops.advantages import (discounted_returns, gae, group_advantages, group_range, group_stats,
                                  leave_one_out_baseline, place_at_last, whiten)
from rljax.ops.aggregate import AGGREGATIONS, LOSS_WEIGHT, aggregate, aggregate_count, high_entropy_mask
from rljax.ops.kl import KL_ESTIMATORS, importance_weighted, kl_k1, kl_k2, kl_k3
from rljax.ops.logits import entropy_from_logits, logprobs_from_logits, mean_logprob_from_logits
from rljax.ops.preference_kernels import (hinge_preference, ipo, kto, kto_reference_point, log_odds, odds_ratio,
                                  robust_preference, sequence_logps, sigmoid_preference, simpo)
from rljax.ops.surrogates import clipped_is_weight, clipped_surrogate, sequence_clipped_surrogate, sequence_ratio

__all__ = [
    "hinge_preference", "ipo", "kto", "kto_reference_point", "log_odds", "odds_ratio", "robust_preference",
    "sequence_logps", "sigmoid_preference", "simpo",
    "AGGREGATIONS", "KL_ESTIMATORS", "LOSS_WEIGHT", "aggregate", "aggregate_count", "high_entropy_mask", "clipped_is_weight", "clipped_surrogate", "discounted_returns", "sequence_clipped_surrogate",
    "sequence_ratio",
    "entropy_from_logits", "gae", "group_advantages", "group_range", "group_stats", "importance_weighted",
    "kl_k1", "kl_k2", "kl_k3",
    "leave_one_out_baseline", "logprobs_from_logits", "mean_logprob_from_logits", "place_at_last", "whiten",
]
