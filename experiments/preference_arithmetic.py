"""Offline preference optimisation on an embedded task (arithmetic by default), against its SFT start.

    python -m experiments.preference_arithmetic --algo dpo --sft-run-dir <SFT run>
    python -m experiments.preference_arithmetic --algo all --flips 0 0.2      # the README's table
    python -m experiments.preference_arithmetic --smoke
    python -m experiments.preference_arithmetic --task sorting --sft-run-dir <sorting SFT run>

--algo: dpo, cdpo, robust_dpo, hinge, ipo, simpo, orpo, kto (offline, from synthetic pairs), online_dpo
(samples its own pairs, ranked by the hidden gold scorer), a comma-separated list of them, or all. Pairs: for each of n_pairs training
problems two candidates of different kinds (the reference solution or a corruption of it,
`rljax.data.synthetic.preference_pairs` with --task's corruptions and gold score), the one with the higher
gold score chosen; a fraction `flip`
of the labels is then swapped at random (label noise of known rate: cDPO's ε and robust DPO's flip
rate are set to it when it is positive). KTO sees the same data unpaired (chosen = desirable, rejected
= undesirable). The reference log-probs are computed once and cached under the run directory.

Reported per method and noise rate, against the SFT checkpoint: greedy held-out accuracy, and the
gold score, accuracy and length of samples at temperature 1 (4 per problem). Outputs: results.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import asdict, dataclass

import jax
import numpy as np

from rljax.cli import LoggingFlags, apply_preset, check_input_dir, make_run_dir, run, save_config
from rljax.data.collate import BatchIterator
from rljax.data.preference_collate import collate_kto, collate_preferences, fixed_mismatch
from rljax.data.synthetic import preference_pairs
from rljax.eval import exact_match
from rljax.losses.preference import PREFERENCE_METHODS, KTOConfig, check_kto_weights
from rljax.phases import LoopConfig, PreferencePhaseConfig, preference
from rljax.pipelines import OnlineDPOConfig, online_dpo
from rljax.reference import cached_reference_logps, with_reference
from rljax.recipes.arithmetic_runs import (DEFAULT_SFT_RUN_DIR, RL_IGNORED_FIELDS, SMOKE_SFT_RUN_DIR, check_sft_task,
                                           load_sft, sft_split)
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig, create_state
from rljax.tasks import ARITHMETIC, Task, get_task, task_slug
from rljax.tokenizer import CharTokenizer

ALGOS = (*PREFERENCE_METHODS, "online_dpo")


@dataclass
class Config(LoggingFlags):
    task: str = "arithmetic"  # the SFT run's task (rljax.tasks.get_task)
    algo: str = "dpo"
    flips: tuple[float, ...] = (0.0,)  # label-noise rates, one run each
    sft_run_dir: str = DEFAULT_SFT_RUN_DIR
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    n_pairs: int = 4000
    epochs: int = 2
    batch: int = 16
    lr: float = 2e-5
    beta: float | None = None  # None: each method's default
    eval_problems: int = 512
    eval_samples: int = 4
    max_new_tokens: int = 40
    # online DPO
    online_rounds: int = 3
    online_prompts: int = 512
    online_samples: int = 4
    progress: bool = True
    smoke: bool = False
    train_sft: bool = False  # sft_run_dir does not exist: train the SFT run there first (--smoke sets it)
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


def noisy_pairs(problems, flip: float, seed: int, task: Task = ARITHMETIC) -> list[dict]:
    """Gold-ordered pairs of `task` with a fraction `flip` of them swapped (exactly round(flip · n), at random
    rows)."""
    pairs = [r for r in preference_pairs(problems, seed, noise_free=True, task=task) if r["gold_margin"] != 0]
    rng = np.random.default_rng(seed + 1)
    flipped = set(rng.choice(len(pairs), size=int(round(flip * len(pairs))), replace=False).tolist())
    return [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i in flipped else r for i, r in enumerate(pairs)]


def evaluate(params, model, tok, problems, cfg: Config) -> dict:
    """Greedy and sampled held-out accuracy (`task.check`), and the gold score and length of the samples."""
    task = get_task(cfg.task)
    greedy, _ = exact_match(params, model, tok, problems, cfg.max_new_tokens, check=task.check, prompt=task.prompt)
    sampled, texts = exact_match(params, model, tok, problems, cfg.max_new_tokens, n=cfg.eval_samples,
                                 temperature=1.0, key=jax.random.key(cfg.seed + 5), check=task.check,
                                 prompt=task.prompt)
    rows = [(p, t) for p, t in zip((p for p in problems for _ in range(cfg.eval_samples)), texts)]
    return dict(greedy=greedy, sampled=sampled, gold=float(np.mean([task.gold_score(p, t) for p, t in rows])),
                length=float(np.mean([len(t) for t in texts])))


def method_config(algo: str, flip: float, beta: float | None):
    cfg = PREFERENCE_METHODS["dpo" if algo == "online_dpo" else algo]
    if flip > 0 and algo == "cdpo":
        cfg = dataclasses.replace(cfg, label_smoothing=flip)
    if flip > 0 and algo == "robust_dpo":
        cfg = dataclasses.replace(cfg, flip_rate=flip)
    if beta is not None and hasattr(cfg, "beta"):
        cfg = dataclasses.replace(cfg, beta=beta)
    return cfg


def train_offline(algo: str, flip: float, cfg: Config, model, params, tok, train, run_dir: str):
    loss = method_config(algo, flip, cfg.beta)
    pairs = noisy_pairs(train[:cfg.n_pairs], flip, cfg.seed, get_task(cfg.task))
    if isinstance(loss, KTOConfig):
        rows = [r for p in pairs for r in ((p["prompt"], p["chosen"], True), (p["prompt"], p["rejected"], False))]
        rows = fixed_mismatch(rows, seed=cfg.seed)  # fixed mismatched pairs: their reference is precomputable
        check_kto_weights([r["desirable"] for r in rows], loss)
        collate = functools.partial(collate_kto, tok)
    else:
        rows = pairs
        collate = functools.partial(collate_preferences, tok)
    if loss.needs_reference:
        # shared by the runs of one study: the key is the SFT params and the collated data
        cache = os.path.join(os.path.dirname(run_dir), "ref_cache")
        ref = cached_reference_logps(params, rows, collate, model=model, cache_dir=cache)
        rows = with_reference(rows, ref)
    opt = OptimizerConfig(lr=cfg.lr, schedule="constant")
    state = create_state(model, opt, jax.random.key(cfg.seed), params=params)
    steps = max(cfg.epochs * len(rows) // cfg.batch, 1)
    phase = PreferencePhaseConfig(loss=loss, optimizer=opt,
                                  loop=LoopConfig(steps=steps, log_every=max(steps // 20, 1), progress=cfg.progress,
                                                  **cfg.loop_logging()))
    state = preference(state, BatchIterator(rows, cfg.batch, collate, seed=cfg.seed), phase, model=model,
                       run_dir=run_dir)
    return state.params, dict(rows=len(rows), steps=steps)


def train_online(cfg: Config, model, params, tok, train, run_dir: str):
    task = get_task(cfg.task)

    def gold(prompts, completions):
        return np.array([task.gold_score(by_prompt[p], c) for p, c in zip(prompts, completions)])

    by_prompt = {p.prompt: p for p in train}
    steps = max(cfg.epochs * cfg.online_prompts // cfg.batch, 1)
    ocfg = OnlineDPOConfig(rounds=cfg.online_rounds, samples=cfg.online_samples, prompts_per_round=cfg.online_prompts,
                           steps_per_round=steps, batch_size=cfg.batch, loss=method_config("dpo", 0.0, cfg.beta),
                           optimizer=OptimizerConfig(lr=cfg.lr, schedule="constant"), progress=cfg.progress,
                           **cfg.loop_logging(),
                           sampling=SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                                 eos_id=tok.eos_id, pad_id=tok.pad_id))
    state = create_state(model, ocfg.optimizer, jax.random.key(cfg.seed), params=params)
    state, stats = online_dpo(state, [p.prompt for p in train], gold, ocfg, model=model, tokenizer=tok,
                              collate=functools.partial(collate_preferences, tok), run_dir=run_dir,
                              allow_change=cfg.force_config)
    return state.params, dict(rounds=stats, steps=steps * cfg.online_rounds)


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, n_pairs=32, epochs=1, batch=8, eval_problems=8, eval_samples=2, max_new_tokens=16,
                     online_rounds=2, online_prompts=16, train_sft=True,
                     sft_run_dir=SMOKE_SFT_RUN_DIR)
    algos = ALGOS if cfg.algo == "all" else tuple(a.strip() for a in cfg.algo.split(","))
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        raise ValueError(f"preference_arithmetic: unknown --algo {unknown[0]!r}; choose from {', '.join(ALGOS)}, all")
    get_task(cfg.task)  # an unknown task fails before a run directory is made
    check_input_dir(cfg.sft_run_dir, "--sft-run-dir", create=cfg.train_sft, create_flag="--train-sft")
    check_sft_task(cfg.task, cfg.sft_run_dir)  # before the run directory is made
    name = "preference_arithmetic" if cfg.task == "arithmetic" else f"preference-{task_slug(cfg.task)}"
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, name)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=RL_IGNORED_FIELDS)  # before any training
    tok = CharTokenizer()
    model, params, sft_cfg = load_sft(cfg.sft_run_dir, tok, smoke=cfg.smoke, progress=cfg.progress,
                                      run_if_missing=True, create=cfg.train_sft, logging=cfg.logging_flags(),
                                      task=cfg.task)
    _, train, test = sft_split(sft_cfg)
    held = test[:cfg.eval_problems]
    results = dict(config=asdict(cfg), sft=evaluate(params, model, tok, held, cfg), runs=[])
    print("SFT: " + ", ".join(f"{k} {v:.3f}" for k, v in results["sft"].items()), flush=True)
    for algo in algos:
        for flip in (0.0,) if algo == "online_dpo" else cfg.flips:
            t0 = time.perf_counter()
            where = os.path.join(run_dir, f"{algo}-flip{flip:g}")
            if algo == "online_dpo":
                trained, info = train_online(cfg, model, params, tok, train, where)
            else:
                trained, info = train_offline(algo, flip, cfg, model, params, tok, train, where)
            row = dict(algo=algo, flip=flip, **evaluate(trained, model, tok, held, cfg), **info,
                       seconds=time.perf_counter() - t0)
            results["runs"].append(row)
            print(f"{algo} (flip {flip:g}): " + ", ".join(f"{k} {row[k]:.3f}" for k in ("greedy", "sampled", "gold",
                                                                                     "length"))
                  + f" ({row['seconds']:.0f} s)", flush=True)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
