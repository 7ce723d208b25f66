"""Offline trainers at the configuration of `benchmarks/peers/trl_offline.py`, so the two compare in one sitting.

    python -m benchmarks.offline --trainer dpo                  # live reference (forward every step)
    python -m benchmarks.offline --trainer dpo --precompute-ref # reference log-probs computed once up front
    python -m benchmarks.offline --trainer kto
    python -m benchmarks.offline --trainer reward
    python -m benchmarks.offline --trainer dpo --examples 2 --prompt-len 4 --completion-len 4 --steps 2

The defaults are the peer script's: a randomly initialised Llama-shaped model (hidden 256, 4 layers,
4 query and 4 key/value heads, SwiGLU 1024, untied LM head, float32; for the reward model the same
backbone with a scalar reward head), the character tokenizer (`rljax.tokenizer.CharTokenizer`, whose
ids the peer script copies), prompts of 32 random characters and completions of exactly 64 (chosen /
desirable: digits; rejected / undesirable: lowercase letters) plus EOS and no BOS, i.e. 97 tokens a
sequence as in TRL, 16 examples a step, fresh text every step, AdamW at lr 1e-4 with TRL's betas
(0.9, 0.999), gradient clipping at 1 and a linear decay.

A step is what `rljax.phases.preference` / `train_reward_model` run per batch: collate the step's
text (`collate_preferences`, `collate_kto`, `collate_pairs`) and the jitted train step
(`make_train_step` over `preference_loss` / `ranking_loss`; with a live reference its forward pass
runs inside that program, `with_live_reference`), timed to the step's result on the host.
--precompute-ref scores the whole data set first with `rljax.reference.cached_reference_logps`
(reported as "constructor" seconds, the peer's equivalent). Reported: every step's seconds, the
median of steps 2..N (the first includes compilation and is reported apart), tokens/s (the tokens of
every sequence the policy sees, from the attention masks; for KTO also without the mismatched ones),
and the process's peak resident memory after the imports, before training and at the end, and the
size of the train step's temporary buffer (activations kept for the backward pass and scratch) from
XLA's memory analysis of the compiled step.
--remat full|dots recomputes each layer's activations in the backward pass (`TransformerConfig.remat`;
all of them, or all but the weight products' outputs), TRL's `--grad-ckpt`; less memory for more
compute. --dtype bfloat16 computes matmuls in bf16 with float32 weights, optimizer and accumulation
(`TransformerConfig.dtype`). --pad longest pads every batch to its longest row (here every row: 97
tokens) as TRL does, instead of the collators' default bucket (112 for 97 tokens, `rljax.buckets`).
--share-prompt (dpo, reward) collates each pair as one row, prompt then chosen then rejected, both
completions reading the one copy of the prompt (`collate_preferences` / `collate_pairs` with
share_prompt=True): 32 + 65 + 65 = 162 tokens
a pair instead of 2 x 97 (`--pad longest` pads to 162); tokens/s still counts the prompt twice, so it
compares with the unshared figure.
--compile-cache DIR turns on the persistent compilation cache there (`rljax.compile_cache`, what every
experiment's entry point does): run twice with the same DIR and the second run's first step loads the
compiled programs instead of compiling them.
--release-memory false keeps the memory the compiler frees in the process's heap instead of returning
it to the OS after each compile (`rljax.host_memory`, on in every experiment's entry point).
RLJAX_FIXED_MALLOC_THRESHOLDS=1 in the environment (opt-in, `rljax.host_memory.fixed_malloc_thresholds`)
returns what XLA's worker threads free on every call as well: the lowest peak memory (DPO with a
precomputed reference and --remat full: 494-499 against 521-525 MiB on an AVX2 EPYC) for steps up to
~4% slower; the banner's "host memory" line says when it is on.
"""
from __future__ import annotations

import functools
import random
import string
import time
from dataclasses import dataclass

import jax
import numpy as np

from benchmarks.common import banner, block, peak_rss_mib
from rljax.cli import parse_config

TRAINERS = ("dpo", "kto", "reward")
PADS = ("bucket", "longest")


