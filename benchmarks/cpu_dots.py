"""XLA:CPU's matrix products, YNNPACK (XLA's default) against Eigen, on the same program in one process.

    python -m benchmarks.cpu_dots                        # the table in rljax/cpu_dots.py's docstring
    python -m benchmarks.cpu_dots --programs grpo-update --rounds 6
    python -m benchmarks.cpu_dots --programs dpo --dtype bfloat16
    python -m benchmarks.cpu_dots --smoke

Each program is lowered once and compiled twice: with XLA's default options (YNNPACK's products
and fusions) and with the `xla_cpu_experimental_ynn_fusion_type` that gives Eigen's products
(`rljax.cpu_dots.full_sequence_compiler_options`: for train steps YNNPACK for reductions only, for
sampling, a forward-only program, no YNNPACK fusion), the choice `rljax.cpu_dots` makes for train
steps and scoring passes. The two executables then run in
alternation, `--rounds` rounds, the order flipped every round, so that the machine's drift
(this project's CPUs are shared virtual machines: ±30% between processes is common) falls on both
alike. A round's figure is the minimum of `--reps` calls; the summary gives the median of the
rounds and how many rounds Eigen won.

Programs (d256 x 4 layers, 4 heads, untied head, unrolled layers, float32 unless --dtype):

- train steps: forward, backward and AdamW of the next-token loss
  (`benchmarks.forward_backward.make_step`), the work of every phase's train step, at three shapes:
  `grpo-update` 128 rows x 136 tokens, MLP 1024 (the GRPO update at TRL's configuration:
  16 prompts x 8 samples, prompt bucket 8 + 128 new tokens); `torch-train` 32 x 128, MLP 688,
  vocabulary 64 (the torch comparison of benchmarks.forward_backward); `dpo` 32 x 97, MLP 1024
  (DPO at benchmarks.offline's configuration: 16 pairs of 97 tokens).
- `sampling`: `rljax.sampling.sample`'s compiled decode loop, 128 rows, prompt 8, 128 new tokens
  (eos never ends a row): the program rljax leaves with XLA's default.

The XLA_FLAGS of the process apply to both compiles; an `xla_cpu_experimental_ynn_fusion_type` in
them makes the two the same program, which is refused.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import banner, block, cpu_dots_env
from benchmarks.forward_backward import make_step
from rljax.cli import parse_config
from rljax.cpu_dots import YNN_OPTION, eigen_compiler_options, ynn_product_fusions
from rljax.models import Model, TransformerConfig

# name: (rows, tokens, MLP width, vocabulary)
TRAIN_SHAPES = {"grpo-update": (128, 136, 1024, 58), "torch-train": (32, 128, 688, 64), "dpo": (32, 97, 1024, 58)}
PROGRAMS = (*TRAIN_SHAPES, "sampling")
LIBRARIES = ("ynn", "eigen")


def library_options(lib: str, train: bool) -> dict | None:
    """The compiler options of each compile: XLA's default, or rljax's for Eigen's products in a
    train step (`train`) or a forward-only program."""
    return eigen_compiler_options(train) if lib == "eigen" else None


@dataclass
class Config:
    programs: str = ",".join(PROGRAMS)  # comma-separated, from PROGRAMS
    dtype: str = "float32"  # matmul compute dtype of the model (bfloat16: f32 weights and accumulation)
    rounds: int = 6
    reps: int = 3  # calls per round; the round's figure is their minimum
    smoke: bool = False  # tiny shapes, 2 rounds of 1 call: checks the script runs

    def __post_init__(self):
        names = [p.strip() for p in self.programs.split(",") if p.strip()]
        unknown = [p for p in names if p not in PROGRAMS]
        if unknown or not names:
            raise ValueError(f"--programs: {unknown or self.programs!r} not in {PROGRAMS}")
        if self.rounds < 1 or self.reps < 1:
            raise ValueError(f"--rounds and --reps must be >= 1, got {self.rounds}, {self.reps}")
        if YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
            raise ValueError(f"XLA_FLAGS sets {YNN_OPTION}: both compiles would be the same program; unset it")


def model_config(mlp: int, vocab: int, dtype: str, smoke: bool) -> TransformerConfig:
    d, layers = (64, 2) if smoke else (256, 4)
    return TransformerConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=4,
                             mlp_dim=mlp // 4 if smoke else mlp, max_seq_len=512, tie_embeddings=False,
                             scan_layers=False, dtype=dtype)


def train_program(name: str, cfg: Config):
    """(lowered train step, a function that runs one compiled executable `reps` times from the same
    start and returns the fastest call's seconds)."""
    rows, tokens_len, mlp, vocab = TRAIN_SHAPES[name]
    if cfg.smoke:
        rows, tokens_len = 4, 16
    model = Model(model_config(mlp, vocab, cfg.dtype, cfg.smoke))
    params = model.init(jax.random.key(0))
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (rows, tokens_len)), jnp.int32)
    with cpu_dots_env("ynn"):  # a plain jit: options given to jax.jit would stay with the lowering
        lowered = make_step(model, optimizer).lower(params, opt_state, tokens)

    def time_calls(compiled, reps):
        p, o = jax.tree.map(jnp.copy, (params, opt_state))  # the step donates its inputs
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            p, o, loss = compiled(p, o, tokens)
            block(loss)
            best = min(best, time.perf_counter() - t)
        return best

    what = f"train step {rows} x {tokens_len} tokens, MLP {model.config.mlp_dim}, vocabulary {vocab}"
    return what, lowered, time_calls


