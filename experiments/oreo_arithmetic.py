"""OREO on an embedded task (arithmetic by default): offline RL from the SFT policy's own samples,
value-guided search, and iteration, against the methods that use the same data.

    python -m experiments.oreo_arithmetic --sft-run-dir <SFT run>                 # all parts
    python -m experiments.oreo_arithmetic --parts compare search --level token
    python -m experiments.oreo_arithmetic --task countdown --sft-run-dir <countdown SFT run>
    python -m experiments.oreo_arithmetic --smoke

--task (`rljax.tasks`) must be the SFT run's task: its answer check is the reward, its separator splits
the steps. The step level (--level step) and part search need a task with steps.

Parts:
  compare  collect `samples` solutions to each of `problems` training problems with the SFT policy
           (temperature 1, answers checked, at most `balance` right and `balance` wrong kept per
           problem, steps split after the task's separator), then train on that same data:
           rejection-sampling SFT (the right samples), DPO (right against wrong samples of a problem),
           KTO (right = desirable), OREO (`--baselines` picks among DPO and KTO; none: neither). Held-out
           greedy and sampled accuracy of each.
  search   OREO's policy with its value model: value-guided step beam search for each B in `beams`
           (B beams × B sampled steps, scored by V, `search_rounds` rounds) against greedy decoding
           and best-of-N with the same number of generated tokens (chosen by V at the end, and by
           majority vote).
  iterate  `iterate_rounds` rounds of iterative OREO (collect with the current policy → train) against
           iterated rejection sampling (collect → SFT on the right samples), held-out greedy accuracy
           after every round.
Outputs: results.json and PNG plots under the run directory.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
import time
from dataclasses import asdict, dataclass

import jax
import numpy as np

from rljax.checkpoint import write_json
from rljax.cli import LoggingFlags, apply_preset, check_input_dir, make_run_dir, run, save_config
from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.data.preference_collate import collate_kto, collate_preferences, fixed_mismatch
from rljax.eval import exact_match
from rljax.losses.oreo import OREOConfig
from rljax.losses.preference import PREFERENCE_METHODS
from rljax.losses.sft import SFTConfig
from rljax.metrics import plot_curves
from rljax.oreo_training import (CollectConfig, OREOPhaseConfig, collate_trajectories, collect_trajectories,
                        create_oreo_state, oreo, split_keeping_separator, value_scorer)
from rljax.phases import LoopConfig, PreferencePhaseConfig, SFTPhaseConfig, preference, sft
from rljax.pipelines import IterativeOREOConfig, iterative_oreo
from rljax.reference import cached_reference_logps, with_reference
from rljax.recipes.arithmetic_runs import (DEFAULT_SFT_RUN_DIR, RL_IGNORED_FIELDS, SMOKE_SFT_RUN_DIR, check_sft_task,
                                           load_sft, needs_steps, sft_split)
from rljax.rewards.learned import majority_vote
from rljax.sampling import SampleConfig, ValueSearchConfig, sample, value_guided_beam_search
from rljax.state import OptimizerConfig, create_state
from rljax.tasks import get_task, task_slug
from rljax.tokenizer import CharTokenizer

PARTS = ("compare", "search", "iterate")


@dataclass
class Config(LoggingFlags):
    task: str = "arithmetic"  # the SFT run's task (rljax.tasks.get_task)
    parts: tuple[str, ...] = PARTS
    sft_run_dir: str = DEFAULT_SFT_RUN_DIR
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    # offline data
    problems: int = 1024
    samples: int = 8
    balance: int = 4  # 0: keep every sample
    with_references: bool = False  # add each problem's reference solution as one more (right) trajectory
    max_new_tokens: int = 40
    # training on it (every method: the same data, epochs, batch and policy learning rate)
    epochs: int = 2
    batch: int = 16
    # part compare: the preference methods trained beside rejection-sampling SFT and OREO ("none": neither)
    baselines: tuple[str, ...] = ("dpo", "kto")
    lr: float = 2e-5
    value_lr: float = 2e-5
    value_head_lr: float = 1e-3  # the value head starts at zero: it needs a larger step than the backbone
    beta: float = 0.03
    level: str = "step"
    kl_coef: float | None = None  # None: the paper's α for the level
    # evaluation and search
    eval_problems: int = 512
    eval_samples: int = 4
    beams: tuple[int, ...] = (1, 3, 5, 7)
    search_rounds: int = 8
    max_step_tokens: int = 16
    search_chunk: int = 32  # prompts per search call (B² candidates each)
    # iteration
    iterate_rounds: int = 3
    iterate_problems: int = 512
    progress: bool = True
    smoke: bool = False
    train_sft: bool = False  # sft_run_dir does not exist: train the SFT run there first (--smoke sets it)
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


def _sampling(cfg: Config, tok) -> SampleConfig:
    return SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id)


def _separator(cfg: Config) -> str | None:
    """The task's step separator, None for a task without steps (then only --level token runs)."""
    task = get_task(cfg.task)
    return task.separator if task.has_steps else None


