"""RLAIF (Lee et al. 2023): RL from AI feedback, with a judge the run trains itself, as a pipeline of
`rljax.pipelines.run_stages`, in its two forms.

    state, rows = rlaif(params, RLAIFConfig(form="labeller"), model=model, tokenizer=tok, task=ARITHMETIC,
                        judge_model=big, judge_params=big_init, sft=sft_problems, judge=judge_problems,
                        rl=rl_problems, held_out=test, key=key, run_dir="runs/rlaif")

Stages (each a stage of `run_stages`, its directory run_dir/<name>, one results row each):

  sft            SFT of the policy from `params` on the references (task.prompt(p), task.reference(p)) of the
                 `sft` problems (R1's cold start, `rljax.pipeline_steps.sft_on_rows`).
  judge          the AI judge, a causal LM (`judge_model`, e.g. larger than the policy) trained by SFT from
                 `judge_params` on comparison prompts (`rljax.rewards.judge`): for cfg.judge_pairs_per_problem
                 synthetic pairs per `judge` problem (`rljax.data.synthetic.preference_pairs`, the reference and
                 its corruptions, noise free), each shown in both orders, the target token is the choice token of
                 the gold-better answer; the references of the judge problems are trained alongside (the judge
                 has to know the arithmetic it judges). The judge problems are disjoint from the held-out ones
                 (checked). Row: the judge's order-averaged pairwise accuracy against gold on held-out pairs
                 (judge_accuracy) and its position-consistency rate.
  reward-model   (labeller form) collect: two samples per prompt of the first cfg.label_prompts `rl` problems
                 from the SFT policy (temperature cfg.label_temperature); the judge labels each pair,
                 p = P(a ≻ b) order-averaged, saved in reward-model/labels.json with the position consistency.
                 Train: a Bradley–Terry reward model (the policy's backbone with a zero reward head) on the
                 soft AI labels, L = mean −[p log σ(Δ) + (1 − p) log σ(−Δ)], Δ = r(a) − r(b)
                 (`ranking_loss` with RankingBatch.preference = p, `collate_labelled_pairs`; pairs with identical answers, |p − ½| < cfg.min_confidence or an
                 answer too long for the reward model are left out, `trained_labels`). Row: labelled pairs (the
                 trained ones), their position consistency and the labels' agreement with gold on those whose
                 gold scores differ, ties p = ½ excluded (`label_statistics`; measured, never trained on), the
                 reward model's held-out pairwise accuracy on gold pairs (rm_accuracy).
  rl-labeller    GRPO (cfg.algorithm) from the SFT policy on the `rl` problems against the reward model's score.
  rl-direct      GRPO from the SFT policy with no reward model: the reward is the judge's order-averaged
                 probability that the completion beats a fixed baseline answer, the SFT policy's greedy answer
                 to the prompt (collected at the stage's start into rl-direct/baseline.json),
                 r = p(y ≻ y_greedy^SFT | x) ∈ (0, 1).

cfg.form picks the stages: "labeller" (sft, judge, reward-model, rl-labeller), "direct" (sft, judge, rl-direct) or
"both" (all five; both RL stages start from the same SFT policy and use the same judge).

Every policy row: `rljax.eval.evaluate_policy` on `held_out` (greedy and sampled accuracy with task.check,
completion length, KL to the stage's start) and gold_score, the mean task.gold_score of the sampled completions
(the hidden quality; measured per stage, never used for training). The pipeline state is {"policy" (the SFT
policy), "judge", "reward_model", and "labeller" / "direct": the RL policy of each form run} (params pytrees); every phase checkpoints into run_dir/<stage>-<component>, so a run killed
anywhere resumes bit-identically (finished stages are skipped; an interrupted one reuses its saved data and
resumes its phase). Each stage's arguments (the config, digests of the problem sets and of the initial params,
the task's name) are saved in run_dir/<stage>/stage.json; a rerun with other ones is refused naming the stage
and the file (allow_change=True, the study's --force-config: the new ones are recorded in stage_changes.jsonl and
reach the stages still to run), and a finished stage whose data file went missing is an error naming both.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rljax.checkpoint import json_digest, state_digest
from rljax.data.batch import PromptBatch, RankingBatch
from rljax.data.collate import BatchIterator, encode_prompt_completion
from rljax.data.lengths import Tokens
from rljax.eval import PolicyEvalConfig, complete, evaluate_policy
from rljax.metrics import WandbConfig
from rljax.losses.reward_model import RankingConfig
from rljax.phases import LoopConfig, RewardModelPhaseConfig, train_reward_model
from rljax.pipelines import Stage, rl_state, run_stages, train_rl
from rljax.rewards.judge import (Judge, JudgeConfig, choice_ids, judge_accuracy, judge_pairwise, judge_prompt_ids,
                                 pairwise_prompt, pairwise_reward)
from rljax.pipeline_steps import check_algorithm, config_args, sft_on_rows, stage_rl_config
from rljax.sharding import place_params
from rljax.state import OptimizerConfig, create_state

__all__ = ["RLAIFConfig", "RLAIF_FORMS", "RLAIF_STAGES", "collate_labelled_pairs", "label_statistics",
           "noise_free_pairs", "judge_training_rows", "rlaif", "trained_labels"]

RLAIF_FORMS = ("labeller", "direct", "both")
RLAIF_STAGES = {"labeller": ("sft", "judge", "reward-model", "rl-labeller"), "direct": ("sft", "judge", "rl-direct"),
                "both": ("sft", "judge", "reward-model", "rl-labeller", "rl-direct")}


@dataclass(frozen=True)
class RLAIFConfig:
    """RLAIF's sizes (see the module docstring for the stages).

    form: "labeller" (judge labels → reward model → RL), "direct" (the judge's probability is the RL reward) or
    "both" (both RL stages, each from the same SFT policy with the same judge: a controlled comparison).
    sft: sft_steps steps of sft_batch_size rows (sft_optimizer). judge: judge_steps SFT steps of
    judge_batch_size rows (judge_optimizer) on judge_pairs_per_problem pairs per judge problem in both orders,
    plus the judge problems' references when judge_references; held_out_pairs: gold pairs of the held-out problems
    the judge and reward model are scored on (one per problem, up to len(held_out)); judge: how it is asked.
    labeller: label_prompts prompts x 2 samples at label_temperature; pairs with |p − ½| < min_confidence
    left out; rm_steps steps of rm_batch_size soft-labelled pairs (rm_optimizer). rl: rl_iterations of
    `algorithm` (a registry name that needs no value head, critic or teacher: the stages build none) with
    prompts_per_iteration prompts x samples_per_prompt samples of at most max_new_tokens at temperature,
    rl_optimizer, kl_coef (to the stage's start; None: the algorithm's own, e.g. GRPO's 0.04; 0: none).
    evaluation: how every row measures a policy. seed: batch shuffling (stage i: seed + i) and the synthetic
    pairs. log_every, eval_every, checkpoint_every, progress, tensorboard, wandb: how the
    phases report (not part of a stage's arguments)."""

    form: str = "labeller"
    sft_steps: int = 300
    sft_batch_size: int = 16
    sft_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=3e-3, schedule="constant"))
    judge_steps: int = 600
    judge_batch_size: int = 16
    judge_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=3e-3, schedule="constant"))
    judge_pairs_per_problem: int = 2
    judge_references: bool = True
    held_out_pairs: int = 64
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    label_prompts: int = 128
    label_temperature: float = 1.0
    min_confidence: float = 0.0
    rm_steps: int = 100
    rm_batch_size: int = 16
    rm_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, schedule="constant"))
    algorithm: str = "grpo"
    rl_iterations: int = 30
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    rl_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-5, schedule="constant",
                                                                                  b2=0.95))
    kl_coef: float | None = None
    evaluation: PolicyEvalConfig = field(default_factory=PolicyEvalConfig)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    tensorboard: bool | None = None
    wandb: WandbConfig | None = None

    def __post_init__(self):
        from rljax.algorithms import get_algorithm

        if self.form not in RLAIF_FORMS:
            raise ValueError(f"RLAIFConfig.form: {self.form!r} is not one of {RLAIF_FORMS}")
        for name in ("sft_steps", "sft_batch_size", "judge_steps", "judge_batch_size", "judge_pairs_per_problem",
                     "held_out_pairs", "label_prompts", "rm_steps", "rm_batch_size", "rl_iterations",
                     "prompts_per_iteration", "samples_per_prompt", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLAIFConfig.{name}: must be >= 1, got {getattr(self, name)}")
        check_algorithm("RLAIFConfig", self.algorithm)
        # the RL stages build a plain policy (no value head, no critic, no teacher): an algorithm that needs one
        # would fail only when its stage starts, after SFT and the judge have trained
        algo = get_algorithm(self.algorithm)
        needs = algo.needs()
        missing = [what for flag, what in ((needs.values, "a value head"), (needs.critic, "a critic"),
                                           (needs.teacher, "a teacher")) if flag]
        if missing:
            raise ValueError(f"RLAIFConfig.algorithm: {algo.name!r} needs {' and '.join(missing)}, which the RLAIF "
                             "RL stages do not build; use a critic-free algorithm (e.g. 'grpo', 'rloo', "
                             "'reinforce')")
        if needs.groups and self.samples_per_prompt < 2:
            raise ValueError(f"RLAIFConfig.samples_per_prompt: {algo.name} compares the samples of a prompt, so it "
                             f"needs >= 2, got {self.samples_per_prompt}")
        if not 0 <= self.min_confidence < 0.5:  # (also refuses NaN)
            raise ValueError(f"RLAIFConfig.min_confidence: must be in [0, 0.5), got {self.min_confidence}")
        for name in ("temperature", "label_temperature"):  # a sampling temperature: finite and > 0
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"RLAIFConfig.{name}: must be finite and > 0, got {getattr(self, name)}")
        if self.kl_coef is not None and not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"RLAIFConfig.kl_coef: must be finite and >= 0, or None (the algorithm's own), got "
                             f"{self.kl_coef}")
        if self.seed < 0:  # the batches' shuffling and the synthetic pairs' numpy seeds refuse negatives late
            raise ValueError(f"RLAIFConfig.seed: must be >= 0, got {self.seed}")


