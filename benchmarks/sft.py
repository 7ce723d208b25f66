"""SFT throughput on 1 device vs 8 simulated CPU devices, with peak resident memory.

    python -m benchmarks.sft [--preset small --batch 32 --steps 10]

Each configuration runs in its own process (XLA_FLAGS must be set before JAX
starts): the parent starts `python -m benchmarks.sft --child N` for N = 1 and 8.
On one CPU the 8 "devices" share the same cores, so the 8-device figure shows
the cost of sharding overheads, not a speed-up.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass
class Config:
    preset: str = "small"
    batch: int = 32
    seq: int = 128
    steps: int = 10
    mesh: str = "4,2,1"  # data, fsdp, tensor for the 8-device run
    child: int = 0
    smoke: bool = False


def child(cfg: Config) -> dict:
    import jax
    import numpy as np

    from benchmarks.common import peak_rss_mib
    from rljax.data import SequenceBatch
    from rljax.losses import SFTConfig, sft_loss
    from rljax.models import Model, preset
    from rljax.sharding import make_mesh, shard_batch
    from rljax.state import OptimizerConfig, create_state, make_train_step

    n = jax.device_count()
    mesh = make_mesh(*map(int, cfg.mesh.split(","))) if n > 1 else None
    model = Model(preset(cfg.preset), mesh=mesh)
    opt = OptimizerConfig(total_steps=cfg.steps + 2)
    state = create_state(model, opt, jax.random.key(0), mesh=mesh)
    step = make_train_step(functools.partial(sft_loss, model=model, cfg=SFTConfig()), opt, model=model, mesh=mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (cfg.batch, cfg.seq)).astype(np.int32)
    ones = np.ones_like(tokens)
    batch = SequenceBatch(tokens=tokens, attention_mask=ones, loss_mask=ones)
    if mesh is not None:
        batch = shard_batch(batch, mesh)
    for _ in range(2):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(cfg.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    s = (time.perf_counter() - t) / cfg.steps
    return dict(devices=n, mesh=cfg.mesh if mesh is not None else "none", s_per_step=s,
                tok_s=cfg.batch * cfg.seq / s, peak_rss_mib=peak_rss_mib(), loss=float(m["loss"]))


def main(cfg: Config):
    if cfg.child:
        print("RESULT " + json.dumps(child(cfg)))
        return
    if cfg.smoke:
        cfg.preset, cfg.batch, cfg.seq, cfg.steps = "tiny", 8, 32, 2
    from benchmarks.common import banner

    banner("sft 1 vs 8 devices", cfg)
    for n in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        args = [sys.executable, "-m", "benchmarks.sft", "--child", str(n), "--preset", cfg.preset, "--batch",
                str(cfg.batch), "--seq", str(cfg.seq), "--steps", str(cfg.steps), "--mesh", cfg.mesh]
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.split("RESULT ", 1)[1])
        print(f"  {r['devices']} device(s), mesh {r['mesh']}: {r['s_per_step']*1e3:.0f} ms/step | "
              f"{r['tok_s']:.0f} tok/s | peak RSS {r['peak_rss_mib']:.0f} MiB | loss {r['loss']:.3f}")


if __name__ == "__main__":
    from rljax.cli import parse_config

    main(parse_config(Config))
