"""Loading a Hugging Face checkpoint: time and peak host memory, one device and a mesh of simulated devices.

    python -m benchmarks.load                     # ~1 GB float32 Llama-shaped checkpoint in a temp dir
    python -m benchmarks.load --gb 0.05 --smoke   # seconds

The parent writes a synthetic checkpoint with random weights (rljax's `save_pretrained`, sharded
safetensors + index), then runs `load_pretrained` in a fresh child process per configuration:
one device, and XLA_FLAGS=--xla_force_host_platform_device_count=8 with each mesh in --meshes.
Each child reports the wall time of the load (arrays ready) and its peak resident memory (VmHWM)
next to its resident memory just before loading (python + jax + rljax imported, backend up), so the
load's own peak is `peak - before`. The aim: the whole process peaks below 1.3x the checkpoint.
Simulated devices share the host's memory, so a mesh with a `data` axis > 1 keeps that many
replicas of every parameter: the (2, 2, 2) row is expected near 2x, (1, 4, 2) near 1x.
The checkpoint was just written, so the files are in the page cache (warm reads).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass
class Config:
    gb: float = 1.0  # checkpoint size target; sets the number of layers
    d_model: int = 1024
    mlp_dim: int = 4096
    n_heads: int = 16
    n_kv_heads: int = 8
    vocab_size: int = 32_000
    shard_mb: int = 256  # max_shard_bytes of the synthetic checkpoint
    meshes: tuple[str, ...] = ("1,4,2", "2,2,2")  # data,fsdp,tensor over 8 simulated devices
    child: str = ""  # internal: "1" or a mesh "d,f,t"; the child loads --path and prints RESULT
    path: str = ""
    smoke: bool = False


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(cfg: Config) -> dict:
    import jax

    from rljax.models import load_pretrained
    from rljax.sharding import make_mesh

    mesh = None
    if cfg.child != "1":
        d, f, t = (int(x) for x in cfg.child.split(","))
        mesh = make_mesh(data=d, fsdp=f, tensor=t)
    jax.block_until_ready(jax.numpy.zeros(()))  # backend up before the baseline
    before = _status_mib("VmRSS")
    t = time.perf_counter()
    model_cfg, params = load_pretrained(cfg.path, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    return dict(devices=jax.device_count(), mesh=cfg.child if mesh is not None else "none", seconds=seconds,
                before_mib=before, peak_mib=_status_mib("VmHWM"), after_mib=_status_mib("VmRSS"),
                params_mib=n_bytes / 2**20, device_mib=held / 2**20)


def write_checkpoint(cfg: Config, path: str) -> tuple[object, float]:
    """A float32 Llama-shaped checkpoint of about cfg.gb GB with N(0, 0.02) weights; returns (config, MiB)."""
    import jax
    import numpy as np

    from rljax.models import Model, TransformerConfig, save_pretrained

    base = TransformerConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=1, n_heads=cfg.n_heads,
                             n_kv_heads=cfg.n_kv_heads, mlp_dim=cfg.mlp_dim, max_seq_len=4096)
    per_layer = base.replace(n_layers=2).num_params() - base.num_params()
    rest = base.num_params() - per_layer
    n_layers = max(1, round((cfg.gb * 1e9 / 4 - rest) / per_layer))
    model_cfg = base.replace(n_layers=n_layers)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02),
                          Model(model_cfg).param_shapes())
    save_pretrained(params, model_cfg, path, max_shard_bytes=cfg.shard_mb * 2**20)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return model_cfg, size / 2**20


def main(cfg: Config):
    if cfg.child:
        print("RESULT " + json.dumps(child(cfg)))
        return
    if cfg.smoke:
        cfg.gb, cfg.d_model, cfg.mlp_dim, cfg.vocab_size, cfg.shard_mb = min(cfg.gb, 0.05), 256, 1024, 8000, 16
    from benchmarks.common import banner

    banner("load_pretrained: time and peak host memory", cfg)
    tmp = tempfile.mkdtemp(prefix="rljax-load-bench-")
    try:
        path = os.path.join(tmp, "ckpt")
        t = time.perf_counter()
        model_cfg, size_mib = write_checkpoint(cfg, path)
        shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        print(f"checkpoint: {size_mib:.0f} MiB float32 in {len(shards)} safetensors files, written in "
              f"{time.perf_counter() - t:.1f} s by save_pretrained | d{model_cfg.d_model} L{model_cfg.n_layers} "
              f"heads {model_cfg.n_heads}/{model_cfg.n_kv_heads} mlp {model_cfg.mlp_dim} vocab "
              f"{model_cfg.vocab_size}, untied")
        for target in ("1",) + tuple(cfg.meshes):
            n = 1 if target == "1" else 8
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
            args = [sys.executable, "-m", "benchmarks.load", "--child", target, "--path", path]
            out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.split("RESULT ", 1)[1])
            load_peak = r["peak_mib"] - r["before_mib"]
            copies = r["device_mib"] / r["params_mib"]
            print(f"  {r['devices']} device(s), mesh {r['mesh']:>5}: {r['seconds']:5.1f} s "
                  f"({size_mib / r['seconds']:5.0f} MiB/s) | RSS before {r['before_mib']:4.0f} MiB, peak "
                  f"{r['peak_mib']:5.0f} MiB = {r['peak_mib'] / size_mib:.2f}x checkpoint; load's own peak "
                  f"{load_peak:5.0f} MiB = {load_peak / size_mib:.2f}x; device arrays {r['device_mib']:5.0f} MiB "
                  f"({copies:.0f} {'copy' if copies < 1.5 else 'copies'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from rljax.cli import parse_config

    main(parse_config(Config))