@dataclass
class Config:
    trainer: str = "dpo"
    precompute_ref: bool = False
    examples: int = 16
    prompt_len: int = 32
    completion_len: int = 64
    steps: int = 8
    beta: float = 0.1
    lr: float = 1e-4
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    mlp: int = 1024
    dtype: str = "float32"
    remat: str = "none"  # none | dots | full: TransformerConfig.remat (beside trl_offline.py --grad-ckpt)
    pad: str = "bucket"
    share_prompt: bool = False  # dpo, reward: each pair's prompt once, chosen and rejected reading it
    compile_cache: str = ""
    release_memory: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.trainer not in TRAINERS:
            raise ValueError(f"--trainer: {self.trainer!r} not in {TRAINERS}")
        if self.trainer == "reward" and self.precompute_ref:
            raise ValueError("--precompute-ref: a reward model has no reference model")
        if self.trainer == "kto" and (self.examples < 2 or self.examples % 2):
            raise ValueError("--examples: kto needs an even number >= 2 (balanced labels; the mismatched rows "
                             "pair examples)")
        if self.share_prompt and self.trainer == "kto":
            raise ValueError("--share-prompt: for the pairs of --trainer dpo and reward; KTO's rows are unpaired")
        if self.pad not in PADS:
            raise ValueError(f"--pad: {self.pad!r} not in {PADS}")
        if self.steps < 2:
            raise ValueError(f"--steps: need at least 2 (the first step compiles), got {self.steps}")


def make_rows(cfg: Config, n: int, rng: random.Random) -> list[dict]:
    """n examples of fixed length, the peer script's text for the same seed: chosen / desirable
    completions are digits, the others lowercase letters; KTO's labels alternate so every even
    batch is balanced."""
    from rljax.tokenizer import DEFAULT_ALPHABET

    prompt_chars = [c for c in DEFAULT_ALPHABET if c != "\n"]

    def text(chars, k):
        return "".join(rng.choice(chars) for _ in range(k))

    prompts = [text(prompt_chars, cfg.prompt_len) for _ in range(n)]
    if cfg.trainer == "kto":
        return [dict(prompt=p, completion=text(string.digits if i % 2 == 0 else string.ascii_lowercase,
                                                 cfg.completion_len), desirable=i % 2 == 0)
                for i, p in enumerate(prompts)]
    chosen = [text(string.digits, cfg.completion_len) for _ in range(n)]  # drawn in the peer's order
    rejected = [text(string.ascii_lowercase, cfg.completion_len) for _ in range(n)]
    return [dict(prompt=p, chosen=c, rejected=r) for p, c, r in zip(prompts, chosen, rejected)]