def collate_labelled_pairs(tokenizer, rows: Sequence[dict], **kw) -> RankingBatch:
    """AI-labelled rows {prompt, a, b, p} -> RankingBatch of K = 2 answers [B, 2, T] (answer 0 is a, answer 1 is
    b) with preference p = P(a ≻ b) [B], the soft label `ranking_loss` trains on (`collate_pairs(preferences=)`:
    its errors name the row, a p outside [0, 1] included; kw: its options, e.g. max_length)."""
    from rljax.data.reward_collate import collate_pairs

    return collate_pairs(tokenizer, [(r["prompt"], r["a"], r["b"]) for r in rows], preferences=[r["p"] for r in rows],
                         **kw)


def trained_labels(labels: Sequence[dict], min_confidence: float, fits: Callable[[dict], bool]) -> dict:
    """Which AI-labelled pairs the reward model trains on: two different answers, |p − ½| ≥ min_confidence,
    and both answers within the reward model's length (fits(row)). -> {"distinct", "confident", "trained"}
    (lists of rows, each a subset of the one before)."""
    distinct = [r for r in labels if r["a"] != r["b"]]
    confident = [r for r in distinct if abs(r["p"] - 0.5) >= min_confidence]
    return dict(distinct=distinct, confident=confident, trained=[r for r in confident if fits(r)])


