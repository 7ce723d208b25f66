"""Decoder-only transformer of the Llama / Qwen family, in Flax linen.

Read top to bottom: RMSNorm, RoPE, attention (grouped-query, optional QKV bias
and q/k norm, KV cache), SwiGLU MLP, a block, the stack, the heads, and
`Model`, the pure-function wrapper everything else uses:

    model = Model(preset("tiny"))
    params = model.init(key)                              # plain nested dict
    hidden, _ = model.forward(params, tokens, attention_mask)   # [B, T, D]
    logits = model.logits(params, hidden)                 # [B, T, V] float32
    last = model.last_hidden(params, tokens, attention_mask)    # [B, D] at each row's last token

Shapes: B batch, T new tokens, S key/value slots (T without a cache, the
cache length with one), D model width, N query heads, K key/value heads,
G = N // K, H head width, F MLP width, V vocabulary, L layers.

Masking. Tokens sit in slots; a query in slot i attends a key in slot j iff
j <= i and slot j holds a real token (attention_mask / cache validity), and
(with packing) both carry the same segment id, or the key's segment is the
query's shared prefix (prefix_segment_ids: completions that read one copy of
their common prompt, `rljax.data.preference_collate`). A query with no such key
(a leading pad slot of a left-padded row) reads its own slot only (attention_impl
"xla"), so no hidden state mixes in later tokens. RoPE positions count real
tokens only, so left-padded prompts of mixed length get the positions they
would have unpadded, and decoding with a cache sees exactly the keys a full
forward pass over the same slots sees. Pad slots may hold any id, even one
outside the vocabulary: they are embedded as id 0.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from rljax.cpu_dots import dot_library
from rljax.models.config import HEADS, RopeScaling, TransformerConfig
from rljax.sharding import constrain

Array = jax.Array
NEG_INF = -1e30  # finite, so fully masked rows (pad queries) stay NaN-free


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    """A parameter annotated with its logical axis names (see rljax.sharding)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _out_dtype(dtype):
    """Matmul output dtype. float32 compute: float32. Low-precision compute:
    float32 output on CPU (XLA:CPU is fast only for bf16 inputs with float32
    results), the compute dtype on accelerators (whose matmul units accumulate
    in float32 internally and where activation bandwidth matters)."""
    if dtype == jnp.float32 or jax.default_backend() == "cpu":
        return jnp.float32
    return dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _low_precision_dot(x, w, dtype, out_dtype, transpose_w):
    """x [M, K] @ w ([K, N], or [N, K] when transpose_w) with inputs in `dtype`.

    A custom VJP keeps the backward matmuls in `dtype` too: differentiating a
    dot with a float32 `preferred_element_type` makes JAX emit float32 x
    float32 dots for the gradients, which throws the low-precision speed away.
    `swiglu_down`'s backward differentiates its down projection through this in float32 as well:
    the same products as plain autodiff there, except the weight gradient's orientation
    (`_contract_rows`).
    """
    return _low_precision_dot_fwd(x, w, dtype, out_dtype, transpose_w)[0]


def _low_precision_dot_fwd(x, w, dtype, out_dtype, transpose_w):
    xc, wc = x.astype(dtype), w.astype(dtype)
    dims = ((1,), (1,)) if transpose_w else ((1,), (0,))
    y = lax.dot_general(xc, wc, (dims, ((), ())), preferred_element_type=out_dtype)
    return y, (xc, wc, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _contract(a, b, a_axis: int, b_axis: int):
    """a [.., .] · b [.., .] over a's axis a_axis and b's axis b_axis (2-D), accumulated in float32.

    Dimension numbers, not `.T`: XLA:CPU (jax 0.10) computes `jnp.dot(g, w.T)` on bf16 inputs as a
    float32 × float32 product (the transpose reaches its dot passes as a separate op), whereas the
    same contraction stated as dimension numbers stays bf16 × bf16 (dx: ~8% off the bf16 train step
    on an avx512_bf16 EPYC). A contraction over the rows (dw): `_contract_rows`."""
    return lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), preferred_element_type=jnp.float32)


def _transposed_copy(a):
    """a [M, P] -> aᵀ [P, M] stored row-major: the transpose of a [M, P, 1] view, which XLA keeps as
    a copy instead of folding it into the consuming product's dimension numbers or layout."""
    m, p = a.shape
    return jnp.transpose(a.reshape(m, p, 1), (1, 2, 0)).reshape(p, m)


MIN_ROWS_FOR_TRANSPOSED_COPY = 128


def _contract_rows(a, b):
    """aᵀ b: a [M, P] and b [M, Q] contracted over their rows M -> [P, Q], accumulated in float32.

    A weight gradient (M = the batch's tokens). How XLA:CPU (jax 0.10) runs it depends on which
    library gets the product (`rljax.cpu_dots.dot_library`); for M of at least
    MIN_ROWS_FOR_TRANSPOSED_COPY rows (below that the forms differ within noise):

    Eigen's products (`dot_library`'s "eigen": every dtype on x86 CPUs with AVX2 and no AVX-512,
    float32 on those with avx512_bf16): a result wider in its rows than in its columns (P > Q: the
    MLP's down projection, a = the [M, F] hidden product, b = the [M, D] cotangent) runs at ~2/3 of
    the rate of the other orientation, so it is computed as bᵀ a [Q, P] and transposed back
    through `_transposed_copy` (a plain transpose is folded back into the product's dimension
    numbers). On a 2-core AVX2-only EPYC, float32: [17,408, 1,024]ᵀ [17,408, 256] 85.7-91.8 ->
    61.9-66.3 ms (bf16 under Eigen 87-90 -> 65-70 ms); the other orientation, [17,408, 256]ᵀ
    [17,408, 1,024], stays as it is (62-69 ms; swapped 84 ms).

    YNNPACK's bf16 products: XLA computes a bf16 product whose left operand contracts its leading
    axis as float32 × float32, with both operands converted to float32 first, even when the
    transpose is materialised (it keeps that as a column-major layout). So the narrower operand is
    copied into a row-major transpose and the product runs as a plain bf16 [P, M] @ [M, Q]; where
    b is the narrower, as bᵀ a, with its small [Q, P] result transposed back, again through
    `_transposed_copy` (a plain transpose there is folded into the product's dimension numbers, and
    the bf16 product XLA then leaves to its own dot runtime fails: "Unsupported element type"). On
    a 2-core Xeon with AMX: [256, 17,408] @ [17,408, 1,024] 13.8 ms with the copy against 54.5 ms
    as float32; [17,408, 1,024]ᵀ [17,408, 256] 11.5 ms copying the narrow operand against 19.5 ms
    copying the wide one. Whole bf16 gradient steps (d256 x 4 layers, MLP 1,024, against no copy,
    one process, alternated 6 times, faster in every round; docs/performance.md): 17,408 rows
    1,936 -> 1,764 ms against the wide copy, and against no copy 3,104 rows 331 -> 254 ms, 2,592
    rows 292 -> 229, 2,048 216 -> 158, 1,024 115 -> 84, 512 58 -> 44, 128 22 -> 19; 32 rows 10 ->
    9, within noise (hence the threshold). Copying the wide operand had made 3,104 rows slower (348
    -> 385 ms). YNNPACK's float32 products and accelerators take the contraction as it is."""
    if jax.default_backend() != "cpu" or a.shape[0] < MIN_ROWS_FOR_TRANSPOSED_COPY:
        return _contract(a, b, 0, 0)
    if dot_library(dtype=a.dtype) == "eigen":
        if b.shape[1] < a.shape[1]:
            return _transposed_copy(_contract(b, a, 0, 0))
        return _contract(a, b, 0, 0)
    if a.dtype == jnp.float32:
        return _contract(a, b, 0, 0)
    if b.shape[1] < a.shape[1]:
        return _transposed_copy(_contract(_transposed_copy(b), a, 1, 0))
    return _contract(_transposed_copy(a), b, 1, 0)


