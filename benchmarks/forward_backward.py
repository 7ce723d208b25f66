"""Training-step throughput: forward + backward + AdamW, as a fraction of the measured matmul peak.

    python -m benchmarks.forward_backward              # small preset and the HF-shaped model, fp32 and bf16
    python -m benchmarks.forward_backward --smoke

FLOPs per token = 6 x (non-embedding parameters + LM head) + 12 x T x N x H x L
(attention scores and mix, forward and backward, full square). The peak is
measured here, in the same run: a jitted [n, n] @ [n, n] matmul in float32, and
in bfloat16 with float32 accumulation (the way the model's bf16 mode computes).

The HF-shaped model (d256, 4 layers, MLP 688, vocab 64, batch 32 x 128 tokens) is the
configuration of the torch training step in benchmarks/peers/hf_generate.py (fp32 and bf16
autocast, same FLOP count and its own measured peak): run it in the same sitting with
`.peer/venv/bin/python benchmarks/peers/hf_generate.py --parts train` (`make peer-env` first).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import banner, matmul_peak, peak_rss_mib, timeit
from rljax.cli import parse_config
from rljax.models import Model, TransformerConfig, preset
from rljax.models.logprobs import token_logprobs
from rljax.state import compile_step


@dataclass
class Config:
    preset: str = "small"
    batch: int = 32
    seq: int = 128
    steps: int = 5
    remat: str = "none"
    scan_layers: bool | None = None  # None: the preset's own choice
    hf_shape: bool = True
    smoke: bool = False


def make_step(model, optimizer):
    def loss_fn(params, tokens):
        lp = token_logprobs(params, tokens, None, model=model)
        return -jnp.mean(lp)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # rljax's step builder (rljax.cpu_dots: the products, and the loop emitters with remat)
    return compile_step(step, donate_argnums=(0, 1), dtype=model.config.dtype, remat=model.config.rematerialised)


def measure(cfg: TransformerConfig, batch, seq, steps, peak):
    model = Model(cfg)
    params = model.init(jax.random.key(0))
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)
    step = make_step(model, optimizer)
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = step(state[0], state[1], tokens)
        return loss

    s = timeit(run, reps=steps, warmup=2)
    flops = cfg.flops_per_token(seq + 1) * batch * (seq + 1)
    tok = batch * (seq + 1)
    return dict(s=s, tok_s=tok / s, gflops=flops / s / 1e9, mfu=flops / s / peak)


def main(cfg: Config):
    if cfg.smoke:
        cfg.preset, cfg.batch, cfg.seq, cfg.steps, cfg.hf_shape = "tiny", 4, 31, 2, False
    banner("forward+backward+AdamW", cfg)
    p32 = matmul_peak(jnp.float32)
    p16 = matmul_peak(jnp.bfloat16)
    print(f"measured matmul peak: float32 {p32/1e9:.1f} GFLOP/s | bf16 in, f32 accumulate {p16/1e9:.1f} GFLOP/s")
    scan = {} if cfg.scan_layers is None else {"scan_layers": cfg.scan_layers}
    runs = [(f"preset {cfg.preset}", preset(cfg.preset, remat=cfg.remat, **scan), cfg.batch, cfg.seq)]
    if cfg.hf_shape:
        runs.append(("HF-shape d256 L4 mlp688 v64", TransformerConfig(
            vocab_size=64, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_dim=688, max_seq_len=512,
            remat=cfg.remat, scan_layers=bool(cfg.scan_layers)), 32, 127))
    for name, mc, b, t in runs:
        print(f"\n[{name}] {mc.num_params()/1e6:.2f}M params, batch {b} x {t + 1} tokens, remat {mc.remat}, "
              f"scan {mc.scan_layers}")
        for dtype in ("float32", "bfloat16"):
            r = measure(mc.replace(dtype=dtype), b, t, cfg.steps, p32)
            print(f"  {dtype:9s} {r['s']*1e3:7.1f} ms/step | {r['tok_s']:7.0f} tok/s | {r['gflops']:6.1f} GFLOP/s | "
                  f"{r['mfu']*100:5.1f}% of fp32 peak")
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main(parse_config(Config))
