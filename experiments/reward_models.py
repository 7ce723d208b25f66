"""Reward models on an embedded task (arithmetic by default), whose hidden gold scorer gives the ground truth.

    python -m experiments.reward_models --sft-run-dir <SFT run>      # parts bt, bon and rl
    python -m experiments.reward_models --parts bt --pair-counts 250 1000 4000
    python -m experiments.reward_models --parts bt rl --rl-seeds 0 1 2
    python -m experiments.reward_models --parts onpolicy rl --rl-seeds 0 1 2
    python -m experiments.reward_models --smoke
    python -m experiments.reward_models --task countdown --sft-run-dir <countdown SFT run> --parts bon

--task (`rljax.tasks`: arithmetic, sorting, countdown, rg:<generator>) must be the SFT run's task; the
gold score, corruptions, answer and step checks are the task's (`Task.gold_score`, `Task.candidate`,
`Task.check`, `Task.check_steps`, `Task.separator`). Part bon's PRM needs a task with steps.

(a) bt: Bradley–Terry reward models from the SFT backbone (a zero reward head
    added), each trained on n synthetic preference pairs whose labels are
    Bernoulli(σ(β (gold_a − gold_b))) (`rljax.data.synthetic.preference_pairs`):
    held-out pairwise accuracy against the gold order and Spearman correlation
    with the gold score of held-out candidates, for n in pair_counts.
(b) bon: best-of-N on held-out problems, N samples per problem from the SFT
    policy at temperature 1: majority vote, an outcome verifier (ORM, trained on
    the SFT policy's own samples on problems outside its SFT data, labelled by
    answer correctness) and a process
    reward model trained on automatic Math-Shepherd labels (soft, n continuations
    per step prefix by the SFT policy) aggregated by min / product / last, with
    pass@N (any sample right) as the ceiling. Accuracy at N is the mean over the
    disjoint groups of N among the n_max samples of every problem.
(rl) GRPO from the SFT policy with the reward model of part bt trained on the most
    pairs as its only reward, one run per seed: the gold score (hidden from RL) and
    the reward model's score of held-out samples (temperature 1) before and after,
    and the KL to the SFT policy, so a gold gain is told apart from reward hacking.
(onpolicy) a Bradley–Terry reward model trained on the SFT policy's own samples: n samples
    per problem on problems outside its SFT data, ranked by the gold score as one K-wise
    list per problem (all preferred pairs of a problem in one example, ties allowed);
    held-out pairwise accuracy on the policy's samples of test problems, and (with part
    rl) GRPO against it with the gold score measured: the reward model sees the
    distribution RL will visit, unlike part bt's, which RL hacks. With --onpolicy-prior
    the score is r_θ + log π_SFT(y|x): the SFT policy's summed log-likelihood of the
    answer is a fixed prior (it already ranks the policy's own samples of a problem
    far better than a head trained from scratch) and the head, trained on the gold
    preferences, learns what the prior gets wrong; with part rl GRPO also runs against
    the prior alone, to tell what the gold preferences add.
(overopt) over-optimisation (Gao et al. 2022) with the part-bt reward model as the
    proxy: best-of-n (n = 1 … n_max) and GRPO measured along the run, gold and proxy
    score against d = √KL(π ‖ π_SFT), with R_bon(d) = d (α − β d) and
    R_RL(d) = d (α − β log d) fitted to the gold gain.
(rl, with --rl-rule) the yardstick: GRPO with the same settings against the task's rule reward (1 for
    the right answer + 0.1 for the format, what experiments.rl_arithmetic optimises), gold measured alike.
(feedback) reward models from simulated implicit feedback (clicks at random display
    positions with examination probability 1 / position, likes that lean to longer
    answers): clicks naive, clicks with inverse-propensity weights, likes; Spearman
    with gold and calibration against the true relevance, and (with part rl) GRPO
    against each, measuring the gold score it does not see.

Outputs: results.json, and bon.png under the run directory.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import jax
import numpy as np

from rljax.cli import LoggingFlags, apply_preset, check_input_dir, make_run_dir, run, save_config
from rljax.metrics import plot_curves, read_metrics
from rljax.data.collate import BatchIterator
from rljax.data.reward_collate import (collate_feedback, collate_pairs, collate_scored, collate_steps,
                                       collate_verifier, split_solution)
from rljax.data.synthetic import gold_ranked_lists, preference_pairs, relevance, simulated_feedback
from rljax.losses.reward_model import FeedbackConfig, RankingConfig, TokenLabelConfig
from rljax.models import add_head
from rljax.phases import LoopConfig, RewardModelPhaseConfig, train_reward_model
from rljax.pipelines import IterativeRLHFConfig
from rljax.recipes.arithmetic_runs import (DEFAULT_SFT_RUN_DIR, RL_IGNORED_FIELDS, SMOKE_SFT_RUN_DIR, check_sft_task,
                                           load_sft, needs_steps, rule_reward, sft_split)
from rljax.rewards.evaluation import reward_model_eval
from rljax.rewards.process_labels import label_steps, model_completer
from rljax.rewards.learned import (aggregate_steps, likelihood_reward, majority_vote, reward_model_reward,
                                        stack_step_scores, step_scorer)
from rljax.rewards.rules import weighted_sum
from rljax.sampling import SampleConfig, sample
from rljax.state import OptimizerConfig, create_state
from rljax.tasks import Task, get_task, task_slug
from rljax.tokenizer import CharTokenizer


PARTS = ("bt", "onpolicy", "bon", "rl", "feedback", "overopt")


@dataclass
class Config(LoggingFlags):
    task: str = "arithmetic"  # the SFT run's task (rljax.tasks.get_task)
    parts: tuple[str, ...] = PARTS
    sft_run_dir: str = DEFAULT_SFT_RUN_DIR
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    lr: float = 1e-4  # the backbone's learning rate when training a reward model
    head_lr: float = 1e-3
    batch: int = 16
    # (a) Bradley–Terry from synthetic preferences
    pair_counts: tuple[int, ...] = (250, 1000, 4000)
    bt_beta: float = 1.0
    bt_epochs: int = 2
    eval_problems: int = 512
    # (b) best-of-N
    bon_problems: int = 128
    bon_n: tuple[int, ...] = (1, 4, 16, 64)
    verifier_problems: int = 512  # train problems sampled for the verifier and the PRM
    verifier_samples: int = 8  # samples per train problem
    verifier_epochs: int = 2
    prm_solutions: int = 1024  # of those samples, labelled step by step
    prm_n: int = 8  # continuations per step prefix (Math-Shepherd's N)
    # (onpolicy) BT reward model on ranked lists of the SFT policy's own samples
    onpolicy_problems: int = 1024
    onpolicy_samples: int = 8
    onpolicy_epochs: int = 2
    # r = r_θ + log π_SFT(y|x): the SFT policy's summed log-likelihood of each answer as a fixed prior the
    # reward head learns to correct (RankingBatch.prior); with part rl, GRPO also runs against the prior alone
    onpolicy_prior: bool = False
    # iterative RLHF with the onpolicy reward model: retrain it every refresh_every GRPO iterations
    # on gold-ranked samples of the current policy (0: the reward model stays fixed)
    refresh_every: int = 0
    refresh_problems: int = 256
    refresh_epochs: int = 2
    # (rl) GRPO against the learned reward model(s)
    rl_iterations: int = 200
    rl_lr: float = 2e-5
    rl_kl_coef: float = 0.04  # GRPO's β (per-token k3 penalty to the SFT policy)
    rl_seeds: tuple[int, ...] = (0,)
    rl_eval_problems: int = 256
    rl_rule: bool = False  # with part rl: GRPO against the task's rule reward too (answer + 0.1 format), the yardstick
    # (feedback) reward models from simulated implicit feedback
    feedback_problems: int = 1000  # 5 logged displays each
    feedback_epochs: int = 1
    feedback_rl: bool = True  # with part rl: GRPO against each feedback model too
    # (overopt) over-optimisation against the part-bt reward model
    overopt_iterations: int = 300
    overopt_eval_every: int = 50
    overopt_lr: float = 5e-5
    max_new_tokens: int = 40
    progress: bool = True
    smoke: bool = False
    train_sft: bool = False  # sft_run_dir does not exist: train the SFT run there first (--smoke sets it)
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


def _in_chunks(fn, prompts, completions, size: int = 1024) -> list:
    """fn on `size` rows at a time (bounded memory per forward): the per-chunk results, in order."""
    return [fn(prompts[i:i + size], completions[i:i + size]) for i in range(0, len(completions), size)]


def _gold_candidates(problems, tok, *, seed: int, task: Task):
    """One candidate per problem (the reference or a random corruption, `task.candidate`) with its gold score:
    -> ([(prompt, completion)], [gold], ScoreBatches of 64 holding the gold scores)."""
    rng = np.random.default_rng(seed)
    kinds = task.kinds
    cands = [(p.prompt, task.candidate(p, rng, kinds[rng.integers(len(kinds))])) for p in problems]
    gold = [task.gold_score(p, c) for p, (_, c) in zip(problems, cands)]
    batches = [collate_scored(tok, [(q, c, g) for (q, c), g in zip(cands[i:i + 64], gold[i:i + 64])])
               for i in range(0, len(cands), 64)]
    return cands, gold, batches


def _train(model, params, data, loss, steps: int, cfg: Config, run_dir: str | None, eval_fn=None, state=None):
    """A reward model trained from `params` (a fresh optimizer), or `state` continued, to `steps` steps."""
    opt = _rm_optimizer(cfg)
    if state is None:  # a copy: training donates its state, and `params` shares arrays with the SFT policy
        state = create_state(model, opt, jax.random.key(cfg.seed), params=params)
    phase = RewardModelPhaseConfig(loss=loss, optimizer=opt,
                                   loop=LoopConfig(steps=steps, log_every=max(steps // 20, 1),
                                                   checkpoint_every=0, progress=cfg.progress, **cfg.loop_logging()))
    return train_reward_model(state, data, phase, model=model, run_dir=run_dir, eval_fn=eval_fn)


def part_bt(cfg: Config, model, params, tok, train, test, run_dir: str) -> dict:
    task = get_task(cfg.task)
    rm, rm_params = add_head(model, params, "reward")
    collate = lambda rows: collate_pairs(tok, [(r["prompt"], r["chosen"], r["rejected"]) for r in rows])  # noqa: E731
    held = preference_pairs(test[:cfg.eval_problems], cfg.seed + 1, noise_free=True, task=task)
    held = [r for r in held if r["gold_margin"] != 0]  # gold ties have no right order
    cands, _, gold_batches = _gold_candidates(test[:cfg.eval_problems], tok, seed=cfg.seed + 2, task=task)
    evaluate = reward_model_eval(rm, [collate(held[i:i + 64]) for i in range(0, len(held), 64)] + gold_batches)
    rows, best = [], None
    for n in cfg.pair_counts:
        pairs = preference_pairs(train[:n], cfg.seed, beta=cfg.bt_beta, task=task)
        data = BatchIterator(pairs, min(cfg.batch, n), collate, seed=cfg.seed)
        steps = max(cfg.bt_epochs * n // cfg.batch, 1)
        t0 = time.perf_counter()
        state = _train(rm, rm_params, data, RankingConfig(), steps, cfg, os.path.join(run_dir, f"bt-{n}"))
        result = evaluate(state)
        if n == max(cfg.pair_counts):
            best = state.params
        rows.append(dict(pairs=n, steps=steps, seconds=time.perf_counter() - t0, **result))
        print(f"bt: {n} pairs -> held-out accuracy {result['pairwise_accuracy']:.3f}, "
              f"Spearman with gold {result['spearman']:.3f}", flush=True)
    return dict(rows=rows, held_out_pairs=len(held), candidates=len(cands)), (rm, best)


def with_priors(lists, prior) -> list[tuple]:
    """(prompt, answers, ranks) lists -> (prompt, answers, ranks, priors): prior(prompts, answers) per answer,
    scored 1,024 rows at a time; `prior` None leaves the lists as they are."""
    if prior is None or not lists:
        return list(lists)
    prompts = [q for q, answers, _ in lists for _ in answers]
    flat = [a for _, answers, _ in lists for a in answers]
    scores = np.concatenate(_in_chunks(prior, prompts, flat))
    out, at = [], 0
    for q, answers, ranks in lists:
        out.append((q, answers, ranks, scores[at:at + len(answers)].tolist()))
        at += len(answers)
    return out


def ranked_collate(tok, K: int):
    """collate_ranked for (prompt, answers, ranks[, priors]) lists, K answers per list."""
    from rljax.data.reward_collate import collate_ranked

    def collate(lists):
        priors = [x[3] for x in lists] if len(lists[0]) > 3 else None
        return collate_ranked(tok, [x[:3] for x in lists], answers_per_list=K, priors=priors)

    return collate


def onpolicy_scorer(rm, params, tok, prior):
    """The part-onpolicy reward: the head's score, plus the prior (log π_SFT) when it was trained with one."""
    head = reward_model_reward(rm, params, tok)
    return head if prior is None else weighted_sum((1.0, head), (1.0, prior))