def _low_precision_dot_bwd(dtype, out_dtype, transpose_w, res, g):
    xc, wc, x_like, w_like = res
    g = g.astype(dtype)
    if transpose_w:  # y = x w^T: dx = g w, dw = g^T x
        dx, dw = _contract(g, wc, 1, 0), _contract_rows(g, xc)
    else:  # y = x w: dx = g w^T, dw = x^T g
        dx, dw = _contract(g, wc, 1, 1), _contract_rows(xc, g)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


def _transposed_spec(spec: str, operand: int) -> str:
    """The einsum spec of an einsum's cotangent for one operand: "X,Y->Z" gives "Z,Y->X" (operand 0)
    or "Z,X->Y" (operand 1). Valid where every index of an operand appears in the output or the
    other operand (no index summed within one operand alone), as in attention's two products."""
    ins, out = spec.split("->")
    a, b = ins.split(",")
    return f"{out},{b}->{a}" if operand == 0 else f"{out},{a}->{b}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_einsum(a, b, spec):
    """einsum(spec, a, b) of two low-precision operands, accumulated in and returned as float32, whose
    backward products take the cotangent rounded to the operands' dtype (as `_low_precision_dot`'s
    do): differentiated as written, a float32 cotangent makes both gradient products float32 x
    float32. In the bf16 GRPO update (d256 x 4 layers, 17,408 tokens; 2-core AMX Xeon) the attention
    backward's four products a layer ran at 50-76 GFLOP/s that way, 90-150 now: the step 1,645 ->
    1,572 ms, its buffer 1,693 -> 1,519 MiB (docs/performance.md)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _low_precision_einsum_fwd(a, b, spec):
    return _low_precision_einsum(a, b, spec), (a, b)


def _low_precision_einsum_bwd(spec, res, g):
    a, b = res
    g = g.astype(a.dtype)
    da = jnp.einsum(_transposed_spec(spec, 0), g, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(_transposed_spec(spec, 1), g, a, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def _attention_product(spec: str, a: Array, b: Array, low_precision_backward: bool = True) -> Array:
    """einsum(spec, a, b) accumulated in float32: through `_low_precision_einsum` where both operands
    share a low-precision dtype (and low_precision_backward), the plain einsum otherwise (float32
    compute, or a bf16 query over a float32 KV cache, which is never differentiated)."""
    if low_precision_backward and a.dtype == b.dtype and a.dtype != jnp.float32:
        return _low_precision_einsum(a, b, spec)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _dense(x: Array, w: Array, n_in: int, dtype, *, transpose_w: bool = False, f32_out: bool = False,
           low_precision_backward: bool = True) -> Array:
    """Contract the last `n_in` axes of x with the first `n_in` axes of w.

    Both sides are flattened to one 2-D matmul ([M, K] @ [K, N]): XLA:CPU runs
    the backward of a 2-D dot far faster than that of the equivalent einsum
    with leading batch-like axes. Inputs are cast to the compute dtype and the
    product accumulates in float32 (see _out_dtype for the result's dtype).
    transpose_w: w is [N, K] (a tied embedding used as the LM head);
    f32_out: always return float32 (the LM head: log-probabilities feed ratios);
    low_precision_backward: a low-precision product's backward in that precision too
    (`_low_precision_dot`; `TransformerConfig.low_precision_backward`).
    """
    lead, k = x.shape[: x.ndim - n_in], int(np.prod(x.shape[x.ndim - n_in:]))
    x2 = x.reshape(-1, k)
    out_shape = w.shape[:1] if transpose_w else w.shape[n_in:]
    w2 = w if transpose_w else w.reshape(k, -1)
    out_dtype = jnp.float32 if f32_out else _out_dtype(dtype)
    if dtype == jnp.float32 or not low_precision_backward:
        dims = ((1,), (1,)) if transpose_w else ((1,), (0,))
        y = lax.dot_general(x2.astype(dtype), w2.astype(dtype), (dims, ((), ())), preferred_element_type=out_dtype)
    else:
        y = _low_precision_dot(x2, w2, dtype, out_dtype, transpose_w)
    return y.reshape(*lead, *out_shape)


@jax.custom_jvp
def softmax(x: Array) -> Array:
    """softmax over the last axis, y = exp(x - max x) / Σ exp(x - max x), differentiated from its output
    alone: dy = y ⊙ (dx − Σ y ⊙ dx).

    Autodiff through exp / sum / divide keeps the unnormalised exponentials and the denominator
    broadcast to the scores' shape for the backward pass (two more [B, K, G, T, S] arrays per layer);
    this rule keeps y only. Written as a JVP, so forward-over-reverse (TRPO's Fisher-vector products)
    still works.
    """
    e = jnp.exp(x - lax.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = softmax(x)
    return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned as out_dtype."""

    eps: float
    axis_name: str = "embed"
    param_dtype: Any = jnp.float32
    out_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale.astype(jnp.float32)).astype(self.out_dtype)


def llama3_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Llama 3 scaled RoPE frequencies [H/2] float32 (the rule is in `RopeScaling`'s docstring).

    Computed in float64 on the host: they depend only on the config, so they are a constant
    of the compiled program.
    """
    freq = theta ** (-np.arange(head_dim // 2, dtype=np.float64) * 2.0 / head_dim)
    wavelen = 2 * np.pi / freq
    C, lo_f, hi_f = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    scaled = np.where(wavelen > C / lo_f, freq / scaling.factor, freq)
    smooth = (C / wavelen - lo_f) / (hi_f - lo_f)
    medium = (wavelen >= C / hi_f) & (wavelen <= C / lo_f)
    scaled = np.where(medium, (1 - smooth) * scaled / scaling.factor + smooth * scaled, scaled)
    return scaled.astype(np.float32)


def rope_tables(positions: Array, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[Array, Array]:
    """cos/sin tables for rotary embeddings, computed once per forward pass.

    positions [B, T] -> (cos, sin), each [B, T, 1, H]. With f_i = theta^(-2i/H),
    i < H/2: cos = [cos(p f), cos(p f)], sin = [-sin(p f), sin(p f)].
    `scaling` (Llama 3.x) rescales the low frequencies, see `llama3_frequencies`.
    """
    if scaling is None:
        freq = theta ** (-jnp.arange(head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    else:
        freq = jnp.asarray(llama3_frequencies(head_dim, theta, scaling))
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, H/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return (jnp.concatenate([cos, cos], -1)[:, :, None, :], jnp.concatenate([-sin, sin], -1)[:, :, None, :])


def read_slots(x: Array, read_at: Array) -> Array:
    """x [B, T, ...], read_at [B, R] int32 -> x[b, read_at[b, r]] as [B, R, ...] (R slots per row;
    read_at [B] reads one, [B, 1, ...])."""
    idx = read_at.reshape(read_at.shape[0], -1)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def rope(x: Array, tables: tuple[Array, Array], out_dtype=jnp.float32) -> Array:
    """Rotary embedding, "rotate half" layout (as in HF Llama/Qwen checkpoints), computed in
    float32 and returned as out_dtype.

    x: [B, T, heads, H]. With x = [x1, x2] split in halves:
      out = [x1 cos - x2 sin, x2 cos + x1 sin] = x * cos + [x2, x1] * sin_table.
    """
    cos, sin = tables
    half = x.shape[-1] // 2
    x = x.astype(jnp.float32)
    return (x * cos + jnp.concatenate([x[..., half:], x[..., :half]], axis=-1) * sin).astype(out_dtype)


class KVCache(struct.PyTreeNode):
    """Preallocated keys/values, one array per layer.

    k, v: tuples of L arrays [B, K, S, H] (`Model.cache_dtype()`; head-major so the
    decode-time score and mix matmuls read the cache without a transpose);
    valid: [B, S] bool, slot holds a real token; index: [] int32, next slot to write (a forward
    of T tokens needs index + T <= S: `check_cache_room`).
    """

    k: tuple
    v: tuple
    valid: Array
    index: Array

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def _stored(x: Array, dtype) -> Array:
    """x (in the compute dtype) as an operand of `dtype`: the KV cache's, when a float32 cache
    (`Model.cache_dtype`) serves a bf16 model. Widening is exact, but XLA, which allows itself
    excess precision, folds a float32 -> bf16 -> float32 convert pair and keeps the unrounded
    float32 value: it did so for the attention probabilities (decode logits then differed from a
    bf16 cache's by up to 5e-3 at 128 rows). `reduce_precision` keeps the rounding, so decoding over a float32
    cache gives a bf16 cache's results bit for bit (tests/test_model.py)."""
    if x.dtype == dtype:
        return x
    if jnp.finfo(dtype).bits > jnp.finfo(x.dtype).bits:
        info = jnp.finfo(x.dtype)
        return lax.reduce_precision(x.astype(dtype), exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return x.astype(dtype)


def _cudnn_attention(q, k, v, mask):
    """Fused GPU attention. q [B, T, N, H], k/v [B, S, K, H], mask [B, 1, T, S] bool.

    When the mask is causal with right padding only (the usual training batch)
    the kernel's own causal + sequence-length masking is exact and fastest;
    any other mask (left padding, packing) goes in as an additive bias. The
    choice is made on device with `lax.cond`, so results never depend on it.
    """
    T, S = mask.shape[-2:]
    lengths = mask[:, 0, -1, :].sum(axis=-1, dtype=jnp.int32)
    expected = (jnp.arange(S)[None, None, :] <= jnp.arange(T)[None, :, None]) & (
        jnp.arange(S)[None, None, :] < lengths[:, None, None])
    simple = jnp.all(mask[:, 0] == expected)

    def fast(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                            key_value_seq_lengths=lengths, implementation="cudnn")

    def general(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")

    return lax.cond(simple, fast, general, q, k, v)


class Attention(nn.Module):
    config: TransformerConfig
    mesh: Any = None

    @nn.compact
    def __call__(self, x, rope_cs, mask, kv, index, read_at=None):
        """x: [B, T, D]; rope_cs: cos/sin tables [B, T, 1, H]; mask: [B, 1, 1, T, S] bool; kv: this layer's cache (k, v) [B, K, S, H] or None.
        read_at [B, R] int32 (no cache): queries only at slots read_at[b] of each row; keys and
        values still at every slot.

        Returns ([B, T, D] ([B, R, D] with read_at) in the matmul output dtype, updated (k, v) or None).
        """
        c = self.config
        D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.dim_per_head
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(c.init_std)

        names = (("q_proj", N, "heads"), ("k_proj", K, "kv_heads"), ("v_proj", K, "kv_heads"))
        x_q, q_rope = x, rope_cs
        if read_at is not None:
            x_q, q_rope = read_slots(x, read_at), tuple(read_slots(t, read_at) for t in rope_cs)
            mask = jnp.take_along_axis(mask, read_at.reshape(read_at.shape[0], 1, 1, -1, 1), axis=3)  # [B, 1, 1, R, S]
        lpb = c.low_precision_backward
        q, k, v = (_dense(x_q if n == "q_proj" else x, _param(self, n, init, (D, h, H), ("embed", a, "head_dim"), pdt),
                          1, dt, low_precision_backward=lpb)
                   for n, h, a in names)
        if c.qkv_bias:
            q, k, v = (y + _param(self, n + "_bias", nn.initializers.zeros, (h, H), (a, "head_dim"), pdt)
                       for y, (n, h, a) in zip((q, k, v), names))
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, "head_dim", pdt, name="q_norm")(q)
            k = RMSNorm(c.norm_eps, "head_dim", pdt, name="k_norm")(k)
        q, k = rope(q, q_rope, c.stream_dtype), rope(k, rope_cs, c.stream_dtype)
        q = constrain(q, self.mesh, ("batch", "length", "act_heads", "head_dim"))
        B, T = q.shape[:2]

        if c.attention_impl == "cudnn" and kv is None and read_at is None:
            out = _cudnn_attention(q.astype(dt), k.astype(dt), v.astype(dt), mask[:, :, 0])
        else:
            k, v = k.astype(dt).transpose(0, 2, 1, 3), v.astype(dt).transpose(0, 2, 1, 3)  # [B, K, T, H]
            if kv is not None:
                # Write this step's keys/values in place; attend over all S slots.
                k = lax.dynamic_update_slice(kv[0], _stored(k, kv[0].dtype), (0, 0, index, 0))
                v = lax.dynamic_update_slice(kv[1], _stored(v, kv[1].dtype), (0, 0, index, 0))
                kv = (k, v)
            # Grouped-query attention without repeating k/v: q as [B, K, G, T, H].
            qg = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4).astype(dt)
            scores = _attention_product("bkgth,bksh->bkgts", qg, k, lpb) * H**-0.5
            scores = jnp.where(mask, scores, NEG_INF)
            probs = softmax(scores)
            probs = _stored(probs.astype(dt), v.dtype)  # a float32 cache: the bf16 probabilities, rounded
            out = _attention_product("bkgts,bksh->bkgth", probs, v, lpb)
            out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
        w_o = _param(self, "o_proj", init, (N, H, D), ("heads", "head_dim", "embed"), pdt)
        return _dense(out, w_o, 2, dt, low_precision_backward=lpb), kv


def _swiglu(gate: Array, up: Array, mesh=None) -> Array:
    return constrain(jax.nn.silu(gate) * up, mesh, ("batch", "length", "act_mlp"))


def swiglu_down(gate: Array, up: Array, w_down: Array, dtype, mesh=None) -> Array:
    """y = down(silu(gate) ⊙ up): gate, up [..., F], w_down [F, D] -> [..., D], whose backward pass
    keeps gate and up only and recomputes the rest from them.

    Differentiated as written, the products silu(gate), σ(gate) and h = silu(gate) ⊙ up stay alive
    from the forward to the backward pass too (two to four more [..., F] arrays per layer; XLA:CPU
    merges any recomputation with the forward's own copy). Here the backward rule recomputes, from
    g = gate + z, where z = 0 · Σ_D ct is a zero per row that depends on the incoming cotangent ct
    (so XLA can neither merge the recomputation with the forward nor run it before that row's
    cotangent exists; a non-finite cotangent row only makes that row's already non-finite gradient
    NaN), s = σ(g), silu = g s and h = silu ⊙ up, differentiates the down projection (`_dense`, so
    the same precision rules) for dh and dw, and writes the rest out:
        d up = dh ⊙ silu,    d gate = dh ⊙ up ⊙ (s + silu (1 - s))    (silu' = s (1 + g (1 - s))).
    Elementwise work only, no extra matmul. (Autodiff of silu(g) ⊙ u did the same sums through
    more intermediate [..., F] arrays in XLA:CPU's program: with this form the bf16 gradient step
    at the GRPO update's shape, 17,408 rows, 1,869 -> 1,814 ms (8 of 8 alternated rounds) and its
    buffer 1,757 -> 1,689 MiB; at the DPO step's, 3,104 rows, 272 -> 271 ms, 277 -> 285 MiB; float32
    482 -> 476 ms. Gradients the same up to rounding: 6e-7 of the largest in float32.) A
    custom VJP: reverse mode only (grad, vjp, reverse-over-reverse); forward mode (jvp, jacfwd)
    raises, and a model built with `TransformerConfig.recompute_swiglu=False` differentiates the
    plain expression instead.
    """
    act = functools.partial(_swiglu, mesh=mesh)

    @jax.custom_vjp
    def f(g, u, w):
        return _dense(act(g, u), w, 1, dtype)

    def fwd(g, u, w):
        return f(g, u, w), (g, u, w)

    def bwd(res, ct):
        gate, up, w = res
        g = gate + (0.0 * jnp.sum(ct, axis=-1, keepdims=True, dtype=jnp.float32)).astype(gate.dtype)
        s = jax.nn.sigmoid(g)
        silu = g * s
        h = constrain(silu * up, mesh, ("batch", "length", "act_mlp"))
        # the down projection's own backward, in float32 as well (its weight gradient through
        # `_contract_rows`); the same products as differentiating `_dense`, forward mode aside
        h2 = h.reshape(-1, h.shape[-1])
        _, dense_vjp = jax.vjp(lambda h2, w: _low_precision_dot(h2, w, dtype, _out_dtype(dtype), False), h2, w)
        dh, dw = dense_vjp(ct.reshape(-1, ct.shape[-1]))
        dh = dh.reshape(h.shape)
        d_gate = dh * up * (s + silu * (1 - s))
        return d_gate.astype(gate.dtype), (dh * silu).astype(up.dtype), dw

    f.defvjp(fwd, bwd)
    return f(gate, up, w_down)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (`swiglu_down` after the two input projections unless
    config.recompute_swiglu is off)."""

    config: TransformerConfig
    mesh: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        init = nn.initializers.normal(c.init_std)
        dt, pdt = c.compute_dtype, c.params_dtype
        dense = functools.partial(_dense, dtype=dt, low_precision_backward=c.low_precision_backward)
        gate = dense(x, _param(self, "gate", init, (c.d_model, c.mlp_dim), ("embed", "mlp"), pdt), 1)
        up = dense(x, _param(self, "up", init, (c.d_model, c.mlp_dim), ("embed", "mlp"), pdt), 1)
        w_down = _param(self, "down", init, (c.mlp_dim, c.d_model), ("mlp", "embed"), pdt)
        if c.recompute_swiglu:
            return swiglu_down(gate, up, w_down, dt, self.mesh)
        return dense(_swiglu(gate, up, self.mesh), w_down, 1)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    Signature fits `nn.scan` (carry x; the rest broadcast; kv out as "ys").
    """

    config: TransformerConfig
    mesh: Any = None

    @nn.compact
    def __call__(self, x, rope_cs, mask, kv, index, read_at=None):
        """read_at [B, R] int32: the block's output only at slots read_at[b] of each row, [B, R, D]
        (keys and values still come from every slot; see `Model.last_hidden`)."""
        c = self.config
        # The sums keep the stream's dtype (config.residual_dtype): a float32 matmul output (CPU)
        # added to a bf16 stream would otherwise promote it.
        st = c.stream_dtype
        a, kv = Attention(c, self.mesh, name="attn")(
            RMSNorm(c.norm_eps, param_dtype=c.params_dtype, out_dtype=st, name="attn_norm")(x),
            rope_cs, mask, kv, index, read_at)
        if read_at is not None:
            x = read_slots(x, read_at)
        x = x + a.astype(st)
        x = x + MLP(c, self.mesh, name="mlp")(
            RMSNorm(c.norm_eps, param_dtype=c.params_dtype, out_dtype=st, name="mlp_norm")(x)).astype(st)
        x = constrain(x, self.mesh, ("batch", "length", "act_embed"))
        return x, kv


_REMAT_POLICY = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_after_cotangent(fn, policy=None):
    """`jax.checkpoint(fn, policy=policy)` whose backward recomputation waits for the cotangent.

    Differentiated, `jax.checkpoint` keeps what `policy` saves (None: the inputs only) and
    recomputes the rest in the backward pass. In a loop unrolled in Python that recomputation
    reads only values the forward pass made, and XLA:CPU, which drops `jax.checkpoint`'s
    optimization barriers, either merges it with the forward pass's own ops or runs it inside the
    forward pass: an unrolled 4-layer DPO step kept 325 MiB of temporaries with `remat="full"` as
    without (inside `lax.scan` the backward loop body holds it apart: 144 against 389 MiB). Here
    the backward rule adds z = 0 * sum(cotangent) to every floating-point value the recomputation
    reads: XLA does not fold 0 * x for floats, so the recomputation depends on the cotangent,
    cannot be merged with the forward pass, and runs when the backward pass reaches the block
    (the same DPO step: 160 MiB). Values and gradients are `jax.checkpoint`'s (z = 0 for a finite
    cotangent; a non-finite one makes this block's gradients non-finite, as they would be anyway).
    """
    checkpointed = jax.checkpoint(fn, policy=policy)

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def fwd(*args):
        return jax.vjp(checkpointed, *args)  # (outputs, the pullback holding the saved values)

    def bwd(pullback, ct):
        z = jnp.zeros((), jnp.float32)
        for c in jax.tree.leaves(ct):
            if jnp.issubdtype(c.dtype, jnp.floating):  # not the float0 of integer outputs
                z = z + jnp.sum(c.astype(jnp.float32))
        z = z * 0.0

        def tie(v):
            return v + z.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v

        return jax.tree.map(tie, pullback)(ct)

    run.defvjp(fwd, bwd)
    return run


def traced_once(fn):
    """`fn` whose trace is cached and replayed: called with a traced argument (inside jit, grad,
    a loop body), it is traced once per distinct input shapes and structure and its jaxpr inlined
    into the caller's trace on every call (`jax.jit(fn, inline=True)`): the equations tracing
    `fn` would give, without running its Python again. Called with concrete arrays only, `fn` runs
    as written (op by op), not as a compiled program of its own."""
    replay = jax.jit(fn, inline=True)

    @functools.wraps(fn)
    def call(*args):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
            return replay(*args)
        return fn(*args)

    return call


def split_layers(stacked, n_layers: int) -> tuple:
    """Stacked layer parameters ([L, ...] leaves) -> a tuple of L per-layer trees.

    One split per leaf (`jnp.split`, then a squeeze), so that the gradient with respect to a
    stacked leaf is one concatenation of the L per-layer gradients. Indexing w[i] L times instead
    transposes to L zero-padded [L, ...] copies summed, which XLA fuses into the consumer (the
    optimizer update) as L pads and adds per element: on an H200 the Adam update of Qwen2.5-0.5B's
    stacked MLP up-projection took 3.9 ms a step that way, eleven times its memory time.
    """
    leaves, treedef = jax.tree.flatten(stacked)
    parts = [[lax.squeeze(p, (0,)) for p in jnp.split(w, n_layers, axis=0)] for w in leaves]
    return tuple(jax.tree.unflatten(treedef, [leaf[i] for leaf in parts]) for i in range(n_layers))


class Transformer(nn.Module):
    config: TransformerConfig
    mesh: Any = None

    def setup(self):
        c = self.config
        init = nn.initializers.normal(c.init_std)
        self.embedding = _param(self, "embedding", init, (c.vocab_size, c.d_model), ("vocab", "embed"),
                                c.params_dtype)
        # Layer parameters are always stacked along a leading "layers" axis, so
        # checkpoints do not depend on how the layers are run (see _layers).
        block = Block
        if c.rematerialised:
            block = nn.remat(Block, policy=_REMAT_POLICY[c.remat], prevent_cse=False)
        self.layers = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=c.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.mesh, name="layers")
        self.final_norm = RMSNorm(c.norm_eps, param_dtype=c.params_dtype)
        if c.has_lm_head_matrix:
            self.lm_head = _param(self, "lm_head", init, (c.d_model, c.vocab_size), ("embed", "vocab"),
                                  c.params_dtype)
        # Scalar heads start at zero: V = 0 and r = 0 before training (OREO's
        # value initialisation; harmless for reward models).
        zeros = nn.initializers.zeros
        if "value" in c.heads:
            self.value_kernel = _param(self, "value_head", zeros, (c.d_model,), ("embed",), c.params_dtype)
            self.value_bias = _param(self, "value_bias", zeros, (), (), c.params_dtype)
        if "reward" in c.heads:
            A = c.reward_outputs  # one scalar reward, or A attributes
            self.reward_kernel = _param(self, "reward_head", zeros, (c.d_model,) if A == 1 else (c.d_model, A),
                                        ("embed",) if A == 1 else ("embed", None), c.params_dtype)
            self.reward_bias = _param(self, "reward_bias", zeros, () if A == 1 else (A,), () if A == 1 else (None,),
                                      c.params_dtype)

    def __call__(self, tokens, attention_mask, positions=None, cache: KVCache | None = None, segment_ids=None,
                 read_at=None, prefix_segment_ids=None):
        """tokens, attention_mask: [B, T] -> (hidden [B, T, D] float32, new cache or None);
        with read_at [B] int32 (no cache), hidden [B, D] at slot read_at[b] of each row; with
        read_at [B, R], hidden [B, R, D] at R slots of each row."""
        B, T = tokens.shape
        live = attention_mask.astype(bool)
        q_slot = jnp.arange(T)
        if cache is None:
            key_valid, k_slot, seen = live, q_slot, jnp.zeros((B,), jnp.int32)
        else:
            seen = cache.valid.sum(axis=-1, dtype=jnp.int32)
            key_valid = lax.dynamic_update_slice(cache.valid, live, (0, cache.index))
            q_slot, k_slot = cache.index + q_slot, jnp.arange(cache.length)
        mask = (k_slot[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]  # [B, T, S]
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packing) is for full forward passes, not KV-cache decoding")
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            if prefix_segment_ids is not None:  # a query also reads the (earlier) slots of its shared prefix
                same |= prefix_segment_ids[:, :, None] == segment_ids[:, None, :]
            mask &= same
        real_so_far = seen[:, None] + jnp.cumsum(live, axis=1, dtype=jnp.int32)  # [B, T] real tokens in slots <= q
        if self.config.attention_impl == "xla":
            # A query with no key (a leading pad slot) would spread its softmax uniformly over all S
            # slots, later tokens included; it reads its own slot instead. Pad slots only: a real
            # query always has its own key. (The cuDNN kernel keeps its own masking, whose fast path
            # recognises causal right-padded masks.)
            keyless = real_so_far == 0 if segment_ids is None else ~mask.any(axis=-1)
            mask |= (k_slot[None, :] == q_slot[:, None])[None] & keyless[:, :, None]
        if positions is None:
            positions = jnp.maximum(real_so_far - 1, 0)
        mask = mask[:, None, None]  # [B, 1(K), 1(G), T, S]

        # pad slots as id 0: a pad id outside the vocabulary would embed as NaN (jnp.take fills),
        # and NaN values at masked keys still reach every query (0 · NaN)
        x = jnp.take(self.embedding, jnp.where(live, tokens, 0), axis=0).astype(self.config.stream_dtype)
        x = constrain(x, self.mesh, ("batch", "length", "act_embed"))
        rope_cs = rope_tables(positions, self.config.dim_per_head, self.config.rope_theta,
                              self.config.rope_scaling)
        x, cache = self._layers(x, rope_cs, mask, cache, read_at)
        if cache is not None:
            cache = cache.replace(valid=key_valid, index=cache.index + T)
        if read_at is not None and read_at.ndim == 1:
            x = x[:, 0]
        return self.final_norm(x), cache

    def _layers(self, x, rope_cs, mask, cache, read_at=None):
        """Run the L blocks: `nn.scan` (one compiled body, fast compiles) when
        config.scan_layers, else a Python loop over static slices of the
        stacked parameters (no per-iteration slicing/stacking: faster steps on
        CPU). Decoding with a cache always loops, each layer writing its own
        cache array in place. With read_at, the last block runs its queries,
        attention output and MLP at those slots only (the first L - 1 blocks
        as usual, scanned or looped)."""
        c = self.config
        if read_at is not None and self.is_initializing():
            raise ValueError("read_at: not while initialising; Model.init builds the parameters")
        if cache is None and read_at is None and (c.scan_layers or self.is_initializing()):
            if isinstance(self.variables.get("params", {}).get("layers"), (tuple, list)):
                raise ValueError("unstacked layer parameters (Model.unstack_layers) are for decoding with a "
                                 "KV cache or scan_layers=False, not for a scanned full forward")
            x, _ = self.layers(x, rope_cs, mask, None, jnp.int32(0))
            return x, None
        block = Block(c, self.mesh, parent=None)
        index = jnp.int32(0) if cache is None else cache.index

        def run_block(layer_params, x, kv, read_at, rope_cs, mask, index):
            return block.apply({"params": layer_params}, x, rope_cs, mask, kv, index, read_at)

        # Under a trace the blocks' shapes repeat: one block is traced and its jaxpr replayed for the
        # others, without flax's per-block Python work (the offline DPO step's trace 0.45 -> 0.29 s
        # with 4 layers, 1.02 -> 0.50 s with 8, a 24-layer value_and_grad's 2.0 -> 0.8 s; the
        # same compiled program)
        run_block = traced_once(run_block)

        def apply_block(layer_params, x, kv, read_at=None):
            return run_block(layer_params, x, kv, read_at, rope_cs, mask, index)

        if c.rematerialised and cache is None:
            apply_block = remat_after_cotangent(apply_block, _REMAT_POLICY[c.remat])
        layers = self.variables["params"]["layers"]
        if read_at is not None and c.scan_layers and not isinstance(layers, (tuple, list)):
            # the first L - 1 layers in one scanned body, as nn.scan runs them (Model.forward
            # allows read_at without a cache only)
            first = jax.tree.map(lambda w: w[:-1], layers)
            x, _ = lax.scan(lambda h, p: (apply_block(p, h, None)[0], None), x, first)
            return apply_block(jax.tree.map(lambda w: w[-1], layers), x, None, read_at)[0], None
        if not isinstance(layers, (tuple, list)):  # stacked (see Model.unstack_layers)
            layers = split_layers(layers, c.n_layers)
        ks = list(cache.k) if cache is not None else [None] * c.n_layers
        vs = list(cache.v) if cache is not None else [None] * c.n_layers
        for i in range(c.n_layers):
            layer_params = layers[i]
            kv = None if cache is None else (ks[i], vs[i])
            x, kv = apply_block(layer_params, x, kv, read_at if i == c.n_layers - 1 else None)
            if kv is not None:
                ks[i], vs[i] = kv
        if cache is not None:
            cache = cache.replace(k=tuple(ks), v=tuple(vs))
        return x, cache

    def lm_logits(self, hidden):
        """hidden [..., D] -> logits [..., V] float32."""
        dense = functools.partial(_dense, n_in=1, dtype=self.config.compute_dtype, f32_out=True,
                                  low_precision_backward=self.config.low_precision_backward)
        if self.config.tie_embeddings:
            logits = dense(hidden, self.embedding, transpose_w=True)
        else:
            logits = dense(hidden, self.lm_head)
        return logits

    def values(self, hidden):
        """Per-token scalar: hidden [..., D] -> [...] float32 ([B, T] per token, [B] from `Model.last_hidden`)."""
        return hidden @ self.value_kernel.astype(jnp.float32) + self.value_bias.astype(jnp.float32)

    def rewards(self, hidden, attention_mask):
        """Sequence reward read at the last real token: [B, T, D], [B, T] -> [B] float32
        ([B, A] with reward_outputs A > 1)."""
        h = hidden[jnp.arange(hidden.shape[0]), last_token_index(attention_mask)]
        return self.token_rewards(h)

    def token_rewards(self, hidden):
        """The reward head at every position (verifiers, process reward models): [..., D] -> [...] float32
        ([..., A] with reward_outputs A > 1)."""
        return hidden @ self.reward_kernel.astype(jnp.float32) + self.reward_bias.astype(jnp.float32)

    def init_all(self, tokens, attention_mask):
        """Touches every head so `init` creates all parameters."""
        hidden, _ = self(tokens, attention_mask)
        c = self.config
        if "lm" in c.heads:
            self.lm_logits(hidden)
        if "value" in c.heads:
            self.values(hidden)
        if "reward" in c.heads:
            self.rewards(hidden, attention_mask)
        return hidden


OPT_LEVEL_OPTION = "xla_backend_optimization_level"
INIT_CPU_OPTIONS = {OPT_LEVEL_OPTION: 2}  # what init_compiler_options gives on CPU


def init_compiler_options(platform: str | None = None) -> dict | None:
    """`jax.jit(compiler_options=...)` for the program that initialises a model's parameters on
    `platform` (default: jax's default backend): LLVM's -O2 on CPU, where XLA compiles with -O3 by
    default, else None. The initialisers run once per model, and at -O2 their program compiles in
    0.9-1.2 s against 1.4-1.8 s (the tiny and small presets and a d256 x 4-layer model, 2-core AMX
    Xeon) with the same parameters bit for bit (tests/test_model.py). A level the user set in
    XLA_FLAGS stays in force."""
    platform = platform or jax.default_backend()
    if platform != "cpu" or OPT_LEVEL_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    return dict(INIT_CPU_OPTIONS)


def _init_params_fn(model: "Model", key: Array) -> dict:
    return nn.meta.unbox(model._init_boxed(key))["params"]


_init_params = jax.jit(_init_params_fn, static_argnums=0)
_init_params_cpu = jax.jit(_init_params_fn, static_argnums=0, compiler_options=INIT_CPU_OPTIONS)


def last_token_index(attention_mask: Array) -> Array:
    """Index of the last real token of each row, from the mask (never from a pad id).

    attention_mask [B, T] -> [B] int32; works for left and right padding.
    """
    T = attention_mask.shape[1]
    return (T - 1 - jnp.argmax(attention_mask[:, ::-1].astype(bool), axis=1)).astype(jnp.int32)


def check_tokens(tokens, attention_mask, vocab_size: int, name: str = "tokens") -> None:
    """Raise a ValueError naming the problem: wrong rank, mask shape, or (for
    concrete arrays; traced values cannot be inspected) real tokens' ids outside [0, V).
    Pad slots (attention_mask 0) may hold any id: the model embeds them as id 0."""
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be [batch, length], got shape {tokens.shape}")
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} does not match {name} shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
    if isinstance(tokens, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer):
        return
    t, m = np.asarray(tokens), np.asarray(attention_mask).astype(bool)
    outside = m & ((t < 0) | (t >= vocab_size))
    if outside.any():
        b, i = map(int, np.argwhere(outside)[0])
        raise ValueError(f"{name}[{b}, {i}] = {int(t[b, i])} is outside the vocabulary [0, {vocab_size})")


def check_cache_room(cache: "KVCache", shape: tuple[int, ...]) -> None:
    """Refuse to decode tokens of `shape` [B, T] into `cache` when its rows differ from B or, for a
    concrete cache.index, when index + T > cache.length (the slots past the end do not exist, and
    `lax.dynamic_update_slice` would clamp the write onto earlier slots): a ValueError naming the
    index, T and the cache length. A traced index (under jit) is not checked: the caller sizes the
    cache (`Model.forward`)."""
    B, T = shape
    if cache.valid.shape[0] != B:
        raise ValueError(f"cache has {cache.valid.shape[0]} rows but tokens have {B}")
    if isinstance(cache.index, jax.core.Tracer):
        return
    index = int(cache.index)
    if index + T > cache.length:
        raise ValueError(f"KV cache overflow: {T} new tokens at cache.index={index} need {index + T} slots, "
                         f"but the cache has length {cache.length}; allocate a longer cache "
                         f"(Model.init_cache(batch, length) with length >= prompt + new tokens)")


def check_scorer(scorer, model, name: str) -> None:
    """Refuse `scorer`, a model that scores the tokens `model` samples (a distillation teacher, the
    start policy of a KL), when its vocabulary cannot hold model's token ids or its max_seq_len is
    shorter than model's rows: a ValueError naming `name`. A larger vocabulary is allowed: the
    same tokenizer's embedding table padded further (Qwen2.5's 0.5B-3B have 151,936 rows, 7B+
    152,064); only a shared tokenizer makes the scores mean anything, which the sizes cannot show."""
    v_s, v_m = scorer.config.vocab_size, model.config.vocab_size
    if v_s < v_m:
        raise ValueError(f"{name}: its vocab_size {v_s} is smaller than the policy's {v_m}, so it cannot score the "
                         f"policy's token ids >= {v_s}; both must share one tokenizer (a larger, padded vocabulary "
                         "of the same tokenizer is fine)")
    if scorer.config.max_seq_len < model.config.max_seq_len:
        raise ValueError(f"{name}: its max_seq_len {scorer.config.max_seq_len} is shorter than the policy's "
                         f"{model.config.max_seq_len}; it must score every sampled row")


def check_params_fit(params, model, name: str, hint: str = "") -> None:
    """Refuse `params` that are not `model`'s (another architecture: other parameter names or
    shapes; dtypes may differ): a ValueError naming `name`, the first parameter that differs and
    `hint`, where applying them would fail deep inside Flax."""
    def shapes(tree):
        return {jax.tree_util.keystr(path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    given, expected = shapes(params), shapes(model.param_shapes())
    for path in sorted(set(given) | set(expected)):
        if given.get(path) != expected.get(path):
            have = "missing" if path not in given else f"of shape {given[path]}"
            want = "no such parameter" if path not in expected else f"shape {expected[path]}"
            raise ValueError(f"{name}: parameter {path} is {have}, the model expects {want}{hint}")


def check_length(length: int, max_seq_len: int, *, packed: bool = False, cached: bool = False) -> None:
    """Refuse a full forward pass over more than `max_seq_len` positions: a ValueError naming both.

    The model is only meant for sequences up to max_seq_len (its context; the KV cache is
    sized by it), and nothing else stops a longer batch: RoPE tables are computed from the
    positions, so a [1, 16384] batch in a 512-token model gives a finite, meaningless loss.
    `length` is a static shape, so this check runs once per trace and costs nothing at run
    time. Packed rows (segment_ids) are exempt: positions restart in every segment, so the
    row may be wider than one example's context (the packer bounds each segment). Cached
    decoding is bounded by `Model.init_cache` instead (the cache holds at most max_seq_len).
    """
    if packed or cached:
        return
    if length > max_seq_len:
        raise ValueError(f"sequence length {length} exceeds the model's max_seq_len={max_seq_len}; "
                         f"truncate or drop longer rows when building the data (overlong=...)")


def check_positions(batch, max_seq_len: int, where: str) -> None:
    """A host batch whose rows carry their own positions (packed rows, the shared-prompt layout of
    preference pairs and reward-model pairs) must keep every real token's position below max_seq_len:
    `check_length` exempts such rows (their width may exceed the context), so without this a pair
    whose prompt + longer completion is past the context trains silently on positions the model
    was not built for (RoPE computes any position). Traced or device arrays are not inspected
    (the phases call this on the host batch, before placing it)."""
    positions = getattr(batch, "positions", None)
    if not isinstance(positions, np.ndarray) or positions.size == 0:
        return
    mask = getattr(batch, "attention_mask", None)
    real = positions[np.asarray(mask) > 0] if isinstance(mask, np.ndarray) and mask.shape == positions.shape \
        else positions
    if real.size and int(real.max()) >= max_seq_len:
        row = int(np.argwhere(positions == real.max())[0, 0])
        raise ValueError(f"{where}: row {row} of the batch reaches position {int(real.max())}, past the model's "
                         f"max_seq_len={max_seq_len} (its prompt and longest completion must fit the context); "
                         "truncate when collating (max_length=...)")


@dataclass(frozen=True)
class Model:
    """Pure-function interface to a `Transformer`; hashable, so it can be a static jit argument.

    `mesh` (optional) turns on activation sharding constraints from the rules
    table; parameters and batches get their shardings from `rljax.sharding`.
    """

    config: TransformerConfig
    mesh: Any = None

    @property
    def module(self) -> Transformer:
        return Transformer(self.config, self.mesh)

    def _init_boxed(self, key):
        tokens = jnp.zeros((1, 2), jnp.int32)
        return self.module.init(key, tokens, jnp.ones((1, 2), jnp.int32), method=Transformer.init_all)

    def init(self, key: Array) -> dict:
        """Random parameters as a plain nested dict (no partitioning boxes). Compiled, once per
        model: run op by op, the initialisers and the dummy forward pass that creates the
        parameters each compile on first use, many times slower than one program; on CPU that
        program is compiled at LLVM's -O2 (`init_compiler_options`).

        Also callable inside a transformation (`jax.jit`, `jax.eval_shape`, `jax.vmap`, as
        `param_shapes` and a sharded `create_state` do): jax refuses compiler options on a nested
        jit, so there the plain program is staged into the caller's and compiled with its options."""
        if init_compiler_options() is None or isinstance(key, jax.core.Tracer):
            return _init_params(self, key)
        try:
            return _init_params_cpu(self, key)
        except ValueError as e:
            # a concrete key closed over by a jitted caller: not a tracer, yet staged (jax offers no
            # public "am I traced"; `ensure_compile_time_eval` would run the initialisers op by op)
            if "compiler_options" not in str(e):
                raise
            return _init_params(self, key)

    def param_shapes(self) -> dict:
        """`jax.ShapeDtypeStruct` of every parameter, without allocating."""
        return jax.eval_shape(self.init, jax.random.key(0))

    def logical_axes(self) -> dict:
        """Logical axis names (a tuple per parameter), e.g. ('layers', 'embed', 'mlp')."""
        boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
        specs = nn.get_partition_spec(boxed)["params"]
        return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

    def forward(self, params, tokens, attention_mask=None, *, positions=None, cache=None, segment_ids=None,
                read_at=None, prefix_segment_ids=None):
        """tokens [B, T] int32 -> (hidden [B, T, D] float32, updated cache or None).

        read_at [B] int32 (full passes only): hidden [B, D] at slot read_at[b] of each row
        instead ([B, R]: hidden [B, R, D] at R slots a row, e.g. the last token of each
        answer sharing a prompt). The last layer then computes its keys and values at every
        slot but its queries, attention output and MLP at those slots alone (with L layers, about 1/L of
        the forward and backward FLOPs saved); the values equal the full pass's hidden
        [b, read_at[b]] up to float rounding. `last_hidden` reads at the last real token.

        segment_ids [B, T] int32 (packing): a token attends only to earlier tokens of its own
        segment; prefix_segment_ids [B, T] (with segment_ids) names one more segment each
        token may read, its shared prefix (its own id where it has none). Several
        completions of one prompt then share a single copy of it: prompt (segment 1),
        completion a (2), completion b (3) in one row, positions continuing from the
        prompt in each completion, prefix_segment_ids 1 everywhere, give every completion
        token the hidden state it has in its own [prompt, completion] row.

        cache (decoding): the T tokens are written to slots cache.index .. cache.index + T - 1, which
        must exist (index + T <= cache.length): `check_cache_room` raises a ValueError otherwise
        when cache.index is concrete. Under jit it is traced and cannot be checked (past the end, the
        slot writes clamp and the results are wrong): the caller sizes the cache for the prompt and
        every new token (`Model.init_cache`), as the samplers do.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        check_tokens(tokens, attention_mask, self.config.vocab_size)
        check_length(tokens.shape[1], self.config.max_seq_len, packed=segment_ids is not None, cached=cache is not None)
        if prefix_segment_ids is not None and (segment_ids is None or jnp.shape(prefix_segment_ids) != tokens.shape):
            raise ValueError(f"prefix_segment_ids: needs segment_ids and the tokens' shape {tokens.shape}; got "
                             f"{jnp.shape(prefix_segment_ids)}" + ("" if segment_ids is not None else " without segment_ids"))
        if cache is not None:
            check_cache_room(cache, tokens.shape)
        if read_at is not None:
            if cache is not None:
                raise ValueError("read_at: for full forward passes, not KV-cache decoding")
            if jnp.shape(read_at)[:1] != tokens.shape[:1] or jnp.ndim(read_at) not in (1, 2):
                raise ValueError(f"read_at: slots per row, shape ({tokens.shape[0]},) or ({tokens.shape[0]}, R); got "
                                 f"{jnp.shape(read_at)}")
            read_at = jnp.asarray(read_at, jnp.int32)
        return self.module.apply({"params": params}, tokens, attention_mask, positions, cache, segment_ids, read_at,
                                 prefix_segment_ids)

    def last_hidden(self, params, tokens, attention_mask=None, *, segment_ids=None) -> Array:
        """hidden [B, D] float32 at each row's last real token (`last_token_index`): what the
        reward head, a value read at the end of a sequence, or a judge's next-token logits
        need, with the last layer run at that token only (`forward`'s read_at)."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        hidden, _ = self.forward(params, tokens, attention_mask, segment_ids=segment_ids,
                                 read_at=last_token_index(attention_mask))
        return hidden

    def unstack_layers(self, params) -> dict:
        """params with the stacked layer parameters ([L, ...] leaves under "layers") split into a
        tuple of L per-layer trees, which `forward` also takes (decoding with a cache, or
        scan_layers=False). Decoding loops call it once before their `while_loop`: indexing the
        stacked arrays inside the loop copies every layer's weights on every step (XLA does not
        hoist the slices), about 17 MB a step for a 4.2M-parameter model, 1 GB for a 0.5B one."""
        layers = params["layers"]
        if isinstance(layers, (tuple, list)):
            return params
        return {**params, "layers": split_layers(layers, self.config.n_layers)}

    def logits(self, params, hidden):
        """LM head: hidden [..., D] -> logits [..., V] float32."""
        return self.module.apply({"params": params}, hidden, method=Transformer.lm_logits)

    def values(self, params, hidden):
        """Value head: hidden [..., D] -> [...] float32 ([B, T, D] -> [B, T]; [B, D] -> [B])."""
        return self.module.apply({"params": params}, hidden, method=Transformer.values)

    def rewards(self, params, hidden, attention_mask):
        """Reward head at the last real token: -> [B] float32."""
        return self.module.apply({"params": params}, hidden, attention_mask, method=Transformer.rewards)

    def token_rewards(self, params, hidden):
        """Reward head at every position: hidden [B, T, D] -> [B, T] float32 (read at a
        step's last token by process reward models, at every completion token by verifiers)."""
        return self.module.apply({"params": params}, hidden, method=Transformer.token_rewards)

    def __call__(self, params, tokens, attention_mask=None, **kw):
        """Full forward to LM logits [B, T, V] float32 (materialises all logits)."""
        hidden, _ = self.forward(params, tokens, attention_mask, **kw)
        return self.logits(params, hidden)

    def cache_dtype(self):
        """The KV cache's dtype: the compute dtype, except float32 on CPU.

        XLA:CPU runs a decode step's attention products (per row and head, q [1, H] against the
        cache's k [S, H], then the probabilities against v) in float32 whatever their inputs: a
        bf16 cache is converted to float32 in every step, every layer, for keys and values, a
        full copy of the cache each time. A float32 cache is read as it is, and only the step's
        new keys and values are converted: bf16 sampling at the GRPO benchmark's shape (128 rows,
        128 new tokens, d256 x 4 layers) 2.02-2.09 -> 1.60-1.69 s, the same tokens
        (docs/performance.md). The cache takes twice the memory; it holds the same values (the
        keys and values are rounded to the compute dtype before they are written), and the
        products computed in float32 either way, so the results are the same."""
        c = self.config
        return jnp.float32 if jax.default_backend() == "cpu" else c.compute_dtype

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache for `batch` rows and `length` slots, of dtype `cache_dtype()`: room for
        `length` tokens in all (prompt and decoded), past which `forward` refuses to write
        (`check_cache_room`; under jit the caller keeps within it)."""
        c = self.config
        if length > c.max_seq_len:
            raise ValueError(f"cache length {length} exceeds config.max_seq_len={c.max_seq_len}")
        shape = (batch, c.n_kv_heads, length, c.dim_per_head)
        zeros = tuple(jnp.zeros(shape, self.cache_dtype()) for _ in range(c.n_layers))
        return KVCache(k=zeros, v=zeros, valid=jnp.zeros((batch, length), bool), index=jnp.int32(0))

    def cache_logical_axes(self) -> KVCache:
        kv = ("batch", "act_kv_heads", "length", "head_dim")
        layers = (kv,) * self.config.n_layers
        return KVCache(k=layers, v=layers, valid=("batch", "length"), index=())


def add_head(model: "Model", params: dict, head: str, **config_changes) -> tuple["Model", dict]:
    """(model with `head` added, params with its new parameters zero-initialised): a value
    or reward head on an existing backbone (e.g. an SFT checkpoint), which then starts at
    V = 0 / r = 0. config_changes go to the config too (e.g. reward_outputs=3). Other heads
    and params are kept; a no-op when the head is already there with the same config."""
    if head not in HEADS:
        raise ValueError(f"add_head: {head!r} is not a head; choose from {HEADS}")
    heads = model.config.heads if head in model.config.heads else model.config.heads + (head,)
    new = Model(model.config.replace(heads=heads, **config_changes), model.mesh)
    if new.config == model.config:
        return model, params
    shapes = new.param_shapes()
    # new head parameters (or ones whose shape changed, e.g. reward_outputs) start at zero
    extra = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()
             if k not in params or jax.tree.structure(v) != jax.tree.structure(params[k])
             or getattr(params[k], "shape", None) != getattr(v, "shape", None)}
    return new, {**{k: v for k, v in params.items() if k in shapes}, **extra}


def select_layers(model: "Model", params: dict, layers) -> tuple["Model", dict]:
    """(a model of len(layers) blocks, its params): the blocks `layers` (indices into model's, in the order
    given; e.g. range(k) for the first k, or range(0, L, 2) for every other one, as DistilBERT starts its
    student) with the embedding, final norm and heads kept. A smaller student that shares the teacher's
    tokenizer and width, initialised from it (on-policy distillation compares the two token by token).
    An index outside 0..L-1 or a repeated one is a ValueError naming it."""
    layers = [int(i) for i in layers]
    n = model.config.n_layers
    bad = [i for i in layers if not 0 <= i < n]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"select_layers: layers {layers} must be distinct indices in 0..{n - 1}"
                         + (f"; {bad} are not" if bad else ""))
    index = jnp.asarray(layers)
    new = Model(model.config.replace(n_layers=len(layers)), model.mesh)
    # every block parameter is stacked on a leading layer axis [L, ...]
    return new, {**params, "layers": jax.tree.map(lambda x: x[index], params["layers"])}