def main(cfg: Config) -> dict:
    from rljax.data.batch import PROMPT_SEGMENT
    from rljax.data.preference_collate import collate_kto, collate_preferences
    from rljax.data.reward_collate import collate_pairs
    from rljax.losses.preference import DPOConfig, KTOConfig, preference_loss, with_live_reference
    from rljax.losses.reward_model import RankingConfig, ranking_loss
    from rljax.models import Model, TransformerConfig
    from rljax.reference import cached_reference_logps, with_reference
    from rljax.state import OptimizerConfig, create_state, make_train_step, owned_copy
    from rljax.tokenizer import CharTokenizer

    rss_imports = peak_rss_mib()
    if cfg.release_memory:
        from rljax.host_memory import release_compiler_memory

        release_compiler_memory()  # what rljax.cli.run does for every experiment
    if cfg.compile_cache:
        from rljax.compile_cache import enable_compilation_cache

        enable_compilation_cache(cfg.compile_cache)
    banner(f"offline {cfg.trainer}{' (precomputed reference)' if cfg.precompute_ref else ''} step (rljax)", cfg)
    tok = CharTokenizer()
    seq = cfg.prompt_len + cfg.completion_len + 1
    model = Model(TransformerConfig(
        vocab_size=tok.vocab_size, d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
        n_kv_heads=cfg.heads, mlp_dim=cfg.mlp, max_seq_len=max(128, seq), scan_layers=False, dtype=cfg.dtype,
        remat=cfg.remat,
        heads=("reward",) if cfg.trainer == "reward" else ("lm",)))
    opt = OptimizerConfig(lr=cfg.lr, schedule="linear", end_lr_ratio=0.0, b2=0.999, total_steps=cfg.steps)
    # TRL's sequences: prompt + completion + EOS, no BOS (the peer's tokenizer adds none). "bucket": the
    # collators' default width (a power of two); "longest": the batch's longest row, as TRL pads
    longest = cfg.prompt_len + 2 * (cfg.completion_len + 1) if cfg.share_prompt else seq
    encode = dict(add_bos=False, add_eos=True, length=longest if cfg.pad == "longest" else None)
    if cfg.trainer == "dpo":
        loss_cfg = DPOConfig(beta=cfg.beta)
        collate = functools.partial(collate_preferences, tok, share_prompt=cfg.share_prompt, **encode)
        loss_fn = functools.partial(preference_loss, model=model, cfg=loss_cfg)
    elif cfg.trainer == "kto":
        loss_cfg = KTOConfig(beta=cfg.beta)
        collate = functools.partial(collate_kto, tok, **encode)
        loss_fn = functools.partial(preference_loss, model=model, cfg=loss_cfg)
    else:
        loss_cfg = RankingConfig()
        collate = functools.partial(collate_pairs, tok, share_prompt=cfg.share_prompt, **encode)
        loss_fn = functools.partial(ranking_loss, model=model, cfg=loss_cfg)
        # collate_pairs takes (prompt, chosen, rejected) rows
    rows = make_rows(cfg, cfg.examples * cfg.steps, random.Random(cfg.seed))
    if cfg.trainer == "kto" and cfg.precompute_ref:
        from rljax.data.preference_collate import fixed_mismatch

        rows = fixed_mismatch(rows, cfg.seed)  # the mismatched rows must be fixed to precompute their S_ref
    if cfg.trainer == "reward":
        rows = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    state = create_state(model, opt, jax.random.key(cfg.seed))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))

    init_s = 0.0
    reference = None
    if cfg.trainer != "reward":
        # the reference is the policy's initial weights: a copy on the device (the train step donates the
        # state), as a run's reference params are (a host array would be copied in every step)
        reference = owned_copy(state.params)
        if cfg.precompute_ref:
            t = time.perf_counter()
            ref = cached_reference_logps(reference, rows, collate, model=model, batch_size=cfg.examples)
            rows = with_reference(rows, ref)
            init_s = time.perf_counter() - t
            reference = None  # training holds one model
    # a live reference as rljax.phases.preference runs it: its pass inside the train step's program
    prepare = None if reference is None else functools.partial(with_live_reference, model=model)
    frozen = () if reference is None else (reference,)
    step_fn = make_train_step(loss_fn, opt, model=model, prepare=prepare)

    def one_step(state, i):
        batch = collate(rows[i * cfg.examples:(i + 1) * cfg.examples])
        state, metrics = step_fn(state, batch, *frozen)
        block(metrics)
        return state, batch

    held = ("precomputed S_ref" if cfg.precompute_ref else
            "live reference" if reference is not None else "no reference")
    what = {"dpo": f"DPO sigmoid, beta {cfg.beta}: {cfg.examples} pairs = {2 * cfg.examples} sequences a step",
            "kto": f"KTO, beta {cfg.beta}: {cfg.examples} completions (+{cfg.examples} mismatched) a step",
            "reward": f"reward model (Bradley-Terry): {cfg.examples} pairs = {2 * cfg.examples} sequences a step"}
    print(f"model: {n_params:,} params, d{cfg.d_model} x {cfg.layers} layers, {cfg.heads} heads, MLP {cfg.mlp}, "
          f"vocab {tok.vocab_size}, {cfg.dtype}, remat {cfg.remat}; {what[cfg.trainer]}; {seq} tokens a sequence; "
          f"{held}")
    if cfg.precompute_ref:
        print(f"constructor {init_s:.2f} s (the reference pass over {len(rows)} rows)")
    rss_before = peak_rss_mib()
    times, tokens = [], []
    for i in range(cfg.steps):
        t = time.perf_counter()
        state, batch = one_step(state, i)
        times.append(time.perf_counter() - t)
        attn = np.asarray(batch.attention_mask)
        n = int(attn.sum())
        if cfg.share_prompt:  # count each pair's two sequences, as without sharing: the prompt twice
            n += int((np.asarray(batch.segment_ids) == PROMPT_SEGMENT).sum())
        tokens.append((n, int(attn[:, 0].sum()) if cfg.trainer == "kto" else n, attn.shape[-1]))
    rss_end = peak_rss_mib()
    # after the peak RSS is read: lowering again compiles the step once more (the timed steps never do)
    temp_mib = step_fn.lower(state, batch, *frozen).compile().memory_analysis().temp_size_in_bytes / 2**20
    steady = sorted(times[1:])
    med = steady[len(steady) // 2]
    out = dict(first_step_s=times[0], step_s=med, tok_s=tokens[-1][0] / med, padded_width=tokens[-1][2],
               rss_imports_mib=rss_imports, rss_before_mib=rss_before, rss_end_mib=rss_end, constructor_s=init_s,
               step_temp_mib=temp_mib)
    print("step seconds: " + " ".join(f"{x:.3f}" for x in times))
    print(f"median of steps 2..{cfg.steps}: {med:.3f} s/step; first step {times[0]:.2f} s (compilation)")
    line = f"tokens/s: {out['tok_s']:,.0f} ({tokens[-1][0]} tokens a step, padded to width {tokens[-1][2]})"
    if cfg.trainer == "kto":
        out["tok_s_trained"] = tokens[-1][1] / med
        line += f"; {out['tok_s_trained']:,.0f} counting only the {cfg.examples} trained sequences"
    print(line)
    print(f"peak RSS: {rss_imports:,.0f} MiB after imports, {rss_before:,.0f} before training, {rss_end:,.0f} at the "
          f"end; the train step's temporary buffer (XLA's memory analysis): {temp_mib:,.0f} MiB")
    return out


if __name__ == "__main__":
    main(parse_config(Config))