def sampling_program(cfg: Config):
    from rljax.sampling import SampleConfig, _generate, prepare_prompts

    rows, prompt_len, new = (8, 4, 8) if cfg.smoke else (128, 8, 128)
    model = Model(model_config(1024, 58, cfg.dtype, cfg.smoke))
    params = model.init(jax.random.key(0))
    scfg = SampleConfig(max_new_tokens=new, n=1, eos_id=-1, pad_id=0, min_prompt_bucket=prompt_len)
    prompt = np.random.default_rng(0).integers(3, 58, (rows, prompt_len)).astype(np.int32)
    # what `rljax.sampling.sample` compiles: its host-side prompt preparation, then the jitted loop
    prompt, mask = (jnp.asarray(x) for x in prepare_prompts(
        prompt, np.ones_like(prompt), vocab_size=58, max_new_tokens=new, max_seq_len=512, pad_id=0,
        min_bucket=prompt_len))
    lowered = _generate.lower(  # sampling's jit takes no options: rljax leaves it with XLA's default
        params, prompt, mask, jax.random.key(1), model=model, cfg=scfg)

    def time_calls(compiled, reps):
        best = float("inf")
        for r in range(reps):
            t = time.perf_counter()
            block(compiled(params, prompt, mask, jax.random.key(r)))
            best = min(best, time.perf_counter() - t)
        return best

    return f"sampling {rows} rows, prompt {prompt_len}, {new} new tokens", lowered, time_calls


def compare(what: str, lowered, time_calls, cfg: Config, train: bool = True) -> dict:
    """Compile `lowered` (a train step, or with `train` False a forward-only program) with each
    library, run them in alternation; returns each one's round figures."""
    compiled = {}
    for lib in LIBRARIES:
        t = time.perf_counter()
        options = library_options(lib, train)
        compiled[lib] = lowered.compile(compiler_options=options) if options else lowered.compile()
        time_calls(compiled[lib], 1)  # the first call pays for page faults and thread start-up
        text = compiled[lib].as_text()
        products = ynn_product_fusions(text)
        print(f"  {lib:5s} compile + first call {time.perf_counter() - t:.2f} s; "
              f"{text.count('__ynn_fusion')} YNNPACK fusions, {products} of them with products")
        if lib == "eigen" and products:
            raise RuntimeError(f"{what}: the Eigen compile still runs products in YNNPACK; the comparison is void")
    rounds = {lib: [] for lib in LIBRARIES}
    reps = 1 if cfg.smoke else cfg.reps
    for r in range(2 if cfg.smoke else cfg.rounds):
        for lib in (LIBRARIES if r % 2 == 0 else LIBRARIES[::-1]):
            rounds[lib].append(time_calls(compiled[lib], reps))
    med = {lib: statistics.median(v) for lib, v in rounds.items()}
    wins = sum(e < y for e, y in zip(rounds["eigen"], rounds["ynn"]))
    for lib, v in rounds.items():
        print(f"  {lib:5s} " + " ".join(f"{x * 1e3:7.1f}" for x in v) + f"   median {med[lib] * 1e3:7.1f} ms")
    print(f"  {what}: Eigen / YNNPACK = {med['eigen'] / med['ynn']:.3f} (median of {len(rounds['ynn'])} rounds); "
          f"Eigen faster in {wins} of {len(rounds['ynn'])} rounds")
    return dict(what=what, rounds=rounds, median=med, eigen_wins=wins)


def main(cfg: Config) -> dict:
    banner("XLA:CPU products: YNNPACK against Eigen, alternated in one process", cfg)
    names = [p.strip() for p in cfg.programs.split(",") if p.strip()]
    out = {}
    for name in names:
        what, lowered, time_calls = sampling_program(cfg) if name == "sampling" else train_program(name, cfg)
        print(f"\n[{name}] {what}, {cfg.dtype}; figures: ms, the fastest of {1 if cfg.smoke else cfg.reps} "
              "calls a round")
        out[name] = compare(what, lowered, time_calls, cfg, train=name != "sampling")
    return out


if __name__ == "__main__":
    main(parse_config(Config))