def label_statistics(trained: Sequence[dict]) -> dict:
    """The AI labels the reward model trains on, against gold (measured, never trained on):

      label_position_consistency  mean[consistent] over the trained pairs (both orders pick the same answer)
      label_gold_agreement        mean[(p > ½) = (gold_a > gold_b)] over the trained pairs whose gold scores
                                  differ and whose label picks an answer (p ≠ ½: a tie says neither)
      gold_decided_pairs          how many pairs that mean is over; label_ties: trained pairs with p = ½
    (None for a mean over no pair)."""
    decided = [r for r in trained if r["gold_a"] != r["gold_b"] and r["p"] != 0.5]
    return dict(label_position_consistency=float(np.mean([r["consistent"] for r in trained])) if trained else None,
                label_gold_agreement=float(np.mean([(r["p"] > 0.5) == (r["gold_a"] > r["gold_b"])
                                                    for r in decided])) if decided else None,
                gold_decided_pairs=len(decided), label_ties=sum(r["p"] == 0.5 for r in trained))


def noise_free_pairs(task, problems: Sequence[Any], seed: int, *, per_problem: int = 1) -> list[dict]:
    """Noise-free synthetic pairs {prompt, chosen, rejected, gold_margin} of `problems` (chosen the gold-better
    answer; `preference_pairs` with seeds seed, seed + 1, ...), without pairs of equal text or equal gold."""
    from rljax.data.synthetic import preference_pairs

    out = []
    for k in range(per_problem):
        out += [r for r in preference_pairs(list(problems), seed + k, noise_free=True, task=task)
                if r["chosen"] != r["rejected"] and r["gold_margin"] != 0]
    return out


