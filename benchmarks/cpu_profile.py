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
in the README were taken with RLJAX_KEEP_BUFFERS=1 (`rljax.host_memory`); set it here too.

    python -m benchmarks.cpu_profile --instances 30         # and each program's 30 slowest op instances
    python -m benchmarks.cpu_profile --program dpo --instances 30   # one train step alone (benchmarks.cpu_dots)

--instances N also lists each program's N slowest op instances with their result shape and, for
products, the operand shapes and GFLOP/s of thread time, read from the optimised HLO that XLA dumps
for this run (XLA_FLAGS gains --xla_dump_to=<trace dir>/hlo; it must be the first use of the
backend in the process). To see which arrays an op reads and writes, look its name up in that dump.
--program grpo-update|torch-train|dpo profiles one train step instead (`benchmarks.cpu_dots`'s
programs: the GRPO update's shape, the torch comparison's, the offline DPO step's; compiled with the
products rljax picks for `--dtype`, `rljax.cpu_dots.dot_library`), its HLO read from the compiled
executable.

This is how the float32 KV cache on CPU (`Model.cache_dtype`), the narrow transposed copy of the
weight gradients (`transformer._contract_rows`) and the float32 backward products of bf16
attention (`transformer._low_precision_einsum`) were found (docs/performance.md).
"""
from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
from dataclasses import dataclass

import jax
import numpy as np

from benchmarks.common import banner
from rljax.cli import parse_config


@dataclass(frozen=True)
class Config:
    dtype: str = "bfloat16"  # the model's compute dtype (float32 | bfloat16)
    warmup: int = 2  # iterations before the traced one (the first compiles)
    top: int = 12  # op kinds shown per program
    trace_dir: str = ""  # where the trace goes (default: a temporary directory, removed after)
    instances: int = 0  # also each program's slowest op instances, with shapes and GFLOP/s
    program: str = "grpo"  # the GRPO iteration, or one train step: grpo-update | torch-train | dpo
    smoke: bool = False  # with --program: tiny shapes (checks the script runs)

    def __post_init__(self):
        from benchmarks.cpu_dots import TRAIN_SHAPES

        if self.program != "grpo" and self.program not in TRAIN_SHAPES:
            raise ValueError(f"cpu_profile --program: {self.program!r} is not grpo or one of {', '.join(TRAIN_SHAPES)}")


def op_kind(op: str) -> str:
    """An HLO op's kind: its name without the trailing number XLA gives each instance
    ("ynn_fusion.12" -> "ynn_fusion", "dot" -> "dot")."""
    return re.sub(r"\.\d+$", "", op)


def op_instance_times(events) -> dict[str, dict[str, tuple[float, int]]]:
    """{program: {op: (seconds, calls)}} from a Chrome/Perfetto trace's events: the complete events
    ("ph" "X", "dur" in microseconds) whose args name an HLO module and op (XLA:CPU's thunk
    executor records those), summed per program and op instance ("ynn_fusion.12"); an op inside a
    loop runs once per iteration, each run one call."""
    out: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "dur" in e and "hlo_module" in args and "hlo_op" in args:
            entry = out[args["hlo_module"]][args["hlo_op"]]
            entry[0] += e["dur"] * 1e-6
            entry[1] += 1
    return {module: {op: (s, n) for op, (s, n) in ops.items()} for module, ops in out.items()}


def op_times(events) -> dict[str, dict[str, float]]:
    """{program: {op kind: seconds}}: `op_instance_times` summed per kind (`op_kind`)."""
    out: dict[str, dict[str, float]] = {}
    for module, ops in op_instance_times(events).items():
        kinds = out.setdefault(module, collections.Counter())
        for op, (s, _) in ops.items():
            kinds[op_kind(op)] += s
    return {module: dict(kinds) for module, kinds in out.items()}


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])(?:\{[^}]*\})? ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


def _dims(shape: str) -> list[int]:
    """"bf16[17408,256]" -> [17408, 256]."""
    inside = shape[shape.index("[") + 1:-1]
    return [int(d) for d in inside.split(",") if d]


@dataclass(frozen=True)
class HloOp:
    """One instruction of an optimised HLO module: its result shape ("f32[256,1024]"), opcode, the
    shapes of the products it computes (its own, or its fused computation's: "bf16[17408,256] x
    bf16[256,1024]") and their floating-point operations (2 x the result's elements x the
    contracted elements)."""
    shape: str
    opcode: str
    products: tuple[str, ...] = ()
    flops: int = 0


def hlo_ops(text: str) -> dict[str, HloOp]:
    """{instruction name: HloOp} for every instruction of a module's optimised HLO text (what
    `jax.jit(f).lower(...).compile().as_text()` returns, or XLA_FLAGS=--xla_dump_to writes as
    *.cpu_after_optimizations.txt); a fusion's products are those of the computation it calls.
    Instruction names are unique within a module, which is what the trace's op names refer to."""
    shapes, opcodes, body, calls, dots = {}, {}, collections.defaultdict(list), {}, {}
    comp = None
    for line in text.splitlines():
        if not line.startswith(" "):
            m = _COMPUTATION.match(line)
            comp = m.group(1) if m and line.rstrip().endswith("{") else comp
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name], opcodes[name] = shape, opcode
        body[comp].append(name)
        if opcode == "fusion" and (c := re.search(r"calls=%([\w.\-]+)", rest)):
            calls[name] = c.group(1)
        if opcode == "dot":
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])[:2]
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            dots[name] = (operands, [int(d) for d in contracting.group(1).split(",") if d] if contracting else [])
    ops = {}
    for name, shape in shapes.items():
        members = body.get(calls[name], []) if name in calls else [name]
        products, flops = [], 0
        for d in members:
            if d not in dots:
                continue
            (lhs, rhs), contracting = dots[d]
            lhs_dims = _dims(shapes[lhs])
            flops += 2 * int(np.prod(_dims(shapes[d]))) * int(np.prod([lhs_dims[i] for i in contracting]))
            products.append(f"{shapes[lhs]} x {shapes[rhs]}")
        ops[name] = HloOp(shape, opcodes[name], tuple(products), flops)
    return ops


