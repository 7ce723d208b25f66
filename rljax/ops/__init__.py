"""Kernels: arrays in, per-token arrays out, no reductions (rlax style)."""
from rljax.ops.aggregate import AGGREGATIONS, aggregate
from rljax.ops.logprobs import entropy_from_logits, logprobs_from_logits, mean_logprob_from_logits

__all__ = ["AGGREGATIONS", "aggregate", "entropy_from_logits", "logprobs_from_logits", "mean_logprob_from_logits"]