def judge_training_rows(pairs: Sequence[dict], tokenizer, cfg: JudgeConfig) -> list[tuple[Tokens, str]]:
    """SFT rows (judge prompt ids, target token) of gold-labelled pairs, each in both orders: chosen first ->
    cfg.choice_tokens[0], chosen second -> cfg.choice_tokens[1] (so the judge cannot learn a position)."""
    choice_ids(tokenizer, cfg.choice_tokens)  # a choice that is not one token is an error naming it, here
    rows = []
    for r in pairs:
        for first, second, target in ((r["chosen"], r["rejected"], 0), (r["rejected"], r["chosen"], 1)):
            ids = judge_prompt_ids(tokenizer, pairwise_prompt(cfg, r["prompt"], first, second), chat=cfg.chat)
            rows.append((Tokens(ids), cfg.choice_tokens[target]))
    return rows


def _check_judge_length(cfg: RLAIFConfig, tokenizer, task, max_len: int, problems: Sequence[Any]) -> None:
    """The judge compares two sampled answers of at most cfg.max_new_tokens tokens each (the labeller form's
    pairs; the direct form's sample against the SFT greedy answer) in one comparison prompt, so for every such
    prompt's question

        len(judge ids of the template with the question and two empty answers) + 2 · max_new_tokens ≤ L,

    L the judge's max_seq_len (the ids hold bos, or the chat template's specials). Checked before any stage
    trains; the error names the sizes and the longest question. (A tokenizer that re-encodes a decoded answer
    into more tokens than it was sampled as can still exceed L: then the judge names the pair.)"""
    if not problems:
        return
    questions = list(dict.fromkeys(task.prompt(p) for p in problems))
    lengths = [len(judge_prompt_ids(tokenizer, pairwise_prompt(cfg.judge, q, "", ""), chat=cfg.judge.chat))
               for q in questions]
    k = int(np.argmax(lengths))
    need = lengths[k] + 2 * cfg.max_new_tokens
    if need > max_len:
        raise ValueError(f"rlaif: the judge cannot compare two sampled answers of max_new_tokens={cfg.max_new_tokens} "
                         f"tokens: the longest comparison prompt without its answers (question {questions[k]!r}, "
                         f"with the template and specials) has {lengths[k]} tokens, + 2 x {cfg.max_new_tokens} = "
                         f"{need} > the judge's max_seq_len={max_len}; use max_new_tokens <= "
                         f"{(max_len - lengths[k]) // 2} or a judge with a longer max_seq_len")


