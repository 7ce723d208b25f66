"""Where a CPU program's time goes: XLA's ops, per compiled program, from a `jax.profiler` trace.

    python -m benchmarks.cpu_profile                        # the GRPO iteration at TRL's configuration, bf16
    python -m benchmarks.cpu_profile --dtype float32 --top 20

Runs `--warmup` iterations of the GRPO iteration that `benchmarks.grpo_step --which trl` times (16
prompts x 8 samples x 128 new tokens, d256 x 4 layers), then one under `jax.profiler.trace`, and
prints, for each compiled program (`jit__generate`: sampling; `jit_update`: the train step), the
thread time of its ops grouped by kind (the op's name without its number: `ynn_fusion` for
YNNPACK's fused products, `dot` for XLA's own, `convert_bitcast_fusion` and the like for
element-wise loops), and the iteration's wall-clock split. Thread time sums the ops over XLA's
threads, so a program's total exceeds its wall time where ops run side by side. Where float32
programs use Eigen's products (`rljax.cpu_dots`), those seem to be recorded when they are launched,
not for their run: a float32 gradient step at the DPO shape showed 276 ms of thread time a step
against 507 ms of wall time, so read float32 tables for their element-wise ops. The GRPO figures
in the README were taken with RLJAX_KEEP_BUFFERS=1 (`rljax.host_memory`); set it here too. To
see which arrays an op reads and writes, dump the optimised HLO (XLA_FLAGS=--xla_dump_to=DIR
--xla_dump_hlo_module_re=jit_update) and look the op's name up there.

This is how the float32 KV cache on CPU (`Model.cache_dtype`) and the narrow transposed copy of
the weight gradients (`transformer._contract_rows`) were found (docs/performance.md).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from dataclasses import dataclass

import jax

from benchmarks.common import banner
from rljax.cli import parse_config


@dataclass(frozen=True)
class Config:
    dtype: str = "bfloat16"  # the model's compute dtype (float32 | bfloat16)
    warmup: int = 2  # iterations before the traced one (the first compiles)
    top: int = 12  # op kinds shown per program
    trace_dir: str = ""  # where the trace goes (default: a temporary directory, removed after)


def op_kind(op: str) -> str:
    """An HLO op's kind: its name without the trailing number XLA gives each instance
    ("ynn_fusion.12" -> "ynn_fusion", "dot" -> "dot")."""
    return re.sub(r"\.\d+$", "", op)


def op_times(events) -> dict[str, dict[str, float]]:
    """{program: {op kind: seconds}} from a Chrome/Perfetto trace's events: the complete events
    ("ph" "X", "dur" in microseconds) whose args name an HLO module and op (XLA:CPU's thunk
    executor records those), summed per program and kind."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "dur" in e and "hlo_module" in args and "hlo_op" in args:
            out[args["hlo_module"]][op_kind(args["hlo_op"])] += e["dur"] * 1e-6
    return {module: dict(kinds) for module, kinds in out.items()}


def read_trace(trace_dir: str) -> list[dict]:
    """The events of the newest Perfetto trace (`*.trace.json.gz`) under `trace_dir`."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir} (jax.profiler.trace with "
                                "create_perfetto_trace=True writes one)")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def report(times: dict[str, dict[str, float]], top: int, min_share: float = 0.01) -> str:
    """The per-program tables, largest program first, for the programs with at least `min_share`
    of all the thread time; the rest (host-side helpers: RNG splits, scatters) in one line."""
    lines, rest, total = [], [], sum(sum(k.values()) for k in times.values())
    for module, kinds in sorted(times.items(), key=lambda kv: -sum(kv[1].values())):
        own = sum(kinds.values())
        if own < min_share * total:
            rest.append(own)
            continue
        lines.append(f"{module}: {own * 1e3:,.0f} ms of thread time")
        for kind, s in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {s * 1e3:9,.1f} ms  {100 * s / own:5.1f}%  {kind}")
    if rest:
        lines.append(f"{len(rest)} smaller programs: {sum(rest) * 1e3:,.1f} ms")
    return "\n".join(lines)


def main(cfg: Config) -> dict:
    from benchmarks.grpo_step import TRL_PROMPTS, reward_digits, rl_config, trl_model
    from rljax.host_memory import release_compiler_memory
    from rljax.rl import create_rl_state, make_rl_iteration
    from rljax.tokenizer import CharTokenizer

    release_compiler_memory()
    banner("cpu_profile: the GRPO iteration at TRL's configuration", cfg)
    tok = CharTokenizer()
    model = trl_model(cfg.dtype)  # what `benchmarks.grpo_step --which trl` times: the same model and settings
    rl = rl_config(8, 128, min_prompt_bucket=8)
    iteration = make_rl_iteration(model, rl, reward_digits, tok.decode_batch)
    state = create_rl_state(model, model.init(jax.random.key(0)), rl, jax.random.key(1))
    tokens, mask = tok.encode_batch(TRL_PROMPTS, padding_side="left")
    for _ in range(cfg.warmup):
        state, _ = iteration(state, tokens, mask)
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = cfg.trace_dir or tmp
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            state, metrics = iteration(state, tokens, mask)
        times = op_times(read_trace(trace_dir))
    split = " + ".join(f"{k[5:-2]} {v:.3f}" for k, v in metrics.items() if k.startswith("time_") and v > 0)
    print(f"traced iteration (wall clock, s): {split}")
    print(report(times, cfg.top))
    return times


if __name__ == "__main__":
    main(parse_config(Config))
