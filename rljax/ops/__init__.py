"""Kernels: arrays in, per-token arrays out, no reductions (rlax style)."""
from rljax.ops.logprobs import entropy_from_logits, logprobs_from_logits

__all__ = ["entropy_from_logits", "logprobs_from_logits"]
