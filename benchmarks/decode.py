"""Decode throughput: KV-cache sampler vs recomputing the full sequence each step.

    python -m benchmarks.decode                    # small preset, batch 32, 128 new tokens, + HF-shaped model
    python -m benchmarks.decode --preset tiny --new-tokens 16 --smoke

Two parts, each printed with its configuration:
 1. the `small` preset (fp32): new tokens/s with the KV cache (one jitted
    while-loop) and with full recomputation (a jitted forward over the growing
    sequence, lengths bucketed to multiples of 16 so it compiles 1/16 as often);
 2. the model shape of the peer script benchmarks/peers/hf_generate.py (hidden
    256, 4 layers, 4 heads, vocab 64, MLP 688, untied; batch 32, prompt 64, 64
    new tokens, greedy), in float32 and bfloat16 compute, to compare with
    Hugging Face `generate`. Run the peer in the same sitting, in its own
    environment (`make peer-env`, then `.peer/venv/bin/python
    benchmarks/peers/hf_generate.py`), and compare the ratio.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import banner, block, timeit
from rljax.cli import parse_config
from rljax.models import Model, TransformerConfig, preset
from rljax.sampling import SampleConfig, row_groups, sample


@dataclass
class Config:
    preset: str = "small"
    batch: int = 32
    prompt: int = 64
    new_tokens: int = 128
    reps: int = 3
    recompute: bool = True
    hf_shape: bool = True
    row_groups: int = 0  # SampleConfig.cpu_row_groups (0: auto, 1: one group, as before 2026-12-05)
    smoke: bool = False


def kv_decode_rate(model, params, batch, prompt, new_tokens, reps, groups=0):
    """(new tokens/s, seconds per call, first call's seconds, the row groups `sample` used)."""
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, (batch, prompt)).astype(np.int32)
    cfg = SampleConfig(max_new_tokens=new_tokens, greedy=True, eos_id=-1, min_prompt_bucket=prompt,
                       cpu_row_groups=groups)
    t = time.perf_counter()
    block(sample(params, tokens, None, jax.random.key(0), model=model, cfg=cfg))
    first = time.perf_counter() - t
    s = timeit(lambda: sample(params, tokens, None, jax.random.key(0), model=model, cfg=cfg), reps=reps, warmup=0)
    return batch * new_tokens / s, s, first, row_groups(batch, params, model, cfg)


def recompute_decode_rate(model, params, batch, prompt, new_tokens):
    """Greedy decoding without a cache: each step runs the model over the whole sequence so far."""
    rng = np.random.default_rng(0)
    S = prompt + new_tokens
    buf = np.zeros((batch, S + 16), np.int32)
    buf[:, :prompt] = rng.integers(3, model.config.vocab_size, (batch, prompt))

    @jax.jit
    def step(params, toks, n):
        logits = model(params, toks)  # causal: positions >= n do not affect position n-1
        return jnp.argmax(logits[:, n - 1], axis=-1)

    def run():
        toks = jnp.asarray(buf)
        for i in range(new_tokens):
            n = prompt + i
            width = -(-(n + 1) // 16) * 16
            nxt = step(params, toks[:, :width], n)
            toks = toks.at[:, n].set(nxt)
        return toks

    block(run())  # compile every bucket
    t = time.perf_counter()
    block(run())
    s = time.perf_counter() - t
    return batch * new_tokens / s, s


def main(cfg: Config):
    if cfg.smoke:
        cfg.preset, cfg.batch, cfg.prompt, cfg.new_tokens, cfg.reps = "tiny", 4, 8, 16, 1
    banner("decode", cfg)
    model = Model(preset(cfg.preset))
    params = model.init(jax.random.key(0))
    c = model.config
    print(f"\n[1] preset {cfg.preset}: {c.num_params()/1e6:.2f}M params, d{c.d_model} L{c.n_layers} "
          f"heads {c.n_heads}/{c.n_kv_heads} mlp {c.mlp_dim} vocab {c.vocab_size}, fp32, batch {cfg.batch}, "
          f"prompt {cfg.prompt}, {cfg.new_tokens} new tokens, greedy")
    kv, s, first, groups = kv_decode_rate(model, params, cfg.batch, cfg.prompt, cfg.new_tokens, cfg.reps,
                                          cfg.row_groups)
    print(f"  KV cache   {kv:9.0f} new tok/s  ({s*1e3:7.1f} ms per call; first call incl. compile {first:.1f} s; "
          f"{groups} row group(s))")
    if cfg.recompute:
        rc, s = recompute_decode_rate(model, params, cfg.batch, cfg.prompt, cfg.new_tokens)
        print(f"  recompute  {rc:9.0f} new tok/s  ({s*1e3:7.1f} ms per call)   KV-cache speed-up {kv/rc:.1f}x")

    if cfg.hf_shape and not cfg.smoke:
        hf = TransformerConfig(vocab_size=64, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_dim=688,
                               max_seq_len=512)
        print(f"\n[2] HF-generate shape (peer: benchmarks/peers/hf_generate.py): {hf.num_params()/1e6:.2f}M params, "
              f"d256 L4 heads 4/4 mlp 688 vocab 64, batch 32, prompt 64, 64 new tokens, greedy")
        for dtype in ("float32", "bfloat16"):
            m = Model(hf.replace(dtype=dtype))
            p = m.init(jax.random.key(0))
            rate, s, first, groups = kv_decode_rate(m, p, 32, 64, 64, max(cfg.reps, 5), cfg.row_groups)
            print(f"  {dtype:9s} KV cache {rate:9.0f} new tok/s  ({s*1e3:7.1f} ms per generate, "
                  f"{s/64*1e3:5.2f} ms/token-step; first call {first:.1f} s; {groups} row group(s))")


if __name__ == "__main__":
    main(parse_config(Config))