def rlaif(params, cfg: RLAIFConfig, *, model, tokenizer, task, judge_model, judge_params, sft: Sequence[Any],
          judge: Sequence[Any], rl: Sequence[Any], held_out: Sequence[Any], key, run_dir: str | None = None,
          allow_change: bool = False, eval_fn: Callable | None = None):
    """RLAIF's stages (module docstring) from the base `params` of `model` and the judge's initial
    `judge_params` of `judge_model` (same tokenizer). -> (state, rows): state {"policy" (SFT), "judge",
    "reward_model", "labeller" and/or "direct" (the RL policies)} (params pytrees; reward_model is the zero-head
    template in the direct form), rows: every stage's results row, in order.

    task: a `rljax.tasks.Task`; sft, judge, rl, held_out: its problems (the policy's SFT data; the judge's
    training pairs, disjoint from held_out; the labelling and RL prompts, labels from rl[:label_prompts];
    the evaluation set and its gold pairs). key: stage i uses fold_in(key, i). eval_fn: every phase's eval_fn.
    Before any stage trains, the judge's max_seq_len must hold a comparison prompt of every judged question with
    two answers of cfg.max_new_tokens tokens (`_check_judge_length`), else a ValueError names the sizes."""
    from rljax.models.transformer import add_head

    if len(held_out) == 0:
        raise ValueError("rlaif: held_out is empty; every stage's results row is measured on it")
    forms = ("labeller", "direct") if cfg.form == "both" else (cfg.form,)
    need = dict(sft=cfg.sft_batch_size, judge=1, rl=max(cfg.prompts_per_iteration,
                                                         cfg.label_prompts if "labeller" in forms else 1))
    for name, values in (("sft", sft), ("judge", judge), ("rl", rl)):
        if len(values) < need[name]:
            raise ValueError(f"rlaif: {name} has {len(values)} problems, the config needs at least {need[name]}")
    overlap = {task.key(p) for p in judge} & {task.key(p) for p in held_out}
    if overlap:
        raise ValueError(f"rlaif: {len(overlap)} judge problems are also held out (e.g. {sorted(map(str, overlap))[0]}"
                         "); the judge's accuracy is measured on held-out pairs, so its training problems must be "
                         "disjoint from them")
    _check_judge_length(cfg, tokenizer, task, judge_model.config.max_seq_len,
                        (list(rl[:cfg.label_prompts]) if "labeller" in forms else [])
                        + (list(rl) if "direct" in forms else []))
    gold = task.gold_reward()
    rm_model, rm_template = add_head(model, params, "reward")
    shared = dict(config_args(cfg),
                  task=task.name, sft=json_digest([task.prompt(p) for p in sft]),
                  judge=json_digest([task.prompt(p) for p in judge]), rl=json_digest([task.prompt(p) for p in rl]),
                  held_out=json_digest([task.prompt(p) for p in held_out]), base=state_digest(params),
                  judge_base=state_digest(judge_params),
                  judge_config=json_digest(dataclasses.asdict(judge_model.config)))
    phase_loop = dict(log_every=cfg.log_every, eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                      progress=cfg.progress, tensorboard=cfg.tensorboard, wandb=cfg.wandb)

    def fits_judge(r) -> bool:
        """A gold pair whose comparison prompt (either order: the same length) and target fit the judge."""
        text = pairwise_prompt(cfg.judge, r["prompt"], r["chosen"], r["rejected"])
        return len(judge_prompt_ids(tokenizer, text, chat=cfg.judge.chat)) + 2 <= judge_model.config.max_seq_len

    held_pairs = [r for r in noise_free_pairs(task, held_out[:cfg.held_out_pairs], cfg.seed + 10_000) if fits_judge(r)]

    def evaluate(p, start) -> dict:
        row = evaluate_policy(p, model, tokenizer, list(held_out), cfg.evaluation, check=task.check,
                              prompt=task.prompt, reward_fn=gold, start_params=start)
        if "reward_mean" in row:  # the reward evaluated is the gold score
            row["gold_score"] = row.pop("reward_mean")
        return row

    def as_judge(judge_p) -> Judge:
        return Judge(judge_model, judge_p, tokenizer, cfg.judge)

    def steps_of(state) -> int:
        return int(jax.device_get(state.step))

    def run_sft(m, start, rows, steps, batch_size, optimizer, ctx, name):
        return sft_on_rows(m, start, rows, tokenizer=tokenizer, optimizer=optimizer, steps=steps,
                           batch_size=batch_size, key=jax.random.fold_in(key, ctx.index), seed=cfg.seed + ctx.index,
                           run_dir=ctx.component_dir(f"{ctx.name}-{name}"), eval_fn=eval_fn, loop=phase_loop)

    # ------------------------------------------------------------------ the stages
    def train_sft(state, data, ctx):
        rows = [(task.prompt(p), task.reference(p)) for p in sft]
        trained = run_sft(model, state["policy"], rows, cfg.sft_steps, cfg.sft_batch_size, cfg.sft_optimizer, ctx,
                          "policy")
        ctx.record(dict(sft_rows=len(rows), sft_steps=steps_of(trained), **evaluate(trained.params,
                                                                                    state["policy"])))
        return dict(state, policy=trained.params)

    def train_judge(state, data, ctx):
        every = noise_free_pairs(task, judge, cfg.seed, per_problem=cfg.judge_pairs_per_problem)
        pairs = [r for r in every if fits_judge(r)]  # the target token and eos follow the prompt
        rows = judge_training_rows(pairs, tokenizer, cfg.judge)
        if cfg.judge_references:
            rows += [(task.prompt(p), task.reference(p)) for p in judge]
        trained = run_sft(judge_model, state["judge"], rows, cfg.judge_steps, cfg.judge_batch_size,
                          cfg.judge_optimizer, ctx, "judge")
        row = dict(judge_train_pairs=len(pairs), judge_pairs_too_long=len(every) - len(pairs), judge_rows=len(rows),
                   judge_steps=steps_of(trained))
        if held_pairs:
            row.update(judge_accuracy(as_judge(trained.params), held_pairs))
        ctx.record(row)
        return dict(state, judge=trained.params)

    def check_unstarted(ctx, component: str, data_file: str):
        """Collect runs when the stage's data file is absent: refused when the stage's phase already trained on
        data that went missing (its checkpoints exist), which new data would not match."""
        phase_dir = ctx.component_dir(f"{ctx.name}-{component}")
        if phase_dir is not None and os.path.isdir(os.path.join(phase_dir, "checkpoints")) and os.listdir(
                os.path.join(phase_dir, "checkpoints")):
            raise FileNotFoundError(f"rlaif: stage {ctx.name!r}: its input {os.path.join(ctx.dir, data_file)} is "
                                    f"missing, but its phase already trained on it ({phase_dir}/checkpoints); "
                                    "restore the file or use a new run directory")

    def collect_labels(state, ctx):
        """Two samples per prompt from the SFT policy, labelled by the judge (JSON-able rows)."""
        check_unstarted(ctx, "rm", "labels.json")
        problems = list(rl[:cfg.label_prompts])
        prompts = [task.prompt(p) for p in problems]
        texts = complete(state["policy"], model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, n=2,
                         temperature=cfg.label_temperature, key=jax.random.fold_in(key, ctx.index))
        a, b = texts[0::2], texts[1::2]
        j = judge_pairwise(as_judge(state["judge"]), prompts, a, b)
        return [dict(prompt=q, a=x, b=y, p=float(p), p_ab=float(pab), p_ba=float(pba), consistent=bool(c),
                     gold_a=task.gold_score(prob, x), gold_b=task.gold_score(prob, y))
                for q, x, y, p, pab, pba, c, prob in zip(prompts, a, b, j.p, j.p_ab, j.p_ba, j.consistent,
                                                         problems)]

    def train_rm(state, labels, ctx):
        from rljax.data.reward_collate import collate_pairs
        from rljax.rewards.evaluation import reward_model_eval

        def fits(r) -> bool:  # [bos] prompt answer [eos] of both answers within the reward model's length
            return all(len(encode_prompt_completion(tokenizer, r["prompt"], r[k], 0, add_bos=True, add_eos=True)[0])
                       <= rm_model.config.max_seq_len for k in ("a", "b"))

        chosen = trained_labels(labels, cfg.min_confidence, fits)
        distinct, confident, pairs = chosen["distinct"], chosen["confident"], chosen["trained"]
        if not pairs:
            raise ValueError(f"rlaif: stage {ctx.name!r}: no labelled pair to train on ({len(labels)} sampled, "
                             f"{len(distinct)} with two different answers, {len(confident)} confident, none of "
                             "them within the reward model's max_seq_len); sample more prompts or at a higher "
                             "label_temperature")
        collate = functools.partial(collate_labelled_pairs, tokenizer)
        _, init = add_head(model, state["policy"], "reward")
        rm = create_state(rm_model, cfg.rm_optimizer, jax.random.fold_in(key, ctx.index), params=init)
        # the soft labels train the reward model (docs/algorithms.md, RLAIF): ranking_loss's soft Bradley–Terry
        phase = RewardModelPhaseConfig(loss=RankingConfig(), optimizer=cfg.rm_optimizer,
                                       loop=LoopConfig(steps=cfg.rm_steps, **phase_loop))
        batches = BatchIterator(pairs, min(cfg.rm_batch_size, len(pairs)), collate, seed=cfg.seed + ctx.index)
        rm = train_reward_model(rm, batches, phase, model=rm_model, run_dir=ctx.component_dir(f"{ctx.name}-rm"),
                                eval_fn=eval_fn)
        row = dict(sampled_pairs=len(labels), distinct_pairs=len(distinct), confident_pairs=len(confident),
                   labelled_pairs=len(pairs), rm_pairs_too_long=len(confident) - len(pairs),
                   **label_statistics(pairs), rm_steps=steps_of(rm))
        if held_pairs:
            held = [(r["prompt"], r["chosen"], r["rejected"]) for r in held_pairs]
            evaluator = reward_model_eval(rm_model, [collate_pairs(tokenizer, held[i:i + 64])
                                                     for i in range(0, len(held), 64)])
            row["rm_accuracy"] = evaluator(rm)["pairwise_accuracy"]
        ctx.record(row)
        return dict(state, reward_model=rm.params)

    def collect_baseline(state, ctx):
        """The direct form's fixed baseline: the SFT policy's greedy answer to every RL prompt."""
        check_unstarted(ctx, "policy", "baseline.json")
        prompts = list(dict.fromkeys(task.prompt(p) for p in rl))
        greedy = complete(state["policy"], model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens)
        return dict(zip(prompts, greedy))

    def prompt_batches(ctx):
        def collate(chunk):
            tokens, mask = tokenizer.encode_batch([task.prompt(p) for p in chunk], padding_side="left")
            return PromptBatch(tokens=tokens, mask=mask, metadata={"problems": list(chunk)})
        return BatchIterator(list(rl), cfg.prompts_per_iteration, collate, seed=cfg.seed + ctx.index)

    def train_policy(form, state, data, ctx):
        if form == "labeller":
            from rljax.rewards.learned import reward_model_reward

            reward = reward_model_reward(rm_model, state["reward_model"], tokenizer)
        else:
            reward = pairwise_reward(as_judge(state["judge"]), data)
        rl_cfg = stage_rl_config(cfg.algorithm, cfg.rl_optimizer, tokenizer=tokenizer,
                                 max_new_tokens=cfg.max_new_tokens, samples_per_prompt=cfg.samples_per_prompt,
                                 temperature=cfg.temperature, kl_coef=cfg.kl_coef)
        rls = rl_state(model, state["policy"], rl_cfg, jax.random.fold_in(key, ctx.index))
        rls = train_rl(rls, prompt_batches(ctx), reward, rl_cfg, model=model, decode=tokenizer.decode_batch,
                       steps=cfg.rl_iterations, run_dir=ctx.component_dir(f"{ctx.name}-policy"),
                       log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                       progress=cfg.progress, eval_fn=eval_fn, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                       accuracy_fn=task.answer_reward())
        policy = rls.policy.params
        row = dict(form=form, rl_iterations=steps_of(rls), **evaluate(policy, state["policy"]))
        ctx.record(row)
        return dict(state, **{form: policy})

    stages = [Stage("sft", train=train_sft, data_file=None), Stage("judge", train=train_judge, data_file=None)]
    if "labeller" in forms:
        stages.append(Stage("reward-model", train=train_rm, collect=collect_labels, data_file="labels.json"))
        stages.append(Stage("rl-labeller", train=functools.partial(train_policy, "labeller"), data_file=None))
    if "direct" in forms:
        stages.append(Stage("rl-direct", train=functools.partial(train_policy, "direct"), collect=collect_baseline,
                            data_file="baseline.json"))
    stages = [dataclasses.replace(s, args=dict(shared, stage=s.name)) for s in stages]
    # device arrays where each model computes (a checkpoint restores onto their shardings), whatever the caller's are
    state = dict(policy=place_params(model, params), judge=place_params(judge_model, judge_params),
                 reward_model=place_params(rm_model, rm_template), **{form: place_params(model, params) for form in forms})
    results: dict = {}
    state, _ = run_stages(state, stages, run_dir=run_dir, results=results, allow_change=allow_change)
    return state, [results[s.name] for s in stages if s.name in results]