def part_onpolicy(cfg: Config, model, params, tok, train, test, run_dir: str, levels=(1, 2)):
    """A BT reward model on gold-ranked lists of the SFT policy's samples (unseen problems), with
    the SFT policy's log-likelihood as a fixed prior when cfg.onpolicy_prior."""
    t0 = time.perf_counter()
    task = get_task(cfg.task)
    key = jax.random.key(cfg.seed + 20)
    prior = likelihood_reward(model, params, tok, reduction="sum") if cfg.onpolicy_prior else None
    problems = unseen_problems(train, test, cfg.onpolicy_problems, levels, seed=cfg.seed + 2000, task=task)
    lists = with_priors(gold_ranked_lists(problems, _samples(params, model, tok, problems, cfg.onpolicy_samples,
                                                             cfg, jax.random.fold_in(key, 1)), task), prior)
    held_problems = test[:cfg.eval_problems]
    held = with_priors(gold_ranked_lists(held_problems, _samples(params, model, tok, held_problems,
                                                                 cfg.onpolicy_samples, cfg,
                                                                 jax.random.fold_in(key, 2)), task), prior)
    K = cfg.onpolicy_samples
    collate = ranked_collate(tok, K)
    pairs = sum(int((np.array(x[2])[:, None] < np.array(x[2])[None, :]).sum()) for x in lists)
    print(f"onpolicy: {len(lists)} ranked lists ({pairs} preferred pairs) of {len(problems)} problems "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    _, _, gold_batches = _gold_candidates(held_problems, tok, seed=cfg.seed + 2, task=task)
    rm, rm_params = add_head(model, params, "reward")
    held_batches = [collate(held[i:i + 32]) for i in range(0, len(held), 32)]
    evaluate = reward_model_eval(rm, held_batches + gold_batches)
    extra = {}
    if prior is not None:  # the zero head scores the prior alone
        extra["prior_pairwise_accuracy"] = reward_model_eval(rm, held_batches, params_of=lambda p: p)(
            rm_params)["pairwise_accuracy"]
        print(f"onpolicy: the prior alone (log π_SFT) ranks held-out samples with accuracy "
              f"{extra['prior_pairwise_accuracy']:.3f}", flush=True)
    batch = max(cfg.batch // 4, 1)  # K answers per example
    data = BatchIterator(lists, min(batch, len(lists)), collate, seed=cfg.seed)
    steps = max(cfg.onpolicy_epochs * len(lists) // batch, 1)
    final = {}  # the phase evaluates its final state and logs it as rm/eval/*; the study reports that result

    def evaluate_and_keep(state):
        final.clear()
        final.update(evaluate(state))
        return dict(final)

    state = _train(rm, rm_params, data, RankingConfig(), steps, cfg, os.path.join(run_dir, "onpolicy"),
                   eval_fn=evaluate_and_keep)
    result = final
    print(f"onpolicy: held-out accuracy on policy samples {result['pairwise_accuracy']:.3f}, "
          f"Spearman with gold on synthetic candidates {result['spearman']:.3f}", flush=True)
    return dict(lists=len(lists), pairs=pairs, held_out_lists=len(held), steps=steps,
                seconds=time.perf_counter() - t0, **extra, **result), (rm, state, lists, prior)


def _rm_optimizer(cfg: Config) -> OptimizerConfig:
    """The reward models' optimizer: the backbone at cfg.lr, the reward head at cfg.head_lr."""
    return OptimizerConfig(lr=cfg.lr, schedule="constant", head_lr=cfg.head_lr)


def onpolicy_rlhf(cfg: Config, model, rm, rm_state, lists, tok, train, test, levels, prior=None) -> dict:
    """Iterative RLHF (`rljax.pipelines.iterative_rlhf`) for `grpo_against`, from the part-onpolicy
    reward model: before each block of refresh_every GRPO iterations but the first, refresh k
    samples onpolicy_samples answers of the current policy to refresh_problems new problems,
    ranks them by the gold score, measures the reward model's pairwise accuracy on them (how
    well it ranks what RL now produces), then trains it on them, replaying all earlier lists,
    for refresh_epochs passes over the new ones."""
    K = cfg.onpolicy_samples
    task = get_task(cfg.task)

    def rank_samples(policy_params, k: int) -> list:
        problems = unseen_problems(train, test, cfg.refresh_problems, levels, seed=cfg.seed + 3000 + k, task=task)
        samples = _samples(policy_params, model, tok, problems, K, cfg, jax.random.key(cfg.seed + 4000 + k))
        return with_priors(gold_ranked_lists(problems, samples, task), prior)

    rlhf = IterativeRLHFConfig(iterations=cfg.rl_iterations, refresh_every=cfg.refresh_every,
                               rm_epochs=cfg.refresh_epochs, rm_batch_size=max(cfg.batch // 4, 1),
                               rm_loss=RankingConfig(), rm_optimizer=_rm_optimizer(cfg), seed=cfg.seed, log_every=10,
                               progress=cfg.progress, **cfg.loop_logging())
    return dict(cfg=rlhf, rm_model=rm, rm_state=rm_state, rank_samples=rank_samples, initial_lists=list(lists),
                make_reward=lambda rm_params: onpolicy_scorer(rm, rm_params, tok, prior),
                collate=ranked_collate(tok, K))


def grpo_against(cfg: Config, model, params, proxy, tok, train, test, run_dir: str, name: str,
                 rlhf: dict | None = None) -> dict:
    """GRPO from `params` with `proxy` as the only reward, one run per rl_seed: gold score (hidden
    from RL), proxy score, accuracy and length of held-out samples (4 per problem, T = 1)
    before and after, and the final KL (k3) to the start.

    rlhf (`onpolicy_rlhf`): iterative RLHF instead (`rljax.pipelines.iterative_rlhf`): per seed a
    copy of the reward model, refreshed on gold-ranked samples of the current policy every
    cfg.refresh_every iterations and checkpointed with the policy; the proxy after is the
    refreshed reward model, and each run reports its refreshes."""
    from rljax.losses import GRPOConfig
    from rljax.phases import PromptBatch
    from rljax.pipelines import create_rlhf_state, iterative_rlhf, rl_state, train_rl
    from rljax.rl import RLConfig

    held = test[:cfg.rl_eval_problems]
    task = get_task(cfg.task)

    def measure(p, scorer) -> dict:
        cands = _samples(p, model, tok, held, 4, cfg, jax.random.key(7))
        prompts = [q.prompt for q, cs in zip(held, cands) for _ in cs]
        problems = [q for q, cs in zip(held, cands) for _ in cs]
        flat = [c for cs in cands for c in cs]
        gold = [task.gold_score(q, c) for q, c in zip(problems, flat)]
        right = [task.check(q, c) for q, c in zip(problems, flat)]
        return dict(gold=float(np.mean(gold)), proxy=float(np.mean(scorer(prompts, flat, problems=problems))),
                    accuracy=float(np.mean(right)), length=float(np.mean([len(c) for c in flat])))

    def collate(problems):
        tokens, mask = tok.encode_batch([p.prompt for p in problems], padding_side="left")
        return PromptBatch(tokens=tokens, mask=mask, metadata={"problems": list(problems)})

    before = measure(params, proxy)
    runs = []
    for seed in cfg.rl_seeds:
        rl_cfg = RLConfig(algorithm="grpo", sampling=SampleConfig(max_new_tokens=cfg.max_new_tokens, n=8,
                                                                  eos_id=tok.eos_id, pad_id=tok.pad_id),
                          loss=GRPOConfig(kl_coef=cfg.rl_kl_coef),
                          optimizer=OptimizerConfig(lr=cfg.rl_lr, schedule="constant"), track_kl=True)
        where = os.path.join(run_dir, f"{name}-seed{seed}")
        prompts = BatchIterator(train, 16, collate, seed=seed + 1)
        if rlhf is None:
            state = rl_state(model, params, rl_cfg, jax.random.key(seed))
            state = train_rl(state, prompts, proxy, rl_cfg, model=model, decode=tok.decode_batch,
                             steps=cfg.rl_iterations, run_dir=where, log_every=10, progress=cfg.progress,
                             **cfg.loop_logging())
            after, rl_dir = measure(state.policy.params, proxy), where
        else:
            state = create_rlhf_state(model, params, rlhf["rm_state"], rl_cfg, jax.random.key(seed))
            state, refreshes = iterative_rlhf(state, prompts, rlhf["rank_samples"], rlhf["make_reward"], rlhf["cfg"],
                                              rl_cfg, model=model, rm_model=rlhf["rm_model"], decode=tok.decode_batch,
                                              collate=rlhf["collate"], initial_lists=rlhf["initial_lists"],
                                              run_dir=where, allow_change=cfg.force_config)
            after = measure(state["policy"].policy.params, rlhf["make_reward"](state["reward_model"].params))
            after["refreshes"], rl_dir = refreshes, os.path.join(where, "policy")
        rows = [r for r in read_metrics(rl_dir) if "rl/kl_k3" in r]
        after["kl_k3"] = rows[-1]["rl/kl_k3"] if rows else None
        runs.append(after)
        print(f"{name}: seed {seed}: " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in before),
              flush=True)
    gains = np.array([r["gold"] - before["gold"] for r in runs])
    return dict(before=before, after=runs, gold_gain_mean=float(gains.mean()),
                gold_gain_std=float(gains.std(ddof=1)) if len(gains) > 1 else None)


def part_feedback(cfg: Config, model, params, tok, train, test, run_dir: str) -> dict:
    """Feedback reward models from simulated users (`simulated_feedback`: 5 displays per problem at
    random positions, examined with probability 1 / position; likes lean to longer answers):
    clicks naive, clicks with inverse-propensity weights, likes. Each: Spearman with gold and
    mean predicted probability against the true mean relevance of held-out candidates; then
    GRPO against each, with the gold score it does not see."""
    task = get_task(cfg.task)
    logs = simulated_feedback(train[:cfg.feedback_problems], cfg.seed, task=task)
    cands, gold, gold_batches = _gold_candidates(test[:cfg.eval_problems], tok, seed=cfg.seed + 3, task=task)
    rm, rm_params = add_head(model, params, "reward")
    evaluate = reward_model_eval(rm, gold_batches)
    out = {}
    for name, signal, ipw in (("clicks_naive", "click", False), ("clicks_ipw", "click", True),
                              ("likes", "like", False)):
        data = BatchIterator(logs, cfg.batch, lambda b, s=signal, w=ipw: collate_feedback(
            tok, [(r["prompt"], r["completion"], r[s], r["propensity"]) for r in b], ipw=w), seed=cfg.seed)
        steps = max(cfg.feedback_epochs * len(logs) // cfg.batch, 1)
        state = _train(rm, rm_params, data, FeedbackConfig(ipw=ipw), steps, cfg, os.path.join(run_dir, name))
        scorer = reward_model_reward(rm, state.params, tok, probability=True)
        prob = float(np.mean(scorer([q for q, _ in cands], [c for _, c in cands])))
        result = dict(**evaluate(state), prob_mean=prob,
                      relevance_mean=float(np.mean([relevance(g) for g in gold])))
        print(f"feedback: {name}: Spearman with gold {result['spearman']:.3f}, mean P {prob:.3f} "
              f"(true mean relevance {result['relevance_mean']:.3f})", flush=True)
        if "rl" in cfg.parts and cfg.feedback_rl:
            result["rl"] = grpo_against(cfg, model, params, scorer, tok, train, test, run_dir, f"rl-{name}")
        out[name] = result
    return out


def part_overopt(cfg: Config, model, params, rm, rm_params, tok, train, test, run_dir: str) -> dict:
    """Over-optimisation (Gao et al. 2022) against the reward model of part bt as the proxy:
    best-of-n for n = 1, 2, 4, ..., and GRPO measured every overopt_eval_every iterations;
    gold and proxy score of the chosen / sampled held-out completions against d = √KL, and
    the fitted R_bon(d) = d (α − β d), R_RL(d) = d (α − β log d)."""
    from rljax.models.logprobs import target_mask, token_logprobs
    from rljax.phases import PromptBatch
    from rljax.pipelines import rl_state, train_rl
    from rljax.rewards.evaluation import best_of_n_kl, fit_overoptimisation
    from rljax.rl import RLConfig

    proxy = reward_model_reward(rm, rm_params, tok)
    task = get_task(cfg.task)
    held = test[:cfg.rl_eval_problems]
    prompts = [q.prompt for q in held]

    def scores(problems, cands):
        flat_p = [q.prompt for q, cs in zip(problems, cands) for _ in cs]
        flat_c = [c for cs in cands for c in cs]
        px = np.concatenate(_in_chunks(proxy, flat_p, flat_c))
        gd = np.array([task.gold_score(q, c) for q, cs in zip(problems, cands) for c in cs])
        return px.reshape(len(problems), -1), gd.reshape(len(problems), -1)

    n_max = max(cfg.bon_n)
    px, gd = scores(held, _samples(params, model, tok, held, n_max, cfg, jax.random.key(11)))
    bon = []
    n = 1
    while n <= n_max:
        pick_g, pick_p = [], []
        for g in range(n_max // n):
            sl = slice(g * n, (g + 1) * n)
            best = np.argmax(px[:, sl], axis=1)
            pick_g.append(gd[:, sl][np.arange(len(held)), best])
            pick_p.append(px[:, sl][np.arange(len(held)), best])
        bon.append(dict(n=n, d=float(np.sqrt(best_of_n_kl(n))), gold=float(np.mean(pick_g)),
                        proxy=float(np.mean(pick_p))))
        n *= 2
    gold0 = bon[0]["gold"]
    fit_bon = fit_overoptimisation([b["d"] for b in bon], [b["gold"] - gold0 for b in bon], "bon")
    print("overopt: best-of-n gold " + ", ".join(f"n={b['n']}: {b['gold']:.3f}" for b in bon)
          + f"; fit α = {fit_bon[0]:.3f}, β = {fit_bon[1]:.3f}", flush=True)

    ref_lp = jax.jit(lambda p, t, m: token_logprobs(p, t, m, model=model))
    scfg = SampleConfig(max_new_tokens=cfg.max_new_tokens, n=4, temperature=1.0, eos_id=tok.eos_id,
                        pad_id=tok.pad_id)
    tokens, mask = tok.encode_batch(prompts, padding_side="left")

    def measure(state) -> dict:
        """Gold and proxy of 4 held-out samples per problem, and KL(π ‖ π_SFT) per sequence
        (Σ_t log π − log π_SFT over the sampled tokens, averaged: an unbiased estimate)."""
        roll = sample(state.policy.params, tokens, mask, jax.random.key(13), model=model, cfg=scfg)
        ref = ref_lp(params, roll.tokens, roll.attention_mask)
        m = target_mask(roll.loss_mask, roll.attention_mask)
        kl = float(np.mean(np.sum(np.asarray((roll.logprobs - ref) * m), axis=1)))
        text = tok.decode_batch(np.asarray(roll.completions))
        p2, g2 = scores(held, [text[i * 4:(i + 1) * 4] for i in range(len(held))])
        return dict(kl=kl, d=float(np.sqrt(max(kl, 0.0))), gold=float(g2.mean()), proxy=float(p2.mean()))

    def collate(problems):
        t, mk = tok.encode_batch([p.prompt for p in problems], padding_side="left")
        return PromptBatch(tokens=t, mask=mk, metadata={"problems": list(problems)})

    rl_cfg = RLConfig(algorithm="grpo", sampling=SampleConfig(max_new_tokens=cfg.max_new_tokens, n=8,
                                                              eos_id=tok.eos_id, pad_id=tok.pad_id),
                      optimizer=OptimizerConfig(lr=cfg.overopt_lr, schedule="constant"), track_kl=False)
    state = rl_state(model, params, rl_cfg, jax.random.key(cfg.seed))
    curve = [dict(iteration=0, **measure(state))]
    where = os.path.join(run_dir, "overopt-rl")
    for stop in range(cfg.overopt_eval_every, cfg.overopt_iterations + 1, cfg.overopt_eval_every):
        state = train_rl(state, BatchIterator(train, 16, collate, seed=cfg.seed + 1), proxy, rl_cfg, model=model,
                         decode=tok.decode_batch, steps=stop, run_dir=where, log_every=10, progress=cfg.progress,
                         **cfg.loop_logging())
        curve.append(dict(iteration=stop, **measure(state)))
        print(f"overopt: GRPO iteration {stop}: d {curve[-1]['d']:.3f}, gold {curve[-1]['gold']:.3f}, "
              f"proxy {curve[-1]['proxy']:.3f}", flush=True)
    fit_rl = None
    if sum(c["d"] > 0 for c in curve) >= 2:
        fit_rl = fit_overoptimisation([c["d"] for c in curve], [c["gold"] - curve[0]["gold"] for c in curve], "rl")
    return dict(best_of_n=bon, fit_bon=dict(alpha=fit_bon[0], beta=fit_bon[1]), rl=curve,
                fit_rl=None if fit_rl is None else dict(alpha=fit_rl[0], beta=fit_rl[1]))


def _samples(params, model, tok, problems, n: int, cfg: Config, key) -> list[list[str]]:
    """n completions per problem at temperature 1, in chunks of about 1,024 rows."""
    scfg = SampleConfig(max_new_tokens=cfg.max_new_tokens, n=n, temperature=1.0, eos_id=tok.eos_id,
                        pad_id=tok.pad_id)
    out, per = [], max(1024 // n, 1)
    for start in range(0, len(problems), per):
        chunk = problems[start:start + per]
        tokens, mask = tok.encode_batch([p.prompt for p in chunk], padding_side="left")
        roll = sample(params, tokens, mask, jax.random.fold_in(key, start), model=model, cfg=scfg)
        text = tok.decode_batch(np.asarray(roll.completions))
        out += [text[i * n:(i + 1) * n] for i in range(len(chunk))]
    return out


def unseen_problems(train, test, n: int, levels, seed: int, *, task: Task) -> list:
    """n problems of `task` that appear in neither the SFT run's train nor its test split (by `task.key`):
    samples on SFT training problems are much more often right (memorised) than on new ones, so a
    verifier trained on them learns the wrong distribution."""
    seen = {task.key(p) for p in train} | {task.key(p) for p in test}
    out = []
    for p in task.split(n + len(seen), 0, levels=levels, seed=seed)[0]:
        if task.key(p) not in seen:
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"unseen_problems: found only {len(out)} of {n} new problems at levels {levels}")


def part_bon(cfg: Config, model, params, tok, train, test, run_dir: str, levels=(1, 2)) -> dict:
    task = needs_steps(get_task(cfg.task), "--parts bon (its process reward model)")
    sep = task.separator
    key = jax.random.key(cfg.seed + 10)
    t0 = time.perf_counter()
    # training data: the SFT policy's own samples on problems it never saw, labelled by the gold checker
    vp = unseen_problems(train, test, cfg.verifier_problems, levels, seed=cfg.seed + 1000, task=task)
    samples = _samples(params, model, tok, vp, cfg.verifier_samples, cfg, jax.random.fold_in(key, 1))
    rows = [(p.prompt, c, float(task.check(p, c))) for p, cs in zip(vp, samples) for c in cs]
    print(f"bon: {len(rows)} verifier samples, {np.mean([r[2] for r in rows]):.1%} right "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rm, rm_params = add_head(model, params, "reward")
    data = BatchIterator(rows, cfg.batch, lambda b: collate_verifier(tok, b), seed=cfg.seed)
    orm = _train(rm, rm_params, data, TokenLabelConfig(), max(cfg.verifier_epochs * len(rows) // cfg.batch, 1),
                 cfg, os.path.join(run_dir, "orm")).params
    # PRM: automatic soft labels for a subset, the SFT policy as completer
    t1 = time.perf_counter()
    problem_of = [p for p, cs in zip(vp, samples) for _ in cs]
    chosen = [i for i, r in enumerate(rows) if split_solution(r[1], sep)][:cfg.prm_solutions]
    steps = [split_solution(rows[i][1], sep) for i in chosen]
    complete = model_completer(model, params, tok, SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                                                eos_id=tok.eos_id, pad_id=tok.pad_id))
    labels = label_steps([rows[i][0] for i in chosen], steps, lambda m, c: task.check(problem_of[chosen[m]], c),
                         complete, n=cfg.prm_n, separator=sep, key=jax.random.fold_in(key, 2))
    label_s = time.perf_counter() - t1
    n_steps = sum(len(s) for s in steps)
    print(f"bon: {n_steps} steps of {len(chosen)} solutions labelled in {label_s:.0f} s", flush=True)
    prm_rows = [(rows[i][0], s, lab.soft) for i, s, lab in zip(chosen, steps, labels)]
    data = BatchIterator(prm_rows, min(cfg.batch, len(prm_rows)),
                         lambda b: collate_steps(tok, b, separator=sep), seed=cfg.seed)
    prm = _train(rm, rm_params, data, TokenLabelConfig(), max(cfg.verifier_epochs * len(prm_rows) // cfg.batch, 1),
                 cfg, os.path.join(run_dir, "prm")).params
    # best-of-N on held-out problems
    bp = test[:cfg.bon_problems]
    n_max = max(cfg.bon_n)
    cands = _samples(params, model, tok, bp, n_max, cfg, jax.random.fold_in(key, 3))
    flat_p = [p.prompt for p, cs in zip(bp, cands) for _ in cs]
    flat_c = [c for cs in cands for c in cs]
    right = np.array([task.check(p, c) for p, cs in zip(bp, cands) for c in cs]).reshape(len(bp), n_max)
    # one scorer each (built once: every call of reward_model_reward / step_scorer jits anew)
    orm_scorer = reward_model_reward(rm, orm, tok, probability=True)
    orm_score = np.concatenate(_in_chunks(orm_scorer, flat_p, flat_c)).reshape(len(bp), n_max)
    per_step = sum(_in_chunks(step_scorer(rm, prm, tok, separator=sep), flat_p, flat_c), [])
    probs, mask = stack_step_scores(per_step)
    prm_score = {m: np.asarray(aggregate_steps(probs, mask, m)).reshape(len(bp), n_max)
                 for m in ("min", "product", "last")}
    methods = {"orm": orm_score, **{f"prm_{m}": s for m, s in prm_score.items()}}
    table = {}
    for n in cfg.bon_n:
        groups = [slice(g * n, (g + 1) * n) for g in range(n_max // n)]
        acc = {k: [] for k in ("pass@n", "majority", *methods)}
        for i in range(len(bp)):
            for g in groups:
                acc["pass@n"].append(right[i, g].any())
                acc["majority"].append(right[i, g][majority_vote([cands[i][g]], task.extract)[0]])
                for name, s in methods.items():
                    acc[name].append(right[i, g][int(np.argmax(s[i, g]))])
        table[n] = {k: float(np.mean(v)) for k, v in acc.items()}
        print(f"bon: N = {n}: " + ", ".join(f"{k} {v:.1%}" for k, v in table[n].items()), flush=True)
    return dict(table=table, verifier_samples=len(rows), verifier_right=float(np.mean([r[2] for r in rows])),
                prm_solutions=len(chosen), prm_steps=n_steps, label_seconds=label_s,
                sample_accuracy=float(right.mean()), seconds=time.perf_counter() - t0)


def _plot(table: dict, path: str) -> None:
    curves = {name: {n: table[n][name] for n in table} for name in table[min(table)]}
    try:
        plot_curves(curves, path, xlabel="N samples per problem", ylabel="held-out accuracy of the chosen sample",
                    log_x_base=2)
    except ImportError:  # plotting is optional (rljax[plot])
        pass


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, pair_counts=(16,), bt_epochs=1, eval_problems=16, batch=8, bon_problems=4, bon_n=(1, 4),
                     verifier_problems=4, verifier_samples=2, prm_solutions=4, prm_n=2, verifier_epochs=1,
                     max_new_tokens=16, rl_iterations=2, rl_eval_problems=4, feedback_problems=8,
                     overopt_iterations=2, overopt_eval_every=1, onpolicy_problems=8, onpolicy_samples=4,
                     refresh_problems=8, train_sft=True,
                     sft_run_dir=SMOKE_SFT_RUN_DIR)
    unknown = set(cfg.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"reward_models: unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if "overopt" in cfg.parts and "bt" not in cfg.parts:
        raise ValueError("reward_models: part overopt optimises the reward model of part bt; add bt")
    if "rl" in cfg.parts and not {"bt", "onpolicy", "feedback"} & set(cfg.parts) and not cfg.rl_rule:
        raise ValueError("reward_models: part rl optimises the reward models of parts bt, onpolicy or feedback "
                         "(or, with --rl-rule, the task's rule reward); add one")
    task = get_task(cfg.task)
    if "bon" in cfg.parts:
        needs_steps(task, "--parts bon (its process reward model)")
    check_input_dir(cfg.sft_run_dir, "--sft-run-dir", create=cfg.train_sft, create_flag="--train-sft")
    check_sft_task(cfg.task, cfg.sft_run_dir)  # before the run directory is made
    name = "reward_models" if cfg.task == "arithmetic" else f"reward_models-{task_slug(cfg.task)}"
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, name)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=RL_IGNORED_FIELDS)  # before any training
    tok = CharTokenizer()
    model, params, sft_cfg = load_sft(cfg.sft_run_dir, tok, smoke=cfg.smoke, progress=cfg.progress,
                                      run_if_missing=True, create=cfg.train_sft, logging=cfg.logging_flags(),
                                      task=cfg.task)
    _, train, test = sft_split(sft_cfg)
    results = dict(config=asdict(cfg), run_dir=run_dir)
    if "rl" in cfg.parts and cfg.rl_rule:  # the yardstick: the rule reward RL studies optimise, gold measured alike
        results["rl_rule"] = grpo_against(cfg, model, params, rule_reward(task), tok, train, test, run_dir, "rl-rule")
    if "bt" in cfg.parts:
        results["bt"], (rm, rm_params) = part_bt(cfg, model, params, tok, train, test, run_dir)
    if "rl" in cfg.parts and "bt" in cfg.parts:
        results["rl"] = grpo_against(cfg, model, params, reward_model_reward(rm, rm_params, tok), tok, train, test,
                                     run_dir, "rl-bt")
    if "onpolicy" in cfg.parts:
        results["onpolicy"], (orm, orm_state, lists, prior) = part_onpolicy(cfg, model, params, tok, train, test,
                                                                            run_dir, levels=sft_cfg.levels)
        scorer = onpolicy_scorer(orm, orm_state.params, tok, prior)
        name = "rl-onpolicy-prior" if prior is not None else "rl-onpolicy"
        if "rl" in cfg.parts and prior is not None:  # what the gold preferences add to their prior
            results["onpolicy"]["rl_prior_alone"] = grpo_against(cfg, model, params, prior, tok, train, test,
                                                                 run_dir, "rl-likelihood")
        if "rl" in cfg.parts and cfg.refresh_every == 0:
            results["onpolicy"]["rl"] = grpo_against(cfg, model, params, scorer, tok, train, test, run_dir, name)
        if "rl" in cfg.parts and cfg.refresh_every > 0:
            rlhf = onpolicy_rlhf(cfg, model, orm, orm_state, lists, tok, train, test, sft_cfg.levels, prior=prior)
            results["onpolicy"]["rl_refreshed"] = grpo_against(cfg, model, params, scorer, tok, train, test, run_dir,
                                                               name + "-refreshed", rlhf=rlhf)
    if "feedback" in cfg.parts:
        results["feedback"] = part_feedback(cfg, model, params, tok, train, test, run_dir)
    if "overopt" in cfg.parts:
        results["overopt"] = part_overopt(cfg, model, params, rm, rm_params, tok, train, test, run_dir)
    if "bon" in cfg.parts:
        results["bon"] = part_bon(cfg, model, params, tok, train, test, run_dir, levels=sft_cfg.levels)
        _plot(results["bon"]["table"], os.path.join(run_dir, "bon.png"))
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
