"""Token log-probabilities of a sequence under a model, chunked over time.

The LM head's output [B, T, V] dominates memory for large vocabularies; here at
most one chunk [B, C, V] of float32 logits exists at a time, in the forward and
(through rematerialisation) in the backward pass, C as large as `max_logits_elements`
allows (256 MiB of logits on a CPU, 1/16 of an accelerator's memory).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops.logits import entropy_from_logits, in_vocab, logprobs_from_logits, mean_logprob_from_logits

# Chunk over time once B * T * V float32 logits would exceed this many elements (256 MiB) on a CPU,
# where a step's activations share host memory with everything else (`max_logits_elements`).
MAX_LOGITS_ELEMENTS = 1 << 26


def max_logits_elements(device=None) -> int:
    """How many float32 logits one chunk may hold: MAX_LOGITS_ELEMENTS on a CPU; on an accelerator
    1/16 of the device's memory (`memory_stats()["bytes_limit"]`; 4 x MAX_LOGITS_ELEMENTS where the
    device does not say), never less than on a CPU.

    Why not one budget everywhere: on an H200 the 256 MiB budget cut Qwen2.5-0.5B's GRPO micro-batch
    of 32 rows x 383 predictions (vocabulary 151,936) into 30 chunks of 13 positions, each a
    [416, 896] x [896, 151936] product run in a rematerialised scan; 1/16 of its 139 GiB holds the
    whole micro-batch's logits.
    """
    device = device if device is not None else jax.local_devices()[0]
    if device.platform == "cpu":
        return MAX_LOGITS_ELEMENTS
    limit = (device.memory_stats() or {}).get("bytes_limit")
    return max(MAX_LOGITS_ELEMENTS, int(limit) // 64) if limit else 4 * MAX_LOGITS_ELEMENTS

# Per-token statistics of the next-token distribution that `head_token_stats` can return.
_STATS = {
    "logprobs": lambda logits, y: logprobs_from_logits(logits, y),
    "entropy": lambda logits, y: entropy_from_logits(logits),
    "mean_logprob": lambda logits, y: mean_logprob_from_logits(logits),
}


def live_targets(attention_mask: jax.Array) -> jax.Array:
    """[B, T] -> float32 [B, T-1]: m_t = a_{t+1} · a_t, whether entry t (the prediction of
    tokens[t+1] from slot t) is a real prediction: the target is a real token and so is the slot that
    predicts it.

    A pad slot predicts nothing: its query has no key to attend to (left padding: none before it),
    so its hidden state and its distribution are meaningless (they may even depend on later tokens).
    The first real token of a left-padded row is therefore not predicted, as in the unpadded row.
    """
    a = attention_mask.astype(jnp.float32)
    return a[:, 1:] * a[:, :-1]


def target_mask(loss_mask: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """float32 [B, T-1] mask aligned with `token_logprobs`: entry t counts the prediction of
    tokens[t+1] where it is a token to train on (loss_mask[t+1]) and a real prediction
    (`live_targets`: tokens[t+1] and tokens[t] both real), l_{t+1} · a_{t+1} · a_t."""
    return loss_mask[:, 1:].astype(jnp.float32) * live_targets(attention_mask)


def _chunk_size(batch: int, length: int, vocab: int, chunk_size: int | None, budget: int | None = None) -> int:
    """Positions per chunk: chunk_size if given, else the most whose [batch, C, vocab] logits fit
    `budget` elements (`max_logits_elements()`)."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), length))
    budget = max_logits_elements() if budget is None else budget
    if batch * length * vocab <= budget:
        return length
    return max(1, budget // (batch * vocab))


def head_token_stats(params, hidden, targets, *, model, stats=("logprobs",), chunk_size: int | None = None):
    """Statistics of the LM head's distribution at every position, chunked over time.

    hidden [B, T, D], targets [B, T] -> {name: [B, T] float32} for each name in
    `stats`: "logprobs" (log p(target)), "entropy", "mean_logprob" ((1/V) Σ_v log p_v).
    A target outside [0, V) (a padding id) gives a finite log-prob for the caller's mask to drop
    (`rljax.ops.logits.in_vocab`).
    """
    unknown = set(stats) - set(_STATS)
    if unknown:
        raise ValueError(f"unknown token statistics {sorted(unknown)}; choose from {sorted(_STATS)}")
    B, T, _ = hidden.shape

    def one(h, y):
        logits = model.logits(params, h)
        return {name: _STATS[name](logits, y) for name in stats}

    return _time_chunked(one, (hidden, targets), _chunk_size(B, T, model.config.vocab_size, chunk_size))


def head_token_kl(params, hidden, ref_params, ref_hidden, targets, *, model, chunk_size: int | None = None):
    """Log-probs of the targets under the policy and the reference, and the exact
    full-vocabulary KL(π_θ ‖ π_ref)(s_t) = Σ_v π_θ(v|s_t) (log π_θ(v|s_t) − log π_ref(v|s_t)),
    chunked over time like `head_token_stats` (both heads' logits of one chunk at a time).

    hidden, ref_hidden [B, T, D] (policy and reference backbones), targets [B, T] ->
    {"logprobs", "ref_logprobs", "kl"}: [B, T] float32 each. Padding targets outside [0, V) are
    clamped into it (`rljax.ops.logits.in_vocab`), as in `head_token_stats`.
    """
    B, T, _ = hidden.shape
    targets = in_vocab(targets, model.config.vocab_size)

    def one(h, rh, y):
        logp = jax.nn.log_softmax(model.logits(params, h), axis=-1)
        ref = jax.nn.log_softmax(model.logits(ref_params, rh), axis=-1)
        pick = lambda lp: jnp.take_along_axis(lp, y[..., None], axis=-1)[..., 0]  # noqa: E731
        return {"logprobs": pick(logp), "ref_logprobs": pick(ref), "kl": jnp.sum(jnp.exp(logp) * (logp - ref), -1)}

    # two heads' logits live at once: the chunk of a single head over twice the rows
    return _time_chunked(one, (hidden, ref_hidden, targets), _chunk_size(2 * B, T, model.config.vocab_size,
                                                                        chunk_size))


def _time_chunked(fn, arrays, C: int) -> dict:
    """fn(*arrays) -> {name: [B, T]}, evaluated on chunks of C positions along axis 1 in a
    rematerialised scan (the backward recomputes each chunk instead of storing its logits)."""
    B, T = arrays[0].shape[:2]
    if C >= T:
        return fn(*arrays)
    n = -(-T // C)
    pad = n * C - T

    def split(x):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(B, n, C, *x.shape[2:]).swapaxes(0, 1)

    body = jax.checkpoint(lambda carry, xs: (carry, fn(*xs)))
    _, out = jax.lax.scan(body, None, tuple(split(x) for x in arrays))
    return {k: v.swapaxes(0, 1).reshape(B, n * C)[:, :T] for k, v in out.items()}


def sequence_token_stats(params, tokens, attention_mask=None, *, model, stats=("logprobs",),
                         chunk_size: int | None = None, segment_ids=None, positions=None):
    """Per-token statistics of π(· | tokens[:t+1]) for t < T-1, zero where tokens[t+1] or tokens[t]
    is padding (`live_targets`: a pad slot predicts nothing, so the first real token of a left-padded
    row gets 0, as it has no entry in the unpadded row).

    tokens, attention_mask [B, T] -> {name: [B, T-1] float32}. Pad ids may lie outside the
    vocabulary: the results are those of pad id 0.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    hidden, _ = model.forward(params, tokens, attention_mask, segment_ids=segment_ids, positions=positions)
    out = head_token_stats(params, hidden[:, :-1], tokens[:, 1:], model=model, stats=stats, chunk_size=chunk_size)
    live = live_targets(attention_mask)
    return {k: v * live for k, v in out.items()}


def token_logprobs_and_entropy(params, tokens, attention_mask=None, *, model, chunk_size: int | None = None,
                               segment_ids=None):
    """ℓ_t = log π(tokens[t+1] | tokens[:t+1]) and the entropy of π(· | tokens[:t+1]).

    tokens, attention_mask [B, T] -> (logprobs [B, T-1], entropy [B, T-1]), float32,
    both zero where tokens[t+1] or tokens[t] is padding.
    """
    out = sequence_token_stats(params, tokens, attention_mask, model=model, stats=("logprobs", "entropy"),
                               chunk_size=chunk_size, segment_ids=segment_ids)
    return out["logprobs"], out["entropy"]


def token_logprobs(params, tokens, attention_mask=None, *, model, chunk_size: int | None = None, segment_ids=None):
    """ℓ_t = log π(tokens[t+1] | tokens[:t+1]); [B, T] -> [B, T-1] float32, zero where tokens[t+1] or
    tokens[t] is padding."""
    return sequence_token_stats(params, tokens, attention_mask, model=model, chunk_size=chunk_size,
                                segment_ids=segment_ids)["logprobs"]
