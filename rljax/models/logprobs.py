"""Token log-probabilities of a sequence under a model, chunked over time.

The LM head's output [B, T, V] dominates memory for large vocabularies; here at
most one chunk [B, C, V] of float32 logits exists at a time, in the forward and
(through rematerialisation) in the backward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops.logprobs import entropy_from_logits, logprobs_from_logits

# Chunk over time once B * T * V float32 logits would exceed this many elements (256 MiB).
MAX_LOGITS_ELEMENTS = 1 << 26


def _chunk_size(batch: int, length: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(int(chunk_size), length))
    if batch * length * vocab <= MAX_LOGITS_ELEMENTS:
        return length
    return max(1, MAX_LOGITS_ELEMENTS // (batch * vocab))


def head_logprobs(params, hidden, targets, *, model, chunk_size: int | None = None, with_entropy: bool = False):
    """Log-probabilities of `targets` from hidden states, chunked over time.

    hidden [B, T, D], targets [B, T] -> logprobs [B, T] (and entropy [B, T]).
    """
    B, T, _ = hidden.shape
    C = _chunk_size(B, T, model.config.vocab_size, chunk_size)

    def one(h, y):
        logits = model.logits(params, h)
        lp = logprobs_from_logits(logits, y)
        return (lp, entropy_from_logits(logits)) if with_entropy else (lp, jnp.zeros_like(lp))

    if C >= T:
        lp, ent = one(hidden, targets)
    else:
        n = -(-T // C)
        pad = n * C - T
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, -1).swapaxes(0, 1)
        y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, C).swapaxes(0, 1)
        # checkpoint: the backward recomputes each chunk's logits instead of storing all of them.
        body = jax.checkpoint(lambda carry, hy: (carry, one(*hy)))
        _, (lp, ent) = jax.lax.scan(body, None, (h, y))
        lp = lp.swapaxes(0, 1).reshape(B, n * C)[:, :T]
        ent = ent.swapaxes(0, 1).reshape(B, n * C)[:, :T]
    return (lp, ent) if with_entropy else lp


def token_logprobs_and_entropy(params, tokens, attention_mask=None, *, model, chunk_size: int | None = None,
                               segment_ids=None):
    """ℓ_t = log π(tokens[t+1] | tokens[:t+1]) and the entropy of π(· | tokens[:t+1]).

    tokens, attention_mask [B, T] -> (logprobs [B, T-1], entropy [B, T-1]), float32,
    both zero where tokens[t+1] is padding.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    hidden, _ = model.forward(params, tokens, attention_mask, segment_ids=segment_ids)
    lp, ent = head_logprobs(params, hidden[:, :-1], tokens[:, 1:], model=model, chunk_size=chunk_size,
                            with_entropy=True)
    live = attention_mask[:, 1:].astype(jnp.float32)
    return lp * live, ent * live


def token_logprobs(params, tokens, attention_mask=None, *, model, chunk_size: int | None = None, segment_ids=None):
    """ℓ_t = log π(tokens[t+1] | tokens[:t+1]); [B, T] -> [B, T-1] float32, zero on padding."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    hidden, _ = model.forward(params, tokens, attention_mask, segment_ids=segment_ids)
    lp = head_logprobs(params, hidden[:, :-1], tokens[:, 1:], model=model, chunk_size=chunk_size)
    return lp * attention_mask[:, 1:].astype(jnp.float32)
