"""Supervised fine-tuning: token cross-entropy on the loss mask."""
from __future__ import annotations

from dataclasses import dataclass

import chex
import jax.numpy as jnp

from rljax.data.batch import SequenceBatch
from rljax.models.logprobs import sequence_token_stats, target_mask
from rljax.ops.aggregate import AGGREGATIONS, LOSS_WEIGHT, aggregate, aggregate_count


@dataclass(frozen=True)
class SFTConfig:
    """normalisation: an `aggregate` mode ("token_mean" over the batch by default;
    "constant" divides the summed loss by B * `constant`). label_smoothing ε mixes
    the target with the uniform distribution: (1-ε) NLL + ε (-(1/V) Σ_v log p_v)."""

    normalisation: str = "token_mean"
    constant: float | None = None
    label_smoothing: float = 0.0
    chunk_size: int | None = None

    def __post_init__(self):
        if self.normalisation not in AGGREGATIONS:
            raise ValueError(f"SFTConfig.normalisation: {self.normalisation!r} not in {AGGREGATIONS}")
        if self.normalisation == "constant" and not (self.constant and self.constant > 0):
            raise ValueError("SFTConfig.constant: must be positive when normalisation='constant'")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"SFTConfig.label_smoothing: must be in [0, 1), got {self.label_smoothing}")


def sft_loss(params, batch: SequenceBatch, *, model, cfg: SFTConfig):
    """L = aggregate(m_t · ℓ'_t), ℓ'_t = -(1-ε) log p(y_{t+1}) - ε (1/V) Σ_v log p_v.

    batch: tokens, attention_mask, loss_mask [B, T] (+ segment_ids, positions for
    packing). The prediction of token t+1 counts where loss_mask[t+1] = 1 and, when
    packed, tokens t and t+1 belong to the same segment. Returns (loss, metrics);
    metrics[LOSS_WEIGHT] = aggregate_count(mask, normalisation), the count N with
    L = S / N, which makes gradient accumulation exact for every normalisation.
    """
    chex.assert_equal_shape([batch.tokens, batch.attention_mask, batch.loss_mask])
    if batch.segment_ids is not None and cfg.normalisation != "token_mean":
        # aggregate's per-sequence modes see rows, and a packed row holds several sequences: its examples would
        # be averaged as one (seq_mean_token_mean) or summed into one (seq_mean_token_sum, constant)
        raise ValueError(f"sft_loss: SFTConfig.normalisation={cfg.normalisation!r} is per sequence, but the batch is "
                         "packed (segment_ids: several sequences a row); use 'token_mean' with packing, or unpacked "
                         "rows")
    stats = ("logprobs", "mean_logprob") if cfg.label_smoothing > 0 else ("logprobs",)
    out = sequence_token_stats(params, batch.tokens, batch.attention_mask, model=model, stats=stats,
                               chunk_size=cfg.chunk_size, segment_ids=batch.segment_ids, positions=batch.positions)
    mask = target_mask(batch.loss_mask, batch.attention_mask)
    if batch.segment_ids is not None:  # no prediction across a packing boundary
        mask = mask * (batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1])
    nll = -out["logprobs"]
    per_token = nll
    if cfg.label_smoothing > 0:
        per_token = (1.0 - cfg.label_smoothing) * nll - cfg.label_smoothing * out["mean_logprob"]
    loss = aggregate(per_token, mask, cfg.normalisation, constant=cfg.constant)
    n_tokens = mask.sum()
    metrics = {
        "loss": loss,
        "nll": aggregate(nll, mask, "token_mean"),
        "tokens": n_tokens.astype(jnp.float32),
        # what the loss is a mean over (tokens for token_mean), so accumulated micro-batches
        # weigh as they would in one batch
        LOSS_WEIGHT: aggregate_count(mask, cfg.normalisation),
    }
    return loss, metrics
