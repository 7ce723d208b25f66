"""Reward-model throughput beside SFT, scoring throughput and automatic step labelling time.

    python -m benchmarks.reward_model [--preset small --batch 32 --seq 128 --steps 10]

1. Training tokens/s: one SFT step on [batch, seq] tokens against one ranking
   (Bradley–Terry) step on batch / 2 pairs of the same length: the same tokens per
   step, the same preset and optimizer. The aim is RM >= 0.9 x SFT.
2. Scoring: `reward_model_reward` on `score_rows` arithmetic completions (text in,
   rewards out: tokenisation, padding and the jitted forward), sequences/s.
3. Step labelling: `label_steps` with the KV-cache completer on `label_solutions`
   reference solutions of the arithmetic task (n continuations per proper prefix),
   wall seconds per 1,000 labelled steps.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import numpy as np

from benchmarks.common import banner, timeit
from rljax.cli import parse_config


@dataclass
class Config:
    preset: str = "small"
    batch: int = 32
    seq: int = 128
    steps: int = 10
    score_rows: int = 512
    label_solutions: int = 64
    label_n: int = 8
    smoke: bool = False


def main(cfg: Config) -> dict:
    if cfg.smoke:
        cfg.preset, cfg.batch, cfg.seq, cfg.steps, cfg.score_rows, cfg.label_solutions, cfg.label_n = \
            "tiny", 4, 32, 2, 16, 4, 2
    from rljax.data import SequenceBatch
    from rljax.data.arithmetic import check_answer, make_split
    from rljax.data.batch import RankingBatch
    from rljax.data.reward_collate import split_solution
    from rljax.losses import SFTConfig, sft_loss
    from rljax.losses.reward_model import RankingConfig, ranking_loss
    from rljax.models import Model, preset
    from rljax.rewards.process_labels import label_steps, model_completer
    from rljax.rewards.learned import reward_model_reward
    from rljax.sampling import SampleConfig
    from rljax.state import OptimizerConfig, create_state, make_train_step
    from rljax.tokenizer import CharTokenizer

    banner("reward model", cfg)
    rng = np.random.default_rng(0)
    opt = OptimizerConfig(total_steps=cfg.steps + 4)
    out = {}

    # 1. training: the same tokens per step
    lm = Model(preset(cfg.preset))
    rm = Model(preset(cfg.preset, heads=("reward",)))
    tokens = rng.integers(3, lm.config.vocab_size, (cfg.batch, cfg.seq)).astype(np.int32)
    ones = np.ones_like(tokens)
    sft_step = make_train_step(functools.partial(sft_loss, model=lm, cfg=SFTConfig()), opt)
    rm_step = make_train_step(functools.partial(ranking_loss, model=rm, cfg=RankingConfig()), opt)
    B = cfg.batch // 2
    pairs = RankingBatch(tokens=tokens.reshape(B, 2, cfg.seq), attention_mask=ones.reshape(B, 2, cfg.seq),
                         rank=np.tile(np.int32([[0, 1]]), (B, 1)))
    for name, model, step, batch in (("sft", lm, sft_step, SequenceBatch(tokens, ones, ones)),
                                     ("rm", rm, rm_step, pairs)):
        state = [create_state(model, opt, jax.random.key(0))]

        def run(step=step, batch=batch, state=state):
            state[0], m = step(state[0], batch)
            return m

        s = timeit(run, reps=cfg.steps, warmup=2)
        out[f"{name}_tok_s"] = cfg.batch * cfg.seq / s
        print(f"{name}: {s * 1e3:.1f} ms/step, {out[f'{name}_tok_s']:,.0f} tokens/s")
    out["rm_over_sft"] = out["rm_tok_s"] / out["sft_tok_s"]
    print(f"RM / SFT training throughput: {out['rm_over_sft']:.2f}x")

    # 2. scoring text with a reward model
    tok = CharTokenizer()
    problems, _ = make_split(max(cfg.score_rows, cfg.label_solutions), 1, levels=(1, 2), seed=0)
    rm_small = Model(preset(cfg.preset, heads=("reward",), vocab_size=tok.vocab_size, max_seq_len=256))
    scorer = reward_model_reward(rm_small, rm_small.init(jax.random.key(0)), tok)
    prompts = [p.prompt for p in problems[:cfg.score_rows]]
    completions = [p.completion for p in problems[:cfg.score_rows]]
    s = timeit(lambda: scorer(prompts, completions), reps=3, warmup=1)
    out["score_seq_s"] = cfg.score_rows / s
    print(f"scoring: {out['score_seq_s']:,.0f} sequences/s ({cfg.score_rows} arithmetic completions per call)")

    # 3. automatic step labels with the KV-cache completer
    policy = Model(preset(cfg.preset, vocab_size=tok.vocab_size, max_seq_len=256))
    complete = model_completer(policy, policy.init(jax.random.key(0)), tok,
                               SampleConfig(max_new_tokens=40, eos_id=tok.eos_id, pad_id=tok.pad_id))
    chosen = problems[:cfg.label_solutions]
    solutions = [split_solution(p.completion, ";") for p in chosen]
    check = lambda m, c: check_answer(chosen[m], c)  # noqa: E731
    label_steps([p.prompt for p in chosen], solutions, check, complete, n=cfg.label_n, separator=";",
                key=jax.random.key(0))  # compile
    t = time.perf_counter()
    label_steps([p.prompt for p in chosen], solutions, check, complete, n=cfg.label_n, separator=";",
                key=jax.random.key(1))
    wall = time.perf_counter() - t
    n_steps = sum(len(s) for s in solutions)
    out["label_s_per_1000_steps"] = wall / n_steps * 1000
    print(f"step labelling: {n_steps} steps ({cfg.label_n} continuations per prefix) in {wall:.2f} s: "
          f"{out['label_s_per_1000_steps']:.1f} s per 1,000 steps")
    return out


if __name__ == "__main__":
    main(parse_config(Config))
