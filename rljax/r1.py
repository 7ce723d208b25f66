"""The DeepSeek-R1 recipe as a pipeline of `rljax.pipelines.run_stages`, then distillation into a smaller student.

    state, rows = r1_pipeline(base_params, R1Config(), model=model, tokenizer=tok, task=ARITHMETIC,
                              cold_start=cold, reasoning=train, general=general, held_out=test,
                              student_model=small, student_params=small_init, key=key, run_dir="runs/r1")

Stages (each one stage of `run_stages`, its directory run_dir/<name>, one results row each):

  cold-start         (a) SFT from the base params on chain-of-thought rows: (task.prompt(p), task.reference(p))
                         of the `cold_start` problems (on arithmetic the reference completions are the step-by-step
                         reductions, "58*2=116;23+116=139;answer:139").
  rl-reasoning       (b) GRPO (cfg.algorithm) from the cold-start policy on the `reasoning` problems with the rule
                         reward  r = answer + w_f · format [+ w_l · language]:  answer = task.answer_reward() (1 for a
                         right final answer), format = task.format_reward() (1 when task.well_formed), language =
                         `language_reward` (R1's language-consistency reward, the fraction of the chain of thought in
                         the prompt's language) — an optional term: arithmetic and the embedded tasks have no
                         natural language, so it is off (cfg.language_weight = 0) unless a caller's data has one.
  rejection-sft      (c) collect: `rejection_sample` from the RL policy on cfg.rejection_prompts reasoning problems
                         (cfg.rejection.samples per prompt; keep the right (answer reward ≥ threshold), well-formed
                         (stopped, task.well_formed) ones, one copy each, at most max_per_prompt; saved in
                         rejection-sft/samples.json with the kept fraction); train: SFT from the *base* params (R1
                         restarts from the base model; cfg.from_base = False continues from the RL policy) on the
                         kept samples together with general SFT rows (the references of general[:general_sft_rows]).
  reward-model       (d, first half) a Bradley–Terry reward model: the rejection-SFT policy's backbone with a zero
                         reward head (`add_head`), trained on preference pairs of the `general` problems
                         (`rljax.data.synthetic.preference_pairs(task=task)`: two of the reference and its
                         corruptions, the first preferred with probability σ(β (gold_a − gold_b)), gold =
                         task.gold_score). Skipped when a trained `reward_model` = (model, params) is passed in.
  rl-mixed           (d) GRPO from the rejection-SFT policy on the reasoning problems *and* the general problems,
                         mixed in one prompt set: reasoning prompts get the rule reward of (b), general prompts the
                         reward model's score r_θ(x, y) (GRPO normalises each prompt's group on its own, so the two
                         scales need no common unit). What stands in for what on arithmetic: "general prompts" are
                         arithmetic problems whose answers the RL stage treats as unverifiable (their answer is
                         never checked for the reward; it is measured only as the `accuracy` metric), and the
                         "reward model of human preferences" is one learnt from gold-scored preference pairs.
  student-start      (e, optional: cfg.student_start_steps > 0) the student's own cold start: SFT of
                         `student_params` on the cold-start rows (a small pretrained model stands in for it).
  distill-sft        (e) R1's distillation: collect `rejection_sample` of the final policy (the teacher) on
                         cfg.distill_prompts reasoning problems (cfg.distill_rejection); train: SFT of the student
                         (from its start) on the kept teacher samples.
  distill-on-policy  (e) on-policy distillation (algorithm "on_policy_distill"): the student samples, and the
                         per-token reward is λ (log π_teacher − log π_student) of its own tokens (the reverse KL to
                         the teacher, RLState.teacher_params = the final policy, teacher_model = `model`), from the
                         same student start, on the same prompts.

Every row but the reward model's (which holds that model's own numbers: its held-out pairwise accuracy, ...):
held-out accuracy greedy and sampled, the rule reward's mean, completion length and the KL to the stage's start
(`rljax.eval.evaluate_policy` on `held_out`, with task.check; the start is the policy the stage received: the base
for cold-start, the previous stage's policy after it, the student's start for the student stages), plus the stage's
own numbers (kept fraction, SFT steps, RL iterations, the reward model's held-out pairwise accuracy, and for the
student stages kl_to_teacher = KL(π_student ‖ π_teacher) on the same samples; for the distillation stages
train_tokens, the completion tokens the student trained on, so the two are compared at equal tokens). The table
over every stage is run_dir/results.jsonl and results.md.

The pipeline state is {"policy": teacher params, "reward_model": reward-model params, "student": the student's
start, "student_sft": ..., "student_on_policy": ...}; each phase (SFT, reward model, RL) checkpoints into its own
component directory run_dir/<stage>-<component>, so a run killed anywhere resumes bit-identically (finished stages
are skipped, an interrupted one reuses its saved samples and resumes its phase). Each stage's arguments (the
config, digests of every input set, of the base, student and reward-model params, the task's name) are saved in
run_dir/<stage>/stage.json; a rerun with other ones is refused naming the stage and the file. With
allow_change=True (the study's --force-config) the new ones are recorded (stage_changes.jsonl) and reach the stages
still to run; finished stages are not run again.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rljax.checkpoint import state_digest
from rljax.data.batch import PromptBatch
from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.eval import PolicyEvalConfig, evaluate_policy
from rljax.expert_iteration import RejectionConfig, rejection_sample
from rljax.metrics import WandbConfig
from rljax.models.logprobs import target_mask
from rljax.models.transformer import check_scorer
from rljax.pipelines import Stage, rl_state, run_stages, train_rl
from rljax.pipeline_steps import check_algorithm, config_args, json_digest as _digest, sft_on_rows, stage_rl_config
from rljax.rewards.rules import RewardSum
from rljax.sampling import SampleConfig
from rljax.sharding import place_params
from rljax.state import OptimizerConfig

__all__ = ["R1Config", "R1_STAGES", "mixed_reward", "r1_pipeline", "rule_reward"]

# every stage of the recipe, in order (reward-model and student-start are left out when not needed)
R1_STAGES = ("cold-start", "rl-reasoning", "rejection-sft", "reward-model", "rl-mixed", "student-start",
             "distill-sft", "distill-on-policy")


def _sft_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=3e-3, schedule="constant")


def _rl_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=2e-5, schedule="constant", b2=0.95)


@dataclass(frozen=True)
class R1Config:
    """The R1 recipe's sizes (see the module docstring for the stages).

    (a) cold_start_steps SFT steps of sft_batch_size rows (sft_optimizer, also the one of every SFT stage; each
    SFT stage starts a fresh optimizer state). (b) rl_iterations of `algorithm` (a registry name), prompts_per_iteration
    prompts x samples_per_prompt samples of at most max_new_tokens at `temperature`, rl_optimizer, kl_coef (to the
    stage's start; None: the algorithm's own, e.g. GRPO's 0.04; 0: none); reward weights format_weight and
    language_weight (> 0 needs a `language_reward`).
    (c) rejection (n, threshold, cap, sampling: None samples at max_new_tokens and `temperature`) on
    rejection_prompts reasoning problems, then rs_sft_steps SFT steps
    from the base (from_base) or the RL policy, with general_sft_rows general references mixed in. (d) reward model:
    rm_steps steps of rm_batch_size pairs (rm_optimizer, Bradley–Terry labels at rm_beta), then mixed_iterations RL
    iterations. (e) student_start_steps (0: the student starts from the given params), distill_rejection on
    distill_prompts problems and distill_sft_steps SFT steps; distill_iterations on-policy distillation iterations
    (student_optimizer, teacher_coef λ; sampled at temperature 1, whatever `temperature` is: the reverse KL is
    estimated from the student's own samples). evaluation: how every row measures a policy. seed: shuffling of every
    stage's batches (stage i: seed + i). log_every, eval_every, checkpoint_every, progress, tensorboard, wandb:
    how the phases report (not part of a stage's arguments)."""

    cold_start_steps: int = 200
    sft_batch_size: int = 16
    sft_optimizer: OptimizerConfig = field(default_factory=_sft_optimizer)
    algorithm: str = "grpo"
    rl_iterations: int = 30
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    rl_optimizer: OptimizerConfig = field(default_factory=_rl_optimizer)
    kl_coef: float | None = None
    format_weight: float = 0.1
    language_weight: float = 0.0
    rejection_prompts: int = 256
    rejection: RejectionConfig = field(default_factory=lambda: RejectionConfig(samples=8, max_per_prompt=2))
    rs_sft_steps: int = 200
    from_base: bool = True
    general_sft_rows: int = 64
    rm_steps: int = 100
    rm_batch_size: int = 16
    rm_beta: float = 5.0
    rm_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, schedule="constant"))
    mixed_iterations: int = 30
    student_start_steps: int = 0
    distill_prompts: int = 256
    distill_rejection: RejectionConfig = field(default_factory=lambda: RejectionConfig(samples=4, max_per_prompt=2))
    distill_sft_steps: int = 200
    distill_iterations: int = 30
    student_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, schedule="constant",
                                                                                       b2=0.95))
    teacher_coef: float = 1.0
    evaluation: PolicyEvalConfig = field(default_factory=PolicyEvalConfig)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    tensorboard: bool | None = None
    wandb: WandbConfig | None = None

    def __post_init__(self):
        positive = ("cold_start_steps", "sft_batch_size", "rl_iterations", "prompts_per_iteration",
                    "samples_per_prompt", "max_new_tokens", "rejection_prompts", "rs_sft_steps", "rm_steps",
                    "rm_batch_size", "mixed_iterations", "distill_prompts", "distill_sft_steps", "distill_iterations")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"R1Config.{name}: must be >= 1, got {getattr(self, name)}")
        if self.kl_coef is not None and not self.kl_coef >= 0:
            raise ValueError(f"R1Config.kl_coef: must be >= 0 or None, got {self.kl_coef}")
        for name in ("general_sft_rows", "student_start_steps", "format_weight", "language_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"R1Config.{name}: must be >= 0, got {getattr(self, name)}")
        check_algorithm("R1Config", self.algorithm)
        if self.samples_per_prompt < 2:
            raise ValueError(f"R1Config.samples_per_prompt: GRPO compares the samples of a prompt, so it needs >= 2, "
                             f"got {self.samples_per_prompt}")
        if not self.teacher_coef > 0:
            raise ValueError(f"R1Config.teacher_coef: must be > 0, got {self.teacher_coef}")


def rule_reward(task, *, format_weight: float = 0.1, language_weight: float = 0.0,
                language_reward: Callable | None = None) -> Callable:
    """R1's rule reward, fn(prompts, completions, *, problems) -> float32[B]:

        r = answer + format_weight · format + language_weight · language

    answer = task.answer_reward() (1 for a right final answer), format = task.format_reward() (1 when
    task.well_formed; left out at weight 0), language = language_reward(prompts, completions, **metadata) (R1's
    language consistency: the fraction of the chain of thought in the target language; needed exactly when
    language_weight > 0). A `RewardSum`: the RL iteration logs each term's mean."""
    if language_weight > 0 and language_reward is None:
        raise ValueError(f"rule_reward: language_weight is {language_weight} but no language_reward was given (the "
                         "embedded tasks have no natural language; pass one for data that has)")
    if language_reward is not None and language_weight == 0:
        raise ValueError("rule_reward: a language_reward was given with language_weight 0; set language_weight")
    terms = [(1.0, task.answer_reward())]
    if format_weight:
        terms.append((format_weight, task.format_reward()))
    if language_weight:
        terms.append((language_weight, language_reward))
    return RewardSum(tuple(terms))


def mixed_reward(rule: Callable, reward_model: Callable) -> Callable:
    """R1's second RL stage's reward, fn(prompts, completions, *, problems, general) -> float32[B]: row i gets
    reward_model(prompts, completions) where general[i] (a general prompt) and rule(prompts, completions,
    problems=...) otherwise (a reasoning prompt); each function is called only on its own rows."""

    def reward(prompts, completions, *, problems, general, **_):
        g = np.asarray(general, bool)
        if g.shape != (len(completions),):
            raise ValueError(f"mixed_reward: general has shape {g.shape} for {len(completions)} completions")
        out = np.zeros(len(completions), np.float32)
        for rows, fn in ((np.flatnonzero(~g), "rule"), (np.flatnonzero(g), "reward_model")):
            if len(rows):
                ps, cs = [prompts[i] for i in rows], [completions[i] for i in rows]
                out[rows] = (rule(ps, cs, problems=[problems[i] for i in rows]) if fn == "rule"
                             else reward_model(ps, cs))
        if not np.all(np.isfinite(out)):
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            raise ValueError(f"mixed_reward: a non-finite reward {out[bad]} for row {bad} (general={bool(g[bad])}): "
                             f"prompt {prompts[bad]!r}, completion {completions[bad]!r}")
        return out

    return reward


def r1_pipeline(params, cfg: R1Config, *, model, tokenizer, task, cold_start: Sequence[Any], reasoning: Sequence[Any],
                general: Sequence[Any], held_out: Sequence[Any], student_model, student_params, key,
                run_dir: str | None = None, allow_change: bool = False, language_reward: Callable | None = None,
                reward_model: tuple[Any, Any] | None = None, eval_fn: Callable | None = None):
    """R1's stages from the base `params` of `model`, then distillation into `student_model` (module docstring).
    -> (state, rows): state {"policy", "reward_model", "student", "student_sft", "student_on_policy"} (params
    pytrees), rows: the results row of every stage, in order.

    task: a `rljax.tasks.Task` (its prompt, reference, check, well_formed, answer and format rewards, gold score);
    cold_start, reasoning, general, held_out: its problems (the cold-start SFT data; the RL, rejection-sampling and
    distillation prompts, reasoning[:rejection_prompts] and reasoning[:distill_prompts]; the general prompts: SFT
    references, reward-model pairs and the reward model's RL prompts; the evaluation set). student_params: the
    student's initial params (its tokenizer must be `tokenizer`: on-policy distillation compares the two models'
    log-probs token by token). key: stage i uses fold_in(key, i). language_reward: R1's language-consistency
    term (cfg.language_weight). reward_model: a trained (model, params) with a "reward" head for the general prompts
    (None: trained in stage reward-model). eval_fn: every phase's eval_fn (every cfg.eval_every steps)."""
    if len(held_out) == 0:
        raise ValueError("r1_pipeline: held_out is empty; every stage's results row is measured on it")
    for name, values, need in (("cold_start", cold_start, cfg.sft_batch_size),
                               ("reasoning", reasoning, max(cfg.rejection_prompts, cfg.distill_prompts,
                                                            cfg.prompts_per_iteration)),
                               ("general", general, max(cfg.general_sft_rows, 1))):
        if len(values) < need:
            raise ValueError(f"r1_pipeline: {name} has {len(values)} problems, the config needs at least {need}")
    # the teacher scores the student's samples (kl_to_teacher in every student row, then the last stage's
    # distillation): refused here rather than after every earlier stage has trained
    check_scorer(model, student_model, "r1_pipeline: model (the teacher of student_model)")
    rule = rule_reward(task, format_weight=cfg.format_weight, language_weight=cfg.language_weight,
                       language_reward=language_reward)
    answer = task.answer_reward()
    base = params
    sft_rows = [(task.prompt(p), task.reference(p)) for p in cold_start]
    general_rows = [(task.prompt(p), task.reference(p)) for p in general[:cfg.general_sft_rows]]
    rm_model = None if reward_model is None else reward_model[0]
    if rm_model is None:
        from rljax.models.transformer import add_head

        rm_model, rm_template = add_head(model, params, "reward")
    else:
        rm_template = reward_model[1]
    # one entry per config field, so a refusal names the field that changed
    shared = dict(config_args(cfg),
                  task=task.name, cold_start=_digest([task.prompt(p) for p in cold_start]),
                  reasoning=_digest([task.prompt(p) for p in reasoning]),
                  general=_digest([task.prompt(p) for p in general]),
                  held_out=_digest([task.prompt(p) for p in held_out]), base=state_digest(params),
                  student=state_digest(student_params),
                  student_config=_digest(dataclasses.asdict(student_model.config)),
                  reward_model=None if reward_model is None else state_digest(reward_model[1]),
                  language_reward=getattr(language_reward, "__name__", None))
    phase_loop = dict(log_every=cfg.log_every, eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                      progress=cfg.progress, tensorboard=cfg.tensorboard, wandb=cfg.wandb)

    def evaluate(p, start, m=model, start_model=None) -> dict:
        return evaluate_policy(p, m, tokenizer, list(held_out), cfg.evaluation, check=task.check, prompt=task.prompt,
                               reward_fn=rule, start_params=start, start_model=start_model)

    def evaluate_student(p, start, teacher) -> dict:
        row = evaluate(p, start, student_model)
        if cfg.evaluation.samples:  # the same samples (one key for every policy), measured against the teacher
            row["kl_to_teacher"] = evaluate(p, teacher, student_model, model)["kl_to_start"]
        return row

    def run_sft(m, start, rows, steps: int, ctx, name: str):
        """`steps` SFT steps of `m` from `start` (a fresh optimizer state) on (prompt, completion) rows."""
        return sft_on_rows(m, start, rows, tokenizer=tokenizer, optimizer=cfg.sft_optimizer, steps=steps,
                           batch_size=cfg.sft_batch_size, key=jax.random.fold_in(key, ctx.index),
                           seed=cfg.seed + ctx.index, run_dir=ctx.component_dir(f"{ctx.name}-{name}"), eval_fn=eval_fn,
                           loop=phase_loop)

    def sft_tokens(m, rows, steps: int, ctx) -> int:
        """The completion tokens `run_sft` trained on: Σ over its `steps` batches of the loss mask (the batches
        recollated in the same order: same rows, batch size and seed)."""
        collate = functools.partial(collate_prompt_completion, tokenizer, max_length=m.config.max_seq_len)
        batches = BatchIterator(rows, min(cfg.sft_batch_size, len(rows)), collate, seed=cfg.seed + ctx.index)
        return sum(int(np.asarray(target_mask(b.loss_mask, b.attention_mask)).sum())
                   for b in map(batches.batch_at, range(steps)))

    def rl_tokens(ctx, iterations: int) -> int | None:
        """The completion tokens sampled (and trained on) in an RL stage's `iterations`: Σ_i completion_length_i · B
        from its metrics.jsonl (logged every iteration; a resumed run's repeated steps count once). None without a
        run directory."""
        if ctx.run_dir is None:
            return None
        from rljax.metrics import read_metrics

        per_step = {r["step"]: r["rl/completion_length"] for r in read_metrics(ctx.component_dir(f"{ctx.name}-policy"))
                    if "rl/completion_length" in r}  # the RL phase's metrics are named rl/<metric>
        missing = [i for i in range(1, iterations + 1) if i not in per_step]
        if missing:
            raise ValueError(f"r1_pipeline: stage {ctx.name!r}: its metrics.jsonl has no rl/completion_length for "
                             f"iterations {missing[:5]}")
        batch = cfg.prompts_per_iteration * cfg.samples_per_prompt
        return int(round(sum(per_step[i] * batch for i in range(1, iterations + 1))))

    def prompt_batches(rows, ctx):
        """BatchIterator of (problem, general) rows -> PromptBatch with metadata problems and general."""
        def collate(chunk):
            tokens, mask = tokenizer.encode_batch([task.prompt(p) for p, _ in chunk], padding_side="left")
            return PromptBatch(tokens=tokens, mask=mask, metadata={"problems": [p for p, _ in chunk],
                                                                   "general": [g for _, g in chunk]})
        return BatchIterator(rows, cfg.prompts_per_iteration, collate, seed=cfg.seed + ctx.index)

    def rl_config(algorithm, optimizer):
        # on-policy distillation estimates the reverse KL from the student's own samples at temperature 1
        temperature = 1.0 if algorithm == "on_policy_distill" else cfg.temperature
        return stage_rl_config(algorithm, optimizer, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens,
                               samples_per_prompt=cfg.samples_per_prompt, temperature=temperature,
                               kl_coef=cfg.kl_coef, teacher_coef=cfg.teacher_coef)

    def run_rl(m, start, rows, reward, iterations: int, ctx, *, algorithm=cfg.algorithm, optimizer=cfg.rl_optimizer,
               **kw):
        rl_cfg = rl_config(algorithm, optimizer)
        teacher_model = {"teacher_model": model} if "teacher_params" in kw else {}
        state = rl_state(m, start, rl_cfg, jax.random.fold_in(key, ctx.index), **kw, **teacher_model)
        # on-policy distillation logs every iteration: its row counts the tokens the student sampled (`rl_tokens`)
        log_every = 1 if algorithm == "on_policy_distill" else cfg.log_every
        state = train_rl(state, prompt_batches(rows, ctx), reward, rl_cfg, model=m, decode=tokenizer.decode_batch,
                         steps=iterations, run_dir=ctx.component_dir(f"{ctx.name}-policy"),
                         log_every=log_every, checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                         progress=cfg.progress, eval_fn=eval_fn, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                         accuracy_fn=answer, **teacher_model)
        return state.policy.params, int(jax.device_get(state.step))

    def steps_of(state) -> int:
        return int(jax.device_get(state.step))

    # ------------------------------------------------------------------ the stages
    def cold(state, data, ctx):
        trained = run_sft(model, state["policy"], sft_rows, cfg.cold_start_steps, ctx, "policy")
        ctx.record(dict(sft_rows=len(sft_rows), sft_steps=steps_of(trained),
                        **evaluate(trained.params, state["policy"])))
        return dict(state, policy=trained.params)

    def rl_reasoning(state, data, ctx):
        rows = [(p, False) for p in reasoning]
        policy, its = run_rl(model, state["policy"], rows, rule, cfg.rl_iterations, ctx)
        ctx.record(dict(rl_iterations=its, **evaluate(policy, state["policy"])))
        return dict(state, policy=policy)

    def collect_samples(params_, problems, rejection: RejectionConfig, ctx):
        rejection = rejection.sampling_or(SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature))
        rows, stats = rejection_sample(params_, [task.prompt(p) for p in problems], answer, rejection, model=model,
                                       tokenizer=tokenizer, key=jax.random.fold_in(key, ctx.index),
                                       well_formed=task.well_formed, problems=list(problems))
        return dict(rows=rows, stats=stats)

    def rejection_sft(state, data, ctx):
        kept = [(x["prompt"], x["completion"]) for x in data["rows"]]
        pairs = kept + general_rows
        start = base if cfg.from_base else state["policy"]
        policy, steps = state["policy"], 0
        if kept:
            trained = run_sft(model, start, pairs, cfg.rs_sft_steps, ctx, "policy")
            policy, steps = trained.params, steps_of(trained)
        else:  # the general rows alone would replace the RL policy (from the base, too) with nothing learnt
            warnings.warn(f"r1_pipeline: stage {ctx.name!r} kept no sample (stats {data['stats']}): it trains nothing "
                          "and the policy stays the RL stage's (lower the rejection threshold or sample more)",
                          stacklevel=2)
        ctx.record(dict(**data["stats"], trained_kept=len(kept), trained_general=len(general_rows), sft_steps=steps,
                        from_base=cfg.from_base, **evaluate(policy, state["policy"])))
        return dict(state, policy=policy)

    def train_rm(state, data, ctx):
        from rljax.pipeline_steps import bradley_terry_reward_model

        _, rm, row = bradley_terry_reward_model(
            state["policy"], model=model, rm_model=rm_model, tokenizer=tokenizer, task=task, train_problems=general,
            held_out=held_out, beta=cfg.rm_beta, steps=cfg.rm_steps, batch_size=cfg.rm_batch_size,
            optimizer=cfg.rm_optimizer, pair_seed=cfg.seed, batch_seed=cfg.seed + ctx.index,
            key=jax.random.fold_in(key, ctx.index), run_dir=ctx.component_dir(f"{ctx.name}-rm"), loop=phase_loop,
            eval_fn=eval_fn, what=f"r1_pipeline: stage {ctx.name!r}")
        ctx.record(row)
        return dict(state, reward_model=rm.params)

    def rl_mixed(state, data, ctx):
        from rljax.rewards.learned import reward_model_reward

        scorer = reward_model_reward(rm_model, state["reward_model"], tokenizer)
        rows = [(p, False) for p in reasoning] + [(p, True) for p in general]
        policy, its = run_rl(model, state["policy"], rows, mixed_reward(rule, scorer), cfg.mixed_iterations, ctx)
        ctx.record(dict(rl_iterations=its, reasoning_prompts=len(reasoning), general_prompts=len(general),
                        **evaluate(policy, state["policy"])))
        return dict(state, policy=policy)

    def student_start(state, data, ctx):
        trained = run_sft(student_model, state["student"], sft_rows, cfg.student_start_steps, ctx, "student")
        ctx.record(dict(sft_rows=len(sft_rows), sft_steps=steps_of(trained),
                        **evaluate_student(trained.params, state["student"], state["policy"])))
        return dict(state, student=trained.params)

    def distill_sft(state, data, ctx):
        kept = [(x["prompt"], x["completion"]) for x in data["rows"]]
        student, steps, tokens = state["student"], 0, 0
        if kept:
            trained = run_sft(student_model, state["student"], kept, cfg.distill_sft_steps, ctx, "student")
            student, steps = trained.params, steps_of(trained)
            tokens = sft_tokens(student_model, kept, steps, ctx)
        else:
            warnings.warn(f"r1_pipeline: stage {ctx.name!r}: the teacher's samples kept none (stats "
                          f"{data['stats']}); the student trains nothing", stacklevel=2)
        ctx.record(dict(**data["stats"], trained_kept=len(kept), sft_steps=steps, train_tokens=tokens,
                        **evaluate_student(student, state["student"], state["policy"])))
        return dict(state, student_sft=student)

    def distill_on_policy(state, data, ctx):
        rows = [(p, False) for p in reasoning[:cfg.distill_prompts]]
        student, its = run_rl(student_model, state["student"], rows, rule, cfg.distill_iterations, ctx,
                              algorithm="on_policy_distill", optimizer=cfg.student_optimizer,
                              teacher_params=state["policy"])
        tokens = rl_tokens(ctx, its)
        ctx.record(dict(rl_iterations=its, **({} if tokens is None else {"train_tokens": tokens}),
                        **evaluate_student(student, state["student"], state["policy"])))
        return dict(state, student_on_policy=student)

    rs_problems = list(reasoning[:cfg.rejection_prompts])
    distill_problems = list(reasoning[:cfg.distill_prompts])
    stages = [Stage("cold-start", train=cold, data_file=None),
              Stage("rl-reasoning", train=rl_reasoning, data_file=None),
              Stage("rejection-sft", train=rejection_sft, data_file="samples.json",
                    collect=lambda s, ctx: collect_samples(s["policy"], rs_problems, cfg.rejection, ctx))]
    if reward_model is None:
        stages.append(Stage("reward-model", train=train_rm, data_file=None))
    stages.append(Stage("rl-mixed", train=rl_mixed, data_file=None))
    if cfg.student_start_steps:
        stages.append(Stage("student-start", train=student_start, data_file=None))
    stages += [Stage("distill-sft", train=distill_sft, data_file="samples.json",
                     collect=lambda s, ctx: collect_samples(s["policy"], distill_problems, cfg.distill_rejection, ctx)),
               Stage("distill-on-policy", train=distill_on_policy, data_file=None)]
    stages = [dataclasses.replace(s, args=dict(shared, stage=s.name)) for s in stages]
    # device arrays where each model computes (a checkpoint restores onto their shardings), whatever the caller's are
    state = dict(policy=place_params(model, params), reward_model=place_params(rm_model, rm_template),
                 **{k: place_params(student_model, student_params) for k in ("student", "student_sft",
                                                                            "student_on_policy")})
    results: dict = {}
    state, _ = run_stages(state, stages, run_dir=run_dir, results=results, allow_change=allow_change)
    return state, [results[s.name] for s in stages if s.name in results]
