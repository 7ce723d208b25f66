"""Transformer configuration and presets.

One dataclass covers the Llama / Qwen decoder family; a preset is just a
`TransformerConfig` with other numbers. Configs are frozen and hashable so a
`Model` holding one can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

HEADS = ("lm", "value", "reward")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_SCALING_TYPES = ("llama3",)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x RoPE frequency scaling (`rope_scaling` with `rope_type: "llama3"` in HF configs).

    With base frequencies f_i = theta^(-2i/H) and wavelengths w_i = 2 pi / f_i, C =
    original_max_position_embeddings, lo = C / low_freq_factor, hi = C / high_freq_factor:
      w_i < hi (high frequencies):  f_i unchanged,
      w_i > lo (low frequencies):   f_i / factor,
      otherwise, with s = (C / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor):
                                    (1 - s) f_i / factor + s f_i.
    cos/sin are not rescaled (Llama 3's attention factor is 1).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"RopeScaling.rope_type: {self.rope_type!r} not in {ROPE_SCALING_TYPES}")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor: must be positive, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"RopeScaling: need 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor} and {self.high_freq_factor}")
        if int(self.original_max_position_embeddings) <= 0:
            raise ValueError(f"RopeScaling.original_max_position_embeddings: must be positive, got "
                             f"{self.original_max_position_embeddings}")


class ConfigFieldError(ValueError):
    """An invalid `TransformerConfig` field; `field` names it (the message starts
    "TransformerConfig.<field>: "), so a loader can say which entry of its own file set it."""

    def __init__(self, field: str, why: str):
        super().__init__(f"TransformerConfig.{field}: {why}")
        self.field = field


@dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a decoder-only transformer.

    Attributes:
      vocab_size: V, rows of the token embedding.
      d_model: D, width of the residual stream.
      n_layers: L.
      n_heads: N query heads.
      n_kv_heads: K key/value heads (grouped-query attention; N % K == 0).
      mlp_dim: F, hidden width of the SwiGLU MLP.
      head_dim: H, per-head width; defaults to D // N.
      rope_theta: RoPE base frequency (Llama-3: 5e5, Qwen2.5: 1e6).
      rope_scaling: a `RopeScaling` (Llama 3.1+ frequency scaling) or None (plain RoPE).
      norm_eps: RMSNorm epsilon.
      qkv_bias: bias on the q/k/v projections (Qwen2).
      qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3).
      tie_embeddings: the LM head reuses the token embedding.
      max_seq_len: longest sequence the model is used with (KV-cache bound).
      max_position_embeddings: the context its source checkpoint advertises (Hugging Face
        `max_position_embeddings`), kept when loading with max_seq_len overridden (lowered to
        bound the KV cache, say) so that `save_pretrained` writes it back instead of the
        override; None (a model built here, or loaded without changing max_seq_len): just
        max_seq_len. Not used in the computation.
      scan_layers: run the layers with `nn.scan` (one compiled body: fast
        compiles for deep models) or a Python loop (faster steps on CPU, about
        12% on the `tiny`/`small` shapes). Parameters are stacked along a
        leading `layers` axis either way, so checkpoints are interchangeable.
      remat: rematerialisation of each layer in the backward pass:
        "none", "full" (recompute everything), "dots" (save matmul outputs).
        Less memory for more compute: on CPU the DPO benchmark's step buffer
        325 -> 160 MiB ("full", 1.21x the step time) or 244 MiB ("dots",
        1.04x). Unrolled layers recompute through
        `transformer.remat_after_cotangent`, which keeps XLA:CPU from running
        the recomputation inside the forward pass (docs/performance.md,
        "Memory"). On CPU such train steps compile with XLA's loop emitters
        (`rljax.cpu_dots.LOOP_EMITTERS`): the compile, which otherwise held
        more memory than the smaller step buffer, no longer sets the peak.
      recompute_swiglu: the MLP's backward pass keeps only gate(x) and up(x)
        and recomputes silu(gate) * up from them (`transformer.swiglu_down`:
        elementwise work only; the DPO step's buffer on CPU 431 -> 333 MiB at
        the same speed and results). It is a custom VJP, so forward-mode
        autodiff through the model (jvp, jacfwd) needs False; TRPO's
        Fisher-vector products (forward-over-reverse) switch it off for their
        KL term.
      dtype: compute dtype of matmul inputs ("float32", "bfloat16" or "float16").
        Matmuls always accumulate in float32; norms and softmax compute in float32.
      low_precision_backward: with a low-precision dtype, the backward pass's
        products take their float32 cotangent rounded to that dtype, so they
        run bf16 x bf16 like the forward's (custom VJPs: `transformer._dense`
        and the attention products). False differentiates the products as
        written (float32 x float32 gradient products; on a 2-core AMX Xeon the
        bf16 GRPO update 1,572 -> 1,645 ms and the DPO step 245 -> 267 ms from
        the attention products alone), which forward-mode autodiff through a
        bf16 model (jvp, jacfwd) needs; TRPO's Fisher-vector products switch it
        off for their KL term. No effect in float32.
      residual_dtype: dtype of the residual stream between blocks, and of the
        norm and RoPE outputs that feed the matmuls ("float32", the default, or
        the compute dtype). "bfloat16" with dtype "bfloat16" is the pure-bf16
        layout of Hugging Face's bf16 models and the GPU anchor: half the
        activation bytes, while norms still reduce in float32 and the final norm,
        the hidden states the heads read and the logits stay float32. Its
        log-probabilities differ from a float32 stream's by bf16 rounding of the
        stream (tests/test_model.py states the tolerance).
      param_dtype: storage dtype of parameters (master weights), one of the
        dtype names above.
      heads: which output heads exist: "lm" (token logits), "value" (per-token
        scalar), "reward" (sequence scalar read at the last non-pad token).
      reward_outputs: width A of the reward head: 1 (a scalar reward, head [D]) or
        A > 1 attributes scored at once (head [D, A], e.g. helpfulness and
        correctness ratings regressed together).
      attention_impl: "xla" (einsum, runs everywhere) or "cudnn" (fused GPU
        kernel through `jax.nn.dot_product_attention`, full forward only).
      init_std: standard deviation of the normal weight initialiser.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_dim: int
    head_dim: int | None = None
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    max_position_embeddings: int | None = None
    scan_layers: bool = True
    remat: str = "none"
    recompute_swiglu: bool = True
    dtype: str = "float32"
    low_precision_backward: bool = True
    param_dtype: str = "float32"
    residual_dtype: str = "float32"
    heads: tuple[str, ...] = ("lm",)
    reward_outputs: int = 1
    attention_impl: str = "xla"
    init_std: float = 0.02

    def __post_init__(self):
        def bad(field, why):
            raise ConfigFieldError(field, why)

        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_seq_len"):
            if int(getattr(self, f)) <= 0:
                bad(f, f"must be positive, got {getattr(self, f)}")
        if self.max_position_embeddings is not None and int(self.max_position_embeddings) <= 0:
            bad("max_position_embeddings", f"must be positive or None, got {self.max_position_embeddings}")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"{self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            bad("head_dim", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.dim_per_head % 2:
            bad("head_dim", f"RoPE needs an even head_dim, got {self.dim_per_head}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            bad("rope_scaling", f"must be a RopeScaling or None, got {type(self.rope_scaling).__name__}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"{self.remat!r} not in {REMAT_POLICIES}")
        if self.dtype not in DTYPES:
            bad("dtype", f"{self.dtype!r} not in {tuple(DTYPES)}")
        if self.param_dtype not in DTYPES:
            bad("param_dtype", f"{self.param_dtype!r} not in {tuple(DTYPES)}")
        if self.residual_dtype not in ("float32", self.dtype):
            bad("residual_dtype", f"{self.residual_dtype!r} must be 'float32' or the compute dtype "
                f"{self.dtype!r}: a stream narrower than float32 only pays with low-precision matmuls")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", f"{self.attention_impl!r} not in {ATTENTION_IMPLS}")
        heads = tuple(self.heads)
        if not heads or any(h not in HEADS for h in heads) or len(set(heads)) != len(heads):
            bad("heads", f"{self.heads!r} must be a non-empty subset of {HEADS}")
        object.__setattr__(self, "heads", heads)
        if int(self.reward_outputs) < 1:
            bad("reward_outputs", f"must be >= 1, got {self.reward_outputs}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def rematerialised(self) -> bool:
        """Whether the backward pass recomputes layer activations (`remat` other than "none")."""
        return self.remat != "none"

    @property
    def stream_dtype(self):
        """The residual stream's dtype (`residual_dtype`)."""
        return DTYPES[self.residual_dtype]

    @property
    def has_lm_head_matrix(self) -> bool:
        """Whether a separate [D, V] unembedding matrix exists (LM head, untied)."""
        return "lm" in self.heads and not self.tie_embeddings

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        """Parameter count in closed form (matches `jax.eval_shape` of `Model.init`)."""
        D, H, N, K, F, V = (self.d_model, self.dim_per_head, self.n_heads, self.n_kv_heads,
                            self.mlp_dim, self.vocab_size)
        attn = D * N * H + 2 * D * K * H + N * H * D
        if self.qkv_bias:
            attn += N * H + 2 * K * H
        if self.qk_norm:
            attn += 2 * H
        layer = attn + 3 * D * F + 2 * D
        total = self.n_layers * layer + D  # + final norm
        emb = V * D
        total += emb + (emb if self.has_lm_head_matrix else 0)
        if "value" in self.heads:
            total += D + 1
        if "reward" in self.heads:
            total += (D + 1) * self.reward_outputs
        return total - (emb if exclude_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (non-embedding params + LM head) + attention.

        Attention scores and the weighted sum cost 2 * 2 * T * N * H per token
        forward (full square, causal masking is not skipped), x3 for the backward.
        """
        # A tied LM head still costs a [D, V] matmul per token.
        tied_head = self.vocab_size * self.d_model if ("lm" in self.heads and self.tie_embeddings) else 0
        n = self.num_params(exclude_embedding=True) + tied_head
        attn = 3 * 4 * seq_len * self.n_heads * self.dim_per_head * self.n_layers
        return 6.0 * n + attn


# Presets. tiny: tests (~0.8M params); small: CPU studies (~13M params). The
# large ones are the published shapes, used for sharding dry-runs via eval_shape.
PRESETS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(vocab_size=64, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                              mlp_dim=384, max_seq_len=512, scan_layers=False),
    "small": TransformerConfig(vocab_size=64, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2,
                               mlp_dim=1024, max_seq_len=1024, scan_layers=False),
    "llama3_8b": TransformerConfig(vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                   mlp_dim=14_336, rope_theta=500_000.0, norm_eps=1e-5, max_seq_len=8192),
    "qwen2_5_0_5b": TransformerConfig(vocab_size=151_936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                      mlp_dim=4864, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True,
                                      max_seq_len=32_768),
    "qwen2_5_7b": TransformerConfig(vocab_size=152_064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                                    mlp_dim=18_944, rope_theta=1_000_000.0, qkv_bias=True, max_seq_len=32_768),
    "qwen3_0_6b": TransformerConfig(vocab_size=151_936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                                    head_dim=128, mlp_dim=3072, rope_theta=1_000_000.0, qk_norm=True,
                                    tie_embeddings=True, max_seq_len=40_960),
}


def preset(name: str, **overrides) -> TransformerConfig:
    """A named preset, optionally with fields replaced: `preset("tiny", heads=("lm", "value"))`."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
