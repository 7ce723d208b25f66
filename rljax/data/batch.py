"""Batch dataclasses: fixed-shape arrays that flow into jitted steps."""
from __future__ import annotations

from flax import struct


@struct.dataclass
class SequenceBatch:
    """Token sequences for SFT-style losses.

    tokens, attention_mask, loss_mask: [B, T] int32 (loss_mask 1 on tokens that
    are predicted and count, e.g. completions; prompt tokens 0).
    segment_ids, positions: [B, T] int32 or None; set for packed sequences
    (examples sharing a row attend only within their segment; positions restart).
    """

    tokens: object
    attention_mask: object
    loss_mask: object
    segment_ids: object = None
    positions: object = None