def read_trace(trace_dir: str) -> list[dict]:
    """The events of the newest Perfetto trace (`*.trace.json.gz`) under `trace_dir`."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir} (jax.profiler.trace with "
                                "create_perfetto_trace=True writes one)")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def report_instances(times: dict[str, tuple[float, int]], ops: dict[str, HloOp], top: int) -> str:
    """One program's `top` slowest op instances (`op_instance_times`): thread time, calls, the HLO
    result shape, and for the instances that compute products their rate (GFLOP/s of thread time
    over all calls) and operand shapes. This table showed the bf16 update's attention backward
    products as float32 x float32 at 50-76 GFLOP/s against 270-760 for the projections
    (docs/performance.md)."""
    lines = []
    for op, (s, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        head = f"  {s * 1e3:9,.1f} ms {calls:6,d}x"
        info = ops.get(op)
        if info is None:
            lines.append(f"{head}  {op}")
            continue
        rate = f"{info.flops * calls / s / 1e9:7,.1f} GFLOP/s" if info.flops and s > 0 else " " * 15
        what = "; ".join(info.products) if info.products else info.opcode
        lines.append(f"{head}  {rate}  {op}  {info.shape}  {what}")
    return "\n".join(lines)


def dumped_hlo(dump_dir: str, module: str) -> str | None:
    """The optimised HLO text XLA_FLAGS=--xla_dump_to=dump_dir wrote for `module` (the newest
    *.<module>.cpu_after_optimizations.txt), or None."""
    files = sorted(glob.glob(os.path.join(dump_dir, f"*.{module}.cpu_after_optimizations.txt")), key=os.path.getmtime)
    if not files:
        return None
    with open(files[-1]) as f:
        return f.read()


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


def print_tables(events, cfg: Config, hlo_of: dict) -> dict[str, dict[str, float]]:
    """Print the op-kind table of every program in the trace and, with --instances, the slowest op
    instances of the programs named in `hlo_of` (module name -> a function giving its optimised HLO
    text, or None where there is none). Returns the op-kind times."""
    times = op_times(events)
    print(report(times, cfg.top))
    if cfg.instances:
        for module, inst in op_instance_times(events).items():
            if module in hlo_of:
                text = hlo_of[module]()
                print(f"{module}: the {cfg.instances} slowest op instances"
                      + ("" if text else " (no HLO dump: the backend had started before this run)"))
                print(report_instances(inst, hlo_ops(text) if text else {}, cfg.instances))
    return times


def profile_train_step(cfg: Config) -> dict:
    """`--program NAME`: one train step of `benchmarks.cpu_dots.train_program`, warmed up, then one call
    traced; the op tables as for the iteration."""
    from benchmarks.cpu_dots import Config as ProgramConfig, library_options, train_program
    from rljax.cpu_dots import dot_library

    banner(f"cpu_profile: the {cfg.program} train step", cfg)
    what, lowered, time_calls = train_program(cfg.program, ProgramConfig(dtype=cfg.dtype, smoke=cfg.smoke))
    compiled = lowered.compile(library_options(dot_library(dtype=cfg.dtype), train=True))
    print(f"{what}: best of {max(1, cfg.warmup)} calls {time_calls(compiled, max(1, cfg.warmup)) * 1e3:,.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = cfg.trace_dir or tmp
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            traced = time_calls(compiled, 1)
        events = read_trace(trace_dir)
    print(f"traced call (wall clock): {traced * 1e3:,.1f} ms")
    return print_tables(events, cfg, {"jit_step": compiled.as_text})


def main(cfg: Config) -> dict:
    if cfg.program != "grpo":
        return profile_train_step(cfg)
    from benchmarks.grpo_step import TRL_PROMPTS, reward_digits, rl_config, trl_model
    from rljax.host_memory import release_compiler_memory
    from rljax.rl import create_rl_state, make_rl_iteration
    from rljax.tokenizer import CharTokenizer

    tmp = tempfile.TemporaryDirectory()
    trace_dir = cfg.trace_dir or tmp.name
    dump_dir = os.path.join(trace_dir, "hlo")
    if cfg.instances:  # read when the backend starts: before the banner's first use of it
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}"
                                   " --xla_dump_hlo_module_re=jit_update|jit__generate").strip()
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
    with tmp:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            state, metrics = iteration(state, tokens, mask)
        events = read_trace(trace_dir)
        split = " + ".join(f"{k[5:-2]} {v:.3f}" for k, v in metrics.items() if k.startswith("time_") and v > 0)
        print(f"traced iteration (wall clock, s): {split}")
        return print_tables(events, cfg, {m: functools.partial(dumped_hlo, dump_dir, m)
                                          for m in ("jit_update", "jit__generate")})


if __name__ == "__main__":
    main(parse_config(Config))
