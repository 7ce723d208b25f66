"""RLHF (InstructGPT: SFT → Bradley–Terry reward model → PPO with a KL penalty to the SFT policy) end to end on a
task of rljax.tasks (default: the embedded arithmetic task), from a freshly initialised model, one run per seed:

    python -m experiments.rlhf_pipeline --smoke                     # seconds of training; ~30 s with compiles
    python -m experiments.rlhf_pipeline --seed 0 1 2                # tiny preset, arithmetic level 1, 3 seeds
    python -m experiments.rlhf_pipeline --seed 0 --refresh-every 10 # iterative RLHF: the reward model refreshed
    python -m experiments.rlhf_pipeline --mesh-data 2 --mesh-fsdp 4 # sharded over 8 devices; on several hosts the
                                                                    # same command on each (RLJAX_* coordinator
                                                                    # variables, --run-dir on a shared file system)

The pipeline is `rljax.rlhf.rlhf_pipeline` (its docstring lists the stages). The problems of the train split are
partitioned: the first --sft-problems are the SFT data, the next --rm-problems the reward model's preference pairs
(labels: Bradley–Terry on the task's gold score at --rm-beta), the rest PPO's prompts; --n-test held-out problems
measure every stage. The gold score is never trained on: PPO logs it beside the reward model's score (the proxy)
every iteration, so reward hacking shows as the proxy rising while the gold score stays flat or falls.

Outputs under the run directory, per seed in seed-N/: results.md and results.jsonl (one row per stage),
<stage>/results.json, <stage>/stage.json (the stage's arguments; a rerun with others is refused), rlhf.png (proxy,
gold, KL to the SFT policy and β against the PPO iteration); results.json (config, rows per seed, the summary with
the mean over seeds). A killed run, started again with the same arguments, resumes where it stopped; a finished one
redoes nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass

import jax
import numpy as np

from rljax.checkpoint import write_json
from rljax.cli import IGNORED_FIELDS, LoggingFlags, MeshFlags, apply_preset, make_run_dir, run, save_config
from rljax.distributed import on_main, say
from rljax.eval import PolicyEvalConfig
from rljax.models import Model, preset
from rljax.pipelines import markdown_table
from rljax.rlhf import RLHFConfig, rlhf_pipeline
from rljax.sharding import place_params
from rljax.state import OptimizerConfig
from rljax.tasks import get_task
from rljax.tokenizer import CharTokenizer


@dataclass
class Config(LoggingFlags, MeshFlags):
    task: str = "arithmetic"
    levels: tuple[int, ...] = (1,)
    preset: str = "tiny"
    layers: int = 2
    max_seq_len: int = 80
    run_dir: str | None = None
    run_root: str = "runs"
    seed: tuple[int, ...] = (0,)
    sft_problems: int = 512
    rm_problems: int = 320  # arithmetic level 1 has about 1200 distinct problems: the four sets stay below
    rl_problems: int = 256
    n_test: int = 64
    sft_steps: int = 800
    sft_batch: int = 16
    sft_lr: float = 3e-3
    rm_steps: int = 200
    rm_lr: float = 1e-4
    rm_head_lr: float = 1e-3
    rm_beta: float = 5.0
    ppo_iterations: int = 40
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 40
    ppo_lr: float = 3e-5
    ppo_head_lr: float = 1e-3
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    kl_init: float = 0.1
    kl_target: float = 2.0
    kl_horizon: int = 2000
    refresh_every: int = 0
    refresh_prompts: int = 32
    refresh_samples: int = 4
    refresh_epochs: int = 2
    eval_samples: int = 4
    progress: bool = True
    smoke: bool = False
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


SMOKE = dict(layers=1, max_seq_len=64, sft_problems=64, rm_problems=32, rl_problems=16, n_test=8, sft_steps=20,
             sft_batch=8, rm_steps=3, ppo_iterations=2, prompts_per_iteration=4, samples_per_prompt=2,
             max_new_tokens=24, refresh_prompts=4, refresh_samples=2, eval_samples=2, levels=(1,))

# the columns printed per stage (the full rows are in each seed's results.md)
COLUMNS = ("stage", "rm_pairwise_accuracy", "accuracy_greedy", "accuracy_sampled", "gold_mean", "proxy_mean",
           "train_proxy_first", "train_proxy_last", "train_gold_first", "train_gold_last", "train_kl_last", "beta",
           "kl_to_start")


def pipeline_config(cfg: Config) -> RLHFConfig:
    if cfg.eval_samples < 1:  # the summary compares gold and proxy on sampled held-out completions
        raise ValueError(f"Config.eval_samples: the study scores sampled held-out completions by gold and proxy, so "
                         f"it needs >= 1, got {cfg.eval_samples}")
    return RLHFConfig(
        sft_steps=cfg.sft_steps, sft_batch_size=cfg.sft_batch,
        sft_optimizer=OptimizerConfig(lr=cfg.sft_lr, schedule="constant"), rm_steps=cfg.rm_steps,
        rm_batch_size=cfg.sft_batch, rm_beta=cfg.rm_beta,
        rm_optimizer=OptimizerConfig(lr=cfg.rm_lr, schedule="constant", head_lr=cfg.rm_head_lr),
        ppo_iterations=cfg.ppo_iterations, prompts_per_iteration=cfg.prompts_per_iteration,
        samples_per_prompt=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
        ppo_optimizer=OptimizerConfig(lr=cfg.ppo_lr, schedule="constant", head_lr=cfg.ppo_head_lr),
        ppo_epochs=cfg.ppo_epochs, ppo_minibatches=cfg.ppo_minibatches, kl_init=cfg.kl_init,
        kl_target=cfg.kl_target, kl_horizon=cfg.kl_horizon, refresh_every=cfg.refresh_every,
        refresh_prompts=cfg.refresh_prompts, refresh_samples=cfg.refresh_samples, refresh_epochs=cfg.refresh_epochs,
        refresh_batch_size=max(cfg.sft_batch // cfg.refresh_samples, 1),
        evaluation=PolicyEvalConfig(max_new_tokens=cfg.max_new_tokens, samples=cfg.eval_samples), log_every=1,
        progress=cfg.progress, **cfg.loop_logging())


def setup(cfg: Config, seed: int, mesh=None):
    """(task, tokenizer, model, base params, problem sets) of `cfg` for one seed, the model and params on `mesh`
    (None: one device)."""
    task = get_task(cfg.task)
    tok = CharTokenizer()
    model = Model(preset(cfg.preset, n_layers=cfg.layers, vocab_size=tok.vocab_size, max_seq_len=cfg.max_seq_len),
                  mesh)
    # initialised on one device (the same values on every process), then laid out on the mesh
    params = place_params(model, dataclasses.replace(model, mesh=None).init(jax.random.key(seed)))
    train, test = task.split(cfg.sft_problems + cfg.rm_problems + cfg.rl_problems, cfg.n_test, levels=cfg.levels,
                             seed=seed)
    a, b = cfg.sft_problems, cfg.sft_problems + cfg.rm_problems
    sets = dict(sft_problems=train[:a], rm_problems=train[a:b], rl_problems=train[b:], held_out=test)
    return task, tok, model, params, sets


def summary(rows_by_seed: dict[int, list[dict]]) -> dict:
    """Per seed and the mean over seeds: the SFT row's accuracy and gold, the reward model's held-out accuracy, and
    PPO's start (the reward-model row: the SFT policy scored by both) and end (the last PPO row) on held-out samples,
    gold and proxy, with the KL to SFT, plus the training batches' proxy and gold at PPO's first and last iteration
    (first: the first row's; last: the last row's), and the changes gold_change = gold_end − gold_start and
    proxy_change = proxy_end − proxy_start (reward hacking: proxy_change > 0 with gold_change ≤ 0)."""
    per = {}
    for seed, rows in rows_by_seed.items():
        by = {r["stage"]: r for r in rows}
        ppo = [r for r in rows if r["stage"].startswith("ppo")]
        first, last = ppo[0], ppo[-1]
        s = dict(sft_accuracy_greedy=by["sft"]["accuracy_greedy"], sft_accuracy_sampled=by["sft"]["accuracy_sampled"],
                 sft_gold=by["sft"]["gold_mean"], rm_accuracy=by["reward-model"].get("rm_pairwise_accuracy"),
                 gold_start=by["reward-model"]["gold_mean"], proxy_start=by["reward-model"]["proxy_mean"],
                 gold_end=last["gold_mean"], proxy_end=last["proxy_mean"], kl_to_sft=last["kl_to_start"],
                 accuracy_end=last["accuracy_sampled"], beta_end=last["beta"])
        for name in ("proxy", "gold"):
            if f"train_{name}_first" in first:
                s[f"train_{name}_first"], s[f"train_{name}_last"] = first[f"train_{name}_first"], \
                    last[f"train_{name}_last"]
        s["gold_change"], s["proxy_change"] = s["gold_end"] - s["gold_start"], s["proxy_end"] - s["proxy_start"]
        per[seed] = s
    keys = [k for k in next(iter(per.values())) if all(isinstance(p.get(k), (int, float)) for p in per.values())]
    mean = {k: float(np.mean([p[k] for p in per.values()])) for k in keys}
    return dict(per_seed=per, mean=mean)


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, **SMOKE)
    mesh = cfg.mesh()  # on several processes, one over all their devices (before a run directory is made)
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, "rlhf_pipeline")
    os.makedirs(run_dir, exist_ok=True)
    rlhf = pipeline_config(cfg)  # validates: a bad value is refused before config.json records it
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=IGNORED_FIELDS)  # before any training
    rows_by_seed, t0 = {}, time.perf_counter()
    for seed in cfg.seed:
        task, tok, model, params, sets = setup(cfg, seed, mesh)
        seed_dir = os.path.join(run_dir, f"seed-{seed}")
        say(f"rlhf_pipeline: task {task.name}, {model.config.num_params() / 1e6:.2f}M params, seed {seed}; "
            f"{len(sets['sft_problems'])} SFT / {len(sets['rm_problems'])} reward-model / "
            f"{len(sets['rl_problems'])} PPO / {len(sets['held_out'])} held-out problems; run dir {seed_dir}"
            + (f"; mesh {cfg.mesh_axes()}" if mesh is not None else ""))
        t = time.perf_counter()
        _, rows = rlhf_pipeline(params, dataclasses.replace(rlhf, seed=seed), model=model, tokenizer=tok, task=task,
                                key=jax.random.key(seed + 1), run_dir=seed_dir,
                                allow_change=cfg.force_config, **sets)
        rows_by_seed[seed] = rows
        say("\n" + markdown_table(rows, COLUMNS))
        say(f"\nseed {seed}: {time.perf_counter() - t:.0f} s; the full table: {os.path.join(seed_dir, 'results.md')}")
    wall = time.perf_counter() - t0
    result = dict(config=asdict(cfg), run_dir=run_dir, rows=rows_by_seed, summary=summary(rows_by_seed),
                  wall_seconds=wall)
    say(json.dumps(result["summary"], indent=1))
    path = os.path.join(run_dir, "results.json")  # atomic: a crash leaves no half file
    on_main(f"rlhf_pipeline: writing {path}", write_json, path, result, default=str)
    return result


if __name__ == "__main__":
    run(main, Config, processes=True)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