def _collect_cfg(cfg: Config, tok) -> CollectConfig:
    return CollectConfig(samples=cfg.samples, sampling=_sampling(cfg, tok), prompts_per_batch=256,
                         balance=cfg.balance or None, separator=_separator(cfg))


def evaluate(params, model, tok, problems, cfg: Config) -> dict:
    """Held-out accuracy (`task.check`): greedy, and the mean over eval_samples samples per problem at T = 1."""
    task = get_task(cfg.task)
    greedy, _ = exact_match(params, model, tok, problems, cfg.max_new_tokens, check=task.check, prompt=task.prompt)
    sampled, _ = exact_match(params, model, tok, problems, cfg.max_new_tokens, n=cfg.eval_samples, temperature=1.0,
                             key=jax.random.key(cfg.seed + 5), check=task.check, prompt=task.prompt)
    return dict(greedy=greedy, sampled=sampled)


def _steps(n_rows: int, cfg: Config) -> int:
    return max(cfg.epochs * n_rows // cfg.batch, 1)


def _loop(steps: int, cfg: Config) -> LoopConfig:
    return LoopConfig(steps=steps, log_every=max(steps // 20, 1), checkpoint_every=0, progress=cfg.progress,
                      **cfg.loop_logging())


def _policy_opt(cfg: Config) -> OptimizerConfig:
    return OptimizerConfig(lr=cfg.lr, schedule="constant")


def _value_opt(cfg: Config) -> OptimizerConfig:
    return OptimizerConfig(lr=cfg.value_lr, head_lr=cfg.value_head_lr, schedule="constant")


def _oreo_phase(cfg: Config, steps: int) -> OREOPhaseConfig:
    return OREOPhaseConfig(loss=OREOConfig(beta=cfg.beta, level=cfg.level, kl_coef=cfg.kl_coef),
                           optimizer=_policy_opt(cfg), value_optimizer=_value_opt(cfg), loop=_loop(steps, cfg))


def train_rs(rows, cfg: Config, model, params, tok, run_dir: str | None, state=None):
    """Rejection-sampling SFT: the right samples that stopped at eos as demonstrations."""
    right = [(r["prompt"], r["completion"]) for r in rows if r["reward"] >= 1.0 and r["eos"]]
    if len(right) < cfg.batch:
        return params, state, 0
    opt = _policy_opt(cfg)
    if state is None:
        state = create_state(model, opt, jax.random.key(cfg.seed), params=params)
    steps = int(state.step) + _steps(len(right), cfg)
    data = BatchIterator(right, cfg.batch, functools.partial(collate_prompt_completion, tok), seed=cfg.seed)
    state = sft(state, data, SFTPhaseConfig(loss=SFTConfig(), optimizer=opt, loop=_loop(steps, cfg)), model=model,
                run_dir=run_dir)
    return state.params, state, len(right)


def right_wrong_pairs(rows) -> list[dict]:
    """Every problem's right samples paired in order with its wrong ones (min(#right, #wrong) pairs).
    Empty samples (the policy stopped at once) are left out: a preference needs text to compare."""
    by = collections.defaultdict(lambda: ([], []))
    for r in with_text(rows):
        by[r["problem"]][0 if r["reward"] >= 1.0 else 1].append(r)
    return [{"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
            for right, wrong in by.values() for a, b in zip(right, wrong) if a["completion"] != b["completion"]]


def with_text(rows) -> list[dict]:
    """The samples with a non-empty completion (what the preference collators accept)."""
    return [r for r in rows if r["completion"]]


def train_preference(algo: str, rows, cfg: Config, model, params, tok, run_dir: str):
    loss = PREFERENCE_METHODS[algo]
    if algo == "kto":
        data = fixed_mismatch([(r["prompt"], r["completion"], r["reward"] >= 1.0) for r in with_text(rows)],
                              seed=cfg.seed)
        collate = functools.partial(collate_kto, tok)
    else:
        data = right_wrong_pairs(rows)
        collate = functools.partial(collate_preferences, tok)
    ref = cached_reference_logps(params, data, collate, model=model,
                                 cache_dir=os.path.join(os.path.dirname(run_dir), "ref_cache"))
    data = with_reference(data, ref)
    opt = _policy_opt(cfg)
    state = create_state(model, opt, jax.random.key(cfg.seed), params=params)
    phase = PreferencePhaseConfig(loss=loss, optimizer=opt, loop=_loop(_steps(len(data), cfg), cfg))
    state = preference(state, BatchIterator(data, cfg.batch, collate, seed=cfg.seed), phase, model=model,
                       run_dir=run_dir)
    return state.params, len(data)


def train_oreo(rows, cfg: Config, model, params, tok, run_dir: str):
    value_model, state = create_oreo_state(model, params, _policy_opt(cfg), jax.random.key(cfg.seed),
                                           value_optimizer=_value_opt(cfg))
    collate = functools.partial(collate_trajectories, tok, separator=_separator(cfg))
    data = BatchIterator(rows, cfg.batch, collate, seed=cfg.seed)
    state = oreo(state, data, _oreo_phase(cfg, _steps(len(rows), cfg)), model=model, run_dir=run_dir)
    return value_model, state


def part_compare(cfg: Config, model, params, tok, train, held, run_dir: str) -> tuple[dict, tuple]:
    t0 = time.perf_counter()
    task = get_task(cfg.task)
    rows = collect_trajectories(params, [p.prompt for p in train], task.answer_reward(), _collect_cfg(cfg, tok),
                                model=model, tokenizer=tok, key=jax.random.key(cfg.seed + 11),
                                out_dir=os.path.join(run_dir, "data"), problems=train)
    if cfg.with_references:  # expert demonstrations mixed into the offline data (the smoke needs right samples)
        sep = _separator(cfg)
        rows = rows + [{"problem": i, "sample": cfg.samples, "prompt": p.prompt, "completion": p.completion,
                        "reward": 1.0, "eos": True,
                        **({"steps": split_keeping_separator(p.completion, sep)} if sep else {})}
                       for i, p in enumerate(train)]
    right = float(np.mean([r["reward"] for r in rows]))
    print(f"compare: {len(rows)} trajectories kept, {right:.1%} right ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = dict(trajectories=len(rows), right_fraction=right, methods={})

    def report(name, trained, **info):
        out["methods"][name] = dict(evaluate(trained, model, tok, held, cfg), **info)
        m = out["methods"][name]
        print(f"compare: {name}: greedy {m['greedy']:.1%}, sampled {m['sampled']:.1%}", flush=True)

    t = time.perf_counter()
    trained, _, n = train_rs(rows, cfg, model, params, tok, os.path.join(run_dir, "rs_sft"))
    report("rejection sampling SFT", trained, rows=n, seconds=time.perf_counter() - t)
    for algo in (a for a in ("dpo", "kto") if a in cfg.baselines):
        if algo == "dpo" and not right_wrong_pairs(rows):
            print("compare: DPO skipped: no problem has both a right and a wrong sample", flush=True)
            continue
        t = time.perf_counter()
        trained, n = train_preference(algo, rows, cfg, model, params, tok, os.path.join(run_dir, algo))
        report(algo.upper(), trained, rows=n, seconds=time.perf_counter() - t)
    t = time.perf_counter()
    value_model, state = train_oreo(rows, cfg, model, params, tok, os.path.join(run_dir, "oreo"))
    report("OREO", state.policy.params, rows=len(rows), seconds=time.perf_counter() - t)
    return out, (value_model, state)


def _search_accuracy(policy, value_model, value_params, model, tok, problems, cfg: Config, beams: int) -> dict:
    task = get_task(cfg.task)
    scfg = ValueSearchConfig(beams=beams, step_end_ids=tuple(tok.encode(task.separator, add_bos=False)),
                             max_step_tokens=cfg.max_step_tokens, max_new_tokens=cfg.max_new_tokens,
                             max_rounds=cfg.search_rounds, eos_id=tok.eos_id, pad_id=tok.pad_id)
    scorer = value_scorer(value_model, stop_ids=(scfg.eos_id, *scfg.stop_ids))  # V before eos: the trained one
    right, generated, finished = [], 0, []
    for i in range(0, len(problems), cfg.search_chunk):
        chunk = problems[i:i + cfg.search_chunk]
        tokens, mask = tok.encode_batch([p.prompt for p in chunk], padding_side="left")
        res = value_guided_beam_search(policy, tokens, mask, scorer, value_params, jax.random.key(cfg.seed + i),
                                       model=model, cfg=scfg)
        texts = tok.decode_batch(np.asarray(res.tokens[:, res.prompt_length:]))
        right += [task.check(p, t) for p, t in zip(chunk, texts)]
        finished += np.asarray(res.finished).tolist()
        generated += res.generated
    return dict(accuracy=float(np.mean(right)), tokens_per_problem=generated / len(problems),
                finished=float(np.mean(finished)))


def _best_of_n(policy, value_model, value_params, model, tok, problems, n: int, cfg: Config) -> dict:
    """N samples per problem; the answer with the highest final V, and the majority answer (`task.extract`;
    the first sample with it is checked)."""
    task = get_task(cfg.task)
    scorer = value_scorer(value_model, stop_ids=tok.eos_ids)  # a finished sample's V at the token before its eos
    by_value, by_vote, generated = [], [], 0
    for i in range(0, len(problems), cfg.search_chunk):
        chunk = problems[i:i + cfg.search_chunk]
        tokens, mask = tok.encode_batch([p.prompt for p in chunk], padding_side="left")
        roll = sample(policy, tokens, mask, jax.random.key(cfg.seed + 7 + i), model=model,
                      cfg=dataclasses.replace(_sampling(cfg, tok), n=n))
        v = np.asarray(scorer(value_params, roll.tokens, roll.attention_mask)).reshape(len(chunk), n)
        texts = tok.decode_batch(np.asarray(roll.completions))
        generated += int(np.asarray(roll.lengths).sum())
        for j, p in enumerate(chunk):
            group = texts[j * n:(j + 1) * n]
            by_value.append(task.check(p, group[int(np.argmax(v[j]))]))
            by_vote.append(task.check(p, group[majority_vote([group], task.extract)[0]]))
    return dict(value=float(np.mean(by_value)), vote=float(np.mean(by_vote)),
                tokens_per_problem=generated / len(problems))


def part_search(cfg: Config, model, tok, held, trained, run_dir: str) -> dict:
    value_model, state = trained
    policy, value_params = state.policy.params, state.value.params
    task = get_task(cfg.task)
    greedy, texts = exact_match(policy, model, tok, held, cfg.max_new_tokens, check=task.check, prompt=task.prompt)
    greedy_tokens = float(np.mean([len(tok.encode(t, add_bos=False)) + 1 for t in texts]))
    out = dict(greedy=greedy, greedy_tokens_per_problem=greedy_tokens, beams={})
    for b in cfg.beams:
        t = time.perf_counter()
        s = _search_accuracy(policy, value_model, value_params, model, tok, held, cfg, b)
        n = max(1, int(round(s["tokens_per_problem"] / greedy_tokens)))
        bon = _best_of_n(policy, value_model, value_params, model, tok, held, n, cfg)
        out["beams"][b] = dict(search=s, best_of_n=dict(n=n, **bon), seconds=time.perf_counter() - t)
        print(f"search: B = {b}: {s['accuracy']:.1%} ({s['tokens_per_problem']:.0f} tokens/problem, "
              f"{s['finished']:.0%} finished); best-of-{n} by V {bon['value']:.1%}, by vote {bon['vote']:.1%} "
              f"({bon['tokens_per_problem']:.0f} tokens); greedy {greedy:.1%}", flush=True)
    _plot({"value-guided search": {b: out["beams"][b]["search"]["accuracy"] for b in cfg.beams},
           "best-of-N by V (same tokens)": {b: out["beams"][b]["best_of_n"]["value"] for b in cfg.beams},
           "majority vote (same tokens)": {b: out["beams"][b]["best_of_n"]["vote"] for b in cfg.beams},
           "greedy": {b: greedy for b in cfg.beams}}, "beams B", os.path.join(run_dir, "search.png"))
    return out


def part_iterate(cfg: Config, model, params, tok, train, held, run_dir: str) -> dict:
    task = get_task(cfg.task)
    problems = train[cfg.problems:cfg.problems + cfg.iterate_problems] or train[:cfg.iterate_problems]
    prompts = [p.prompt for p in problems]
    start = evaluate(params, model, tok, held, cfg)["greedy"]
    out = {"OREO": [start], "rejection sampling": [start]}
    steps = _steps(cfg.iterate_problems * cfg.samples // 2, cfg)  # about the rows kept per round
    icfg = IterativeOREOConfig(rounds=1, steps_per_round=steps, batch_size=cfg.batch, collect=_collect_cfg(cfg, tok),
                               phase=_oreo_phase(cfg, steps))
    where = os.path.join(run_dir, "iterative_oreo")
    for r in range(1, cfg.iterate_rounds + 1):  # rounds=r resumes the same run directory one round further
        _, state = create_oreo_state(model, params, _policy_opt(cfg), jax.random.key(cfg.seed),
                                     value_optimizer=_value_opt(cfg))
        state = iterative_oreo(state, prompts, task.answer_reward(), dataclasses.replace(icfg, rounds=r),
                               model=model, tokenizer=tok, run_dir=where, key=jax.random.key(cfg.seed + 13),
                               allow_change=cfg.force_config, problems=problems)
        out["OREO"].append(evaluate(state.policy.params, model, tok, held, cfg)["greedy"])
        print(f"iterate: OREO round {r}: greedy {out['OREO'][-1]:.1%}", flush=True)
    policy, rs_state = params, None
    for r in range(1, cfg.iterate_rounds + 1):
        rows = collect_trajectories(policy, prompts, task.answer_reward(), _collect_cfg(cfg, tok), model=model,
                                    tokenizer=tok, key=jax.random.fold_in(jax.random.key(cfg.seed + 13), r - 1),
                                    problems=problems)
        policy, rs_state, _ = train_rs(rows, cfg, model, policy, tok, None, state=rs_state)
        out["rejection sampling"].append(evaluate(policy, model, tok, held, cfg)["greedy"])
        print(f"iterate: rejection sampling round {r}: greedy {out['rejection sampling'][-1]:.1%}", flush=True)
    _plot({k: dict(enumerate(v)) for k, v in out.items()}, "round", os.path.join(run_dir, "iterate.png"))
    return out


def _plot(curves: dict, xlabel: str, path: str) -> None:
    try:
        plot_curves(curves, path, xlabel=xlabel, ylabel="held-out accuracy")
    except ImportError:  # plotting is optional (rljax[plot])
        pass


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, problems=16, samples=4, epochs=1, batch=8, eval_problems=4, eval_samples=2,
                     max_new_tokens=16, beams=(1, 2), search_rounds=3, iterate_rounds=1, iterate_problems=8,
                     max_step_tokens=8, search_chunk=4, with_references=True, train_sft=True,
                     sft_run_dir=SMOKE_SFT_RUN_DIR)
    unknown = [p for p in cfg.parts if p not in PARTS]
    if unknown:
        raise ValueError(f"oreo_arithmetic: unknown --parts {unknown[0]!r}; choose from {', '.join(PARTS)}")
    unknown = [b for b in cfg.baselines if b not in ("dpo", "kto", "none")]
    if unknown:
        raise ValueError(f"oreo_arithmetic: unknown --baselines {unknown[0]!r}; choose from dpo, kto, none")
    task = get_task(cfg.task)
    if cfg.level == "step":
        needs_steps(task, "--level step (OREO's step-level value)")
    if "search" in cfg.parts:
        needs_steps(task, "--parts search (value-guided step beam search)")
    check_input_dir(cfg.sft_run_dir, "--sft-run-dir", create=cfg.train_sft, create_flag="--train-sft")
    check_sft_task(cfg.task, cfg.sft_run_dir)  # before the run directory is made
    name = "oreo_arithmetic" if cfg.task == "arithmetic" else f"oreo-{task_slug(cfg.task)}"
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, name)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=RL_IGNORED_FIELDS)  # before any training
    tok = CharTokenizer()
    model, params, sft_cfg = load_sft(cfg.sft_run_dir, tok, smoke=cfg.smoke, progress=cfg.progress,
                                      run_if_missing=True, create=cfg.train_sft, logging=cfg.logging_flags(),
                                      task=cfg.task)
    _, train, test = sft_split(sft_cfg)
    held = test[:cfg.eval_problems]
    results = dict(config=asdict(cfg), sft=evaluate(params, model, tok, held, cfg))
    print(f"SFT: greedy {results['sft']['greedy']:.1%}, sampled {results['sft']['sampled']:.1%}", flush=True)
    trained = None
    if "compare" in cfg.parts or "search" in cfg.parts:
        results["compare"], trained = part_compare(cfg, model, params, tok, train[:cfg.problems], held, run_dir)
    if "search" in cfg.parts:
        results["search"] = part_search(cfg, model, tok, held, trained, run_dir)
    if "iterate" in cfg.parts:
        results["iterate"] = part_iterate(cfg, model, params, tok, train, held, run_dir)
    write_json(os.path.join(run_dir, "results.json"), results, default=str)  # atomic: a crash leaves no half file
    return results


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
