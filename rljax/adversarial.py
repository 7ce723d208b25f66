"""Adversarial RLAIF from expert demonstrations (GAIL, Ho & Ermon 2016; SeqGAN, Yu et al. 2017) as a pipeline
of `rljax.pipelines.run_stages`:

    state, rows = adversarial_rlaif(base_params, AdversarialConfig(), model=model, tokenizer=tok, task=ARITHMETIC,
                                    sft_problems=a, expert_problems=b, held_out=test, key=key, run_dir="runs/adv")

The expert demonstrations are the task's reference completions (task.reference). Stages (one results row each):

  sft        SFT of the base params on the references of `sft_problems` (part of the demonstrations); then the
             RL state starts from the SFT policy (also the frozen reference of the KL term and of kl_to_sft) and
             the discriminator D from the SFT backbone with a zero reward head (`add_head`;
             cfg.discriminator_init = "fresh": a freshly initialised model of the same shape).
  round-r    collect: the policy at the round's start completes cfg.prompts_per_round prompts of
             `expert_problems` (round r takes problems (r·m + i) mod N, m = prompts_per_round), one sample each at
             cfg.temperature, and every held-out prompt once more (the *fresh* samples D never trains on); saved in
             round-r/samples.json. train: (1) cfg.disc_steps steps of D on expert (label 1) vs policy (label 0) rows,
             the logistic loss
                 L_D = mean_b [softplus(z_b) − y_b z_b] = −mean_b [y_b log D_b + (1 − y_b) log(1 − D_b)],
                 z = the reward head at the last token, D = σ(z) = P(expert | x, y)
             (the reward-model objective "feedback" without inverse-propensity weights: `FeedbackConfig(ipw=False)`
             through `rljax.phases.train_reward_model`; cfg.replay: D trains on every round's samples so far);
             (2) D measured on the held-out references vs the fresh samples (`discriminator_metrics`) and the reward
             it gives the fresh samples (`discriminator_reward`); the failure detector `discriminator_wins`;
             (3) cfg.rl_iterations RL iterations of cfg.algorithm ("reinforce": REINFORCE with a batch-mean baseline;
             "ppo": PPO with a value head on the policy's backbone, GAE) on the reward r(x, y) = f(z(x, y)) of the
             current D; (4) the policy after the round measured on `held_out` (`rljax.eval.evaluate_policy`): greedy
             and sampled accuracy, the gold score (task.gold_score: never used for training), length, KL to SFT.

The reward forms f (cfg.reward), with z = logit D:

    "log_d"               r = log D = −softplus(−z)         ≤ 0; ≈ z when D rejects the sample (z ≪ 0): the
                                                              generator objective that keeps its gradient in z
                                                              (the "non-saturating" one of GAN papers)
    "neg_log_one_minus_d" r = −log(1 − D) = softplus(z)     ≥ 0 (GAIL's positive reward); ≈ e^z → 0 when D
                                                              rejects every sample: the spread across samples
                                                              vanishes with D(policy) (saturates)
    "logit"               r = z = log D − log(1 − D)         AIRL's form; the sum of the two above
    "d"                   r = D = σ(z)                        in (0, 1) (SeqGAN's); flat at both ends: ≈ e^z → 0
                                                              when D rejects every sample, like −log(1 − D)

A note on names: the brief for this module calls −log(1 − D) "the non-saturating form"; in the GAN literature
(Goodfellow et al. 2014) it is maximising log D that does not saturate when D wins, while −log(1 − D) ≈ e^z
flattens. The code names each form by its formula.

The usual failure: D wins (held-out accuracy → 1, D(policy) → 0), and the reward stops telling the policy's samples
apart. Each round's row has `discriminator_wins` = held-out accuracy ≥ cfg.win_accuracy and mean D on the fresh
policy samples ≤ cfg.win_d_policy [and, with cfg.win_reward_std, the reward's std over them below it]
(`discriminator_wins` says why); a round where it holds also warns.
A non-finite D score raises naming the sample (prompt and completion).

State {"policy": RLState, "discriminator": TrainState}; the phases checkpoint into run_dir/sft, run_dir/policy (all
rounds' RL: its step grows to (r + 1)·rl_iterations) and run_dir/discriminator (its step grows to
(r + 1)·disc_steps), and the whole state is checkpointed after every stage, so a killed run resumes at the right
stage and step bit-identically. Each stage's arguments (config, digests of the problem sets and base params, the
task) are saved in run_dir/<stage>/stage.json; a rerun with others is refused naming the stage and the file
(allow_change=True, the study's --force-config: recorded in stage_changes.jsonl and applied to the stages still to run).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rljax.checkpoint import state_digest
from rljax.data.batch import PromptBatch
from rljax.data.collate import BatchIterator, encode_prompt_completion
from rljax.data.reward_collate import collate_feedback
from rljax.distributed import process_local
from rljax.eval import PolicyEvalConfig, complete, evaluate_policy
from rljax.pipeline_steps import config_args, json_digest as _digest, sft_on_rows
from rljax.losses.reward_model import FeedbackConfig
from rljax.metrics import WandbConfig
from rljax.ops.ranking import binary_cross_entropy
from rljax.phases import LoopConfig, RewardModelPhaseConfig, train_reward_model
from rljax.pipelines import Stage, rl_state, run_stages, train_rl
from rljax.rewards.learned import reward_model_reward
from rljax.sampling import SampleConfig, tokenizer_ids
from rljax.state import OptimizerConfig, create_state

__all__ = ["ADVERSARIAL_ALGORITHMS", "DISCRIMINATOR_REWARDS", "AdversarialConfig", "adversarial_rlaif",
           "adversarial_reward", "discriminator_metrics", "discriminator_reward", "discriminator_wins"]

DISCRIMINATOR_REWARDS = ("log_d", "neg_log_one_minus_d", "logit", "d")
ADVERSARIAL_ALGORITHMS = ("reinforce", "ppo")
DISCRIMINATOR_INITS = ("sft", "fresh")


# ----------------------------------------------------------------------------- the maths


def discriminator_reward(logits, form: str = "log_d"):
    """The policy's reward from D's logits z [B] -> [B] float32 (module docstring): "log_d" log σ(z) =
    −softplus(−z); "neg_log_one_minus_d" −log(1 − σ(z)) = softplus(z); "logit" z; "d" σ(z). Computed from z with
    softplus, so no D = 0 or 1 in float32 turns a finite logit into an infinite reward."""
    if form not in DISCRIMINATOR_REWARDS:
        raise ValueError(f"discriminator_reward: form {form!r} not in {DISCRIMINATOR_REWARDS}")
    z = jnp.asarray(logits, jnp.float32)
    if form == "log_d":
        return -jax.nn.softplus(-z)
    if form == "neg_log_one_minus_d":
        return jax.nn.softplus(z)
    if form == "d":
        return jax.nn.sigmoid(z)
    return z


def discriminator_metrics(expert_logits, policy_logits) -> dict:
    """D on held-out expert demonstrations (logits [N_E], label 1) and policy samples ([N_P], label 0):

      disc_loss             the logistic loss, mean over the N_E + N_P rows of softplus(z) − y z
      disc_accuracy         balanced accuracy ½ (mean[z_E > 0] + mean[z_P ≤ 0]) (D = ½ counts as "policy")
      disc_accuracy_expert  mean[z_E > 0];  disc_accuracy_policy  mean[z_P ≤ 0]
      d_expert_mean, d_policy_mean   mean σ(z) on each set
    """
    ze, zp = np.asarray(expert_logits, np.float64), np.asarray(policy_logits, np.float64)
    if ze.ndim != 1 or zp.ndim != 1 or not len(ze) or not len(zp):
        raise ValueError(f"discriminator_metrics: need non-empty 1-d logits, got shapes {ze.shape} and {zp.shape}")
    z = jnp.asarray(np.concatenate([ze, zp]), jnp.float32)
    y = jnp.asarray(np.concatenate([np.ones_like(ze), np.zeros_like(zp)]), jnp.float32)
    acc_e, acc_p = float(np.mean(ze > 0)), float(np.mean(zp <= 0))
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    return dict(disc_loss=float(binary_cross_entropy(z, y).mean()), disc_accuracy=0.5 * (acc_e + acc_p),
                disc_accuracy_expert=acc_e, disc_accuracy_policy=acc_p, d_expert_mean=float(sigmoid(ze).mean()),
                d_policy_mean=float(sigmoid(zp).mean()))


def discriminator_wins(row: dict, *, win_accuracy: float, win_d_policy: float,
                       win_reward_std: float | None = None) -> bool:
    """The failure detector on a round's row: D tells held-out expert demonstrations from fresh policy samples
    (disc_accuracy ≥ win_accuracy) and is confident about the policy's samples (d_policy_mean ≤ win_d_policy),
    and, with win_reward_std, the reward no longer separates those samples (reward_std < win_reward_std).

    Why D(policy) and not the accuracy alone: a D whose logits are all near 0 (D ≈ ½) can order the two sets
    perfectly by a hair while telling the policy little; it has not won. Why the std condition is optional: with
    r = −log(1 − D) = softplus(z) ≤ e^z the spread across samples vanishes as D(policy) → 0, but with r = log D ≈ z
    it stays the spread of the logits, so a flat reward is a symptom of the saturating form only. A row missing a
    field is a KeyError naming it."""
    for name in ("disc_accuracy", "d_policy_mean") + (("reward_std",) if win_reward_std is not None else ()):
        if name not in row:
            raise KeyError(f"discriminator_wins: the row has no {name!r} (fields {sorted(row)})")
    won = row["disc_accuracy"] >= win_accuracy and row["d_policy_mean"] <= win_d_policy
    return bool(won and (win_reward_std is None or row["reward_std"] < win_reward_std))


def _finite_scores(z, prompts, completions, where: str) -> np.ndarray:
    z = np.asarray(z, np.float32)
    bad = np.flatnonzero(~np.isfinite(z))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{where}: the discriminator scored {len(bad)} sample(s) non-finite, the first row {i} "
                         f"({z[i]}): prompt {prompts[i]!r}, completion {completions[i]!r}")
    return z


def adversarial_reward(model, params, tokenizer, *, form: str = "log_d", max_length: int | None = None) -> Callable:
    """The RL reward of D (params of `model`, a "reward" head): fn(prompts, completions, **_) -> float32 [B],
    f(z) of `discriminator_reward` with z = the reward head on [bos] prompt completion [eos]
    (`rljax.rewards.learned.reward_model_reward`, which encodes as `collate_feedback` does). params may be a
    zero-argument callable read at every call (a discriminator updated between rounds, scored without
    recompiling). A non-finite logit raises naming the sample."""
    if form not in DISCRIMINATOR_REWARDS:
        raise ValueError(f"adversarial_reward: form {form!r} not in {DISCRIMINATOR_REWARDS}")
    logits = reward_model_reward(model, params, tokenizer, max_length=max_length)

    def reward(prompts, completions, **_):
        z = _finite_scores(logits(prompts, completions), prompts, completions, "adversarial_reward")
        return np.asarray(discriminator_reward(z, form), np.float32)

    reward.__name__ = f"discriminator_{form}_reward"
    return reward


# ----------------------------------------------------------------------------- the pipeline


def _sft_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=3e-3, schedule="constant")


@dataclass(frozen=True)
class AdversarialConfig:
    """Sizes of `adversarial_rlaif` (module docstring).

    sft: sft_steps steps of sft_batch_size rows (sft_optimizer). Discriminator: disc_steps steps a round of
    disc_batch_size rows (disc_optimizer), on prompts_per_round expert and as many policy rows a round (replay:
    every round's so far); discriminator_init "sft" (the SFT backbone) or "fresh". Policy: rounds rounds of
    rl_iterations iterations of `algorithm` ("reinforce" | "ppo"), prompts_per_iteration prompts x
    samples_per_prompt samples of at most max_new_tokens at temperature, rl_optimizer (head_lr: PPO's value
    head), kl_coef to the SFT policy (None: the algorithm's own; 0: none), reward form `reward`
    (DISCRIMINATOR_REWARDS). Failure detector: win_accuracy, win_d_policy, win_reward_std (None: not used)
    (`discriminator_wins`). evaluation: how every row measures the policy.
    seed: the batches' shuffling. log_every ... wandb: how the phases report (not part of a stage's arguments)."""

    sft_steps: int = 200
    sft_batch_size: int = 16
    sft_optimizer: OptimizerConfig = field(default_factory=_sft_optimizer)
    rounds: int = 4
    prompts_per_round: int = 64
    disc_steps: int = 20
    disc_batch_size: int = 16
    disc_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, schedule="constant"))
    discriminator_init: str = "sft"
    replay: bool = False
    algorithm: str = "reinforce"
    rl_iterations: int = 5
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    rl_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-5, schedule="constant",
                                                                                  b2=0.95, head_lr=1e-3))
    kl_coef: float | None = None
    reward: str = "log_d"
    win_accuracy: float = 0.95
    win_d_policy: float = 0.1
    win_reward_std: float | None = None
    evaluation: PolicyEvalConfig = field(default_factory=PolicyEvalConfig)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    tensorboard: bool | None = None
    wandb: WandbConfig | None = None

    def __post_init__(self):
        for name in ("sft_steps", "sft_batch_size", "rounds", "prompts_per_round", "disc_steps", "disc_batch_size",
                     "rl_iterations", "prompts_per_iteration", "samples_per_prompt", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdversarialConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.algorithm not in ADVERSARIAL_ALGORITHMS:
            raise ValueError(f"AdversarialConfig.algorithm: {self.algorithm!r} not in {ADVERSARIAL_ALGORITHMS}")
        if self.reward not in DISCRIMINATOR_REWARDS:
            raise ValueError(f"AdversarialConfig.reward: {self.reward!r} not in {DISCRIMINATOR_REWARDS}")
        if self.discriminator_init not in DISCRIMINATOR_INITS:
            raise ValueError(f"AdversarialConfig.discriminator_init: {self.discriminator_init!r} not in "
                             f"{DISCRIMINATOR_INITS}")
        if not 0.5 <= self.win_accuracy <= 1.0:
            raise ValueError(f"AdversarialConfig.win_accuracy: must be in [0.5, 1], got {self.win_accuracy}")
        if not 0.0 <= self.win_d_policy <= 1.0:
            raise ValueError(f"AdversarialConfig.win_d_policy: must be in [0, 1], got {self.win_d_policy}")
        if self.win_reward_std is not None and not self.win_reward_std > 0:
            raise ValueError(f"AdversarialConfig.win_reward_std: must be > 0 or None, got {self.win_reward_std}")
        if self.kl_coef is not None and not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"AdversarialConfig.kl_coef: must be finite and >= 0, or None, got {self.kl_coef}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"AdversarialConfig.temperature: must be finite and > 0, got {self.temperature}")
        if self.seed < 0:
            raise ValueError(f"AdversarialConfig.seed: must be >= 0, got {self.seed}")
        if self.algorithm == "reinforce" and self.samples_per_prompt * self.prompts_per_iteration < 2:
            raise ValueError("AdversarialConfig: REINFORCE's batch-mean baseline needs >= 2 samples an iteration")




def _rl_config(cfg: AdversarialConfig, tokenizer):
    from rljax.algorithms import get_algorithm
    from rljax.rl import RLConfig

    algo = get_algorithm(cfg.algorithm)
    if cfg.kl_coef is not None:  # None: the algorithm's own; 0: none
        algo = algo.with_kl_coef(cfg.kl_coef)
    sampling = SampleConfig(max_new_tokens=cfg.max_new_tokens, n=cfg.samples_per_prompt, temperature=cfg.temperature,
                            **tokenizer_ids(tokenizer))
    return RLConfig(algorithm=algo, sampling=sampling, optimizer=cfg.rl_optimizer, track_kl=True)


def _check_lengths(cfg: AdversarialConfig, tokenizer, task, expert_problems, held_out, max_len: int) -> None:
    """Every row the discriminator scores is [bos] prompt completion [eos] within the model's max_seq_len L:

        policy samples:  len([bos] prompt) + max_new_tokens + n_eos ≤ L   for the longest prompt of
                         expert_problems (the RL and round prompts) and held_out (the fresh samples);
        demonstrations:  len([bos] prompt reference [eos]) ≤ L           for every expert and held-out problem.

    The sampler alone accepts len([bos] prompt) + max_new_tokens = L, so without this check a completion of
    max_new_tokens tokens would fail D's scoring in the middle of a round, after SFT and earlier rounds trained.
    Checked before any stage runs; an error names the sizes and the problem. (A tokenizer that re-encodes a
    decoded sample into more tokens than it was sampled as can still exceed L: then the scorer names the row.)"""
    n_eos = len(tokenizer.encode("", add_bos=False, add_eos=True))
    prompts = [(name, i, task.prompt(p)) for name, values in (("expert_problems", expert_problems),
                                                              ("held_out", held_out)) for i, p in enumerate(values)]
    lengths = [len(tokenizer.encode(q, add_bos=True, add_eos=False)) for _, _, q in prompts]
    k = int(np.argmax(lengths))
    if lengths[k] + cfg.max_new_tokens + n_eos > max_len:
        name, i, q = prompts[k]
        raise ValueError(f"adversarial_rlaif: the discriminator cannot score a completion of max_new_tokens="
                         f"{cfg.max_new_tokens} tokens: the longest prompt ({name}[{i}] {q!r}) has {lengths[k]} "
                         f"tokens with bos, + {cfg.max_new_tokens} + {n_eos} eos = "
                         f"{lengths[k] + cfg.max_new_tokens + n_eos} > the model's max_seq_len={max_len}; use "
                         f"max_new_tokens <= {max_len - lengths[k] - n_eos} or a longer max_seq_len")
    for name, values in (("expert_problems", expert_problems), ("held_out", held_out)):
        for i, p in enumerate(values):
            n = len(encode_prompt_completion(tokenizer, task.prompt(p), task.reference(p), i, add_bos=True,
                                             add_eos=True)[0])
            if n > max_len:
                raise ValueError(f"adversarial_rlaif: {name}[{i}]'s demonstration [bos] prompt reference [eos] has "
                                 f"{n} tokens > the model's max_seq_len={max_len}: prompt {task.prompt(p)!r}, "
                                 f"reference {task.reference(p)!r}")


def adversarial_rlaif(params, cfg: AdversarialConfig, *, model, tokenizer, task, sft_problems: Sequence[Any],
                      expert_problems: Sequence[Any], held_out: Sequence[Any], key, run_dir: str | None = None,
                      allow_change: bool = False, eval_fn: Callable | None = None):
    """Adversarial RLAIF from the base `params` of `model` (module docstring). -> (state, rows): state
    {"policy": RLState, "discriminator": TrainState}, rows: the results row of every stage, in order ("sft",
    then "round-0" ...).

    task: a `rljax.tasks.Task` (prompt, reference = the expert demonstration, check, answer reward, gold_score).
    sft_problems: the demonstrations the policy is fine-tuned on; expert_problems: the discriminator's expert
    demonstrations and the RL prompts; held_out: D's held-out demonstrations and every row's evaluation set.
    key: stage i uses fold_in(key, i). eval_fn: every phase's eval_fn (every cfg.eval_every steps).
    Before any stage trains, every row D will score must fit the model's max_seq_len (`_check_lengths`: the
    longest prompt with a completion of cfg.max_new_tokens and eos, and every demonstration), else a ValueError
    names the sizes."""
    for name, values, need in (("sft_problems", sft_problems, cfg.sft_batch_size),
                               ("expert_problems", expert_problems, max(cfg.prompts_per_round,
                                                                        cfg.prompts_per_iteration)),
                               ("held_out", held_out, 1)):
        if len(values) < need:
            raise ValueError(f"adversarial_rlaif: {name} has {len(values)} problems, the config needs at least {need}")
    _check_lengths(cfg, tokenizer, task, expert_problems, held_out, model.config.max_seq_len)
    from rljax.losses.actor_critic import with_value_head
    from rljax.models.transformer import add_head

    rl_cfg = _rl_config(cfg, tokenizer)
    # PPO's critic is a value head on the policy's backbone (V = 0 at first); the base model stays head-free for SFT
    policy_model = with_value_head(model, params)[0] if cfg.algorithm == "ppo" else model
    disc_model = add_head(model, params, "reward")[0]
    max_len = model.config.max_seq_len
    gold = task.gold_reward()
    answer = task.answer_reward()
    shared = dict(config_args(cfg),
                  task=task.name, sft_problems=_digest([task.prompt(p) for p in sft_problems]),
                  expert_problems=_digest([[task.prompt(p), task.reference(p)] for p in expert_problems]),
                  held_out=_digest([[task.prompt(p), task.reference(p)] for p in held_out]),
                  base=state_digest(params), model=_digest(dataclasses.asdict(model.config)))
    phase_loop = dict(log_every=cfg.log_every, eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                      progress=cfg.progress, tensorboard=cfg.tensorboard, wandb=cfg.wandb)
    held_prompts = [task.prompt(p) for p in held_out]
    held_refs = [task.reference(p) for p in held_out]
    # D's params of the running round: the scorers below are built (and compiled) once and read them at every call
    current: dict = {}
    reward = adversarial_reward(disc_model, lambda: current["discriminator"], tokenizer, form=cfg.reward,
                                max_length=max_len)
    logits = reward_model_reward(disc_model, lambda: current["discriminator"], tokenizer, max_length=max_len)

    def start_state(policy_params, k):
        """{"policy": the RLState from `policy_params` (plain model), "discriminator": D at step 0}."""
        p = with_value_head(model, policy_params)[1] if cfg.algorithm == "ppo" else policy_params
        d = add_head(model, policy_params, "reward")[1] if cfg.discriminator_init == "sft" else \
            disc_model.init(jax.random.fold_in(k, 1))
        return {"policy": rl_state(policy_model, p, rl_cfg, jax.random.fold_in(k, 0)),
                "discriminator": create_state(disc_model, cfg.disc_optimizer, jax.random.fold_in(k, 2), params=d)}

    def plain(policy_params):
        """The policy's params without PPO's value head (sampling and evaluation need only the LM)."""
        return {k: v for k, v in policy_params.items() if k not in ("value_head", "value_bias")}

    def evaluate(policy_params, sft_params) -> dict:
        row = evaluate_policy(plain(policy_params), model, tokenizer, list(held_out), cfg.evaluation, check=task.check,
                              prompt=task.prompt, reward_fn=gold,
                              start_params=None if sft_params is None else plain(sft_params))
        renamed = dict(reward_mean="gold_score", kl_to_start="kl_to_sft")
        return {renamed.get(k, k): v for k, v in row.items()}

    def train_sft(state, data, ctx):
        rows = [(task.prompt(p), task.reference(p)) for p in sft_problems]
        trained = sft_on_rows(model, params, rows, tokenizer=tokenizer, optimizer=cfg.sft_optimizer,
                              steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, seed=cfg.seed + ctx.index,
                              key=jax.random.fold_in(key, ctx.index), run_dir=ctx.component_dir("sft"),
                              loop=phase_loop, eval_fn=eval_fn)
        ctx.record(dict(round=-1, sft_rows=len(rows), sft_steps=int(jax.device_get(trained.step)),
                        **evaluate(trained.params, None)))
        return start_state(trained.params, jax.random.fold_in(key, ctx.index))

    def collect(r, state, ctx):
        k = jax.random.fold_in(key, ctx.index)
        policy = plain(state["policy"].policy.params)
        n = len(expert_problems)
        idx = [(r * cfg.prompts_per_round + i) % n for i in range(cfg.prompts_per_round)]
        prompts = [task.prompt(expert_problems[i]) for i in idx]
        sampled = complete(policy, model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, key=jax.random.fold_in(k, 0))
        fresh = complete(policy, model, tokenizer, held_prompts, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, key=jax.random.fold_in(k, 1))
        return dict(problem_index=idx, expert=[[p, task.reference(expert_problems[i])] for p, i in zip(prompts, idx)],
                    policy=[[p, c] for p, c in zip(prompts, sampled)], fresh=fresh)

    def prompt_batches(ctx):
        def collate_prompts(chunk):
            tokens, mask = tokenizer.encode_batch([task.prompt(p) for p in chunk], padding_side="left")
            return PromptBatch(tokens=tokens, mask=mask, metadata={"problems": list(chunk)})
        # one seed for every round: the RL phase reads batch_at(its step), which grows across rounds
        return BatchIterator(list(expert_problems), cfg.prompts_per_iteration, collate_prompts, seed=cfg.seed)

    def train_round(r, state, data, ctx):
        # (1) the discriminator: expert rows (label 1) against the policy's samples (label 0)
        rounds = [ctx.data(f"round-{j}") for j in range(r)] + [data] if cfg.replay else [data]
        rows = [(p, c, 1, 1.0) for d in rounds for p, c in d["expert"]] + \
               [(p, c, 0, 1.0) for d in rounds for p, c in d["policy"]]
        for i, (p, c, _, _) in enumerate(rows):
            if len(encode_prompt_completion(tokenizer, p, c, i, add_bos=True, add_eos=True)[0]) > max_len:
                raise ValueError(f"adversarial_rlaif: stage {ctx.name!r}: discriminator row {i} is longer than the "
                                 f"model's max_seq_len {max_len}: prompt {p!r}, completion {c!r}")
        disc = state["discriminator"]
        target = (r + 1) * cfg.disc_steps
        if int(jax.device_get(disc.step)) < target:
            collate = functools.partial(collate_feedback, tokenizer, max_length=max_len, ipw=False)
            phase = RewardModelPhaseConfig(loss=FeedbackConfig(ipw=False), optimizer=cfg.disc_optimizer,
                                           loop=LoopConfig(steps=target, **phase_loop))
            batches = BatchIterator(rows, min(cfg.disc_batch_size, len(rows)), collate, seed=cfg.seed + ctx.index)
            disc = train_reward_model(disc, batches, phase, model=disc_model,
                                      run_dir=ctx.component_dir("discriminator"), eval_fn=eval_fn)
        # (2) D on held-out demonstrations vs fresh samples of the policy it was trained against
        current["discriminator"] = process_local(disc_model, disc.params)[1]  # the scorers run on each process's own devices
        where = f"adversarial_rlaif: stage {ctx.name!r}"
        z_expert = _finite_scores(logits(held_prompts, held_refs), held_prompts, held_refs, where)
        z_policy = _finite_scores(logits(held_prompts, data["fresh"]), held_prompts, data["fresh"], where)
        r_policy = np.asarray(discriminator_reward(z_policy, cfg.reward), np.float64)
        disc_row = dict(discriminator_metrics(z_expert, z_policy), reward_mean=float(r_policy.mean()),
                        reward_std=float(r_policy.std()))
        wins = discriminator_wins(disc_row, win_accuracy=cfg.win_accuracy, win_d_policy=cfg.win_d_policy,
                                  win_reward_std=cfg.win_reward_std)
        if wins:
            warnings.warn(f"adversarial_rlaif: round {r}: the discriminator wins (held-out accuracy "
                          f"{disc_row['disc_accuracy']:.3f}, mean D on the policy's samples "
                          f"{disc_row['d_policy_mean']:.3g}, reward std {disc_row['reward_std']:.3g}): the policy "
                          "gradient carries little signal", stacklevel=2)
        # (3) RL against the current discriminator
        policy = train_rl(state["policy"], prompt_batches(ctx), reward, rl_cfg, model=policy_model,
                          decode=tokenizer.decode_batch, steps=(r + 1) * cfg.rl_iterations,
                          run_dir=ctx.component_dir("policy"), log_every=cfg.log_every,
                          checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every, progress=cfg.progress,
                          eval_fn=eval_fn, tensorboard=cfg.tensorboard, wandb=cfg.wandb, accuracy_fn=answer)
        # (4) the policy after the round
        ctx.record(dict(round=r, disc_rows=len(rows), disc_steps=int(jax.device_get(disc.step)), **disc_row,
                        discriminator_wins=wins, rl_iterations=int(jax.device_get(policy.step)),
                        **evaluate(policy.policy.params, policy.ref_params)))
        return dict(state, policy=policy, discriminator=disc)

    stages = [Stage("sft", train=train_sft, data_file=None)]
    stages += [Stage(f"round-{r}", collect=functools.partial(collect, r), train=functools.partial(train_round, r),
                     data_file="samples.json") for r in range(cfg.rounds)]
    stages = [dataclasses.replace(s, args=dict(shared, stage=s.name)) for s in stages]
    # the template the stage checkpoints restore onto (its values are replaced by the sft stage): device arrays on
    # the models' meshes (`rl_state`, `create_state`), whatever the caller's params are
    state = start_state(params, jax.random.fold_in(key, 0))
    results: dict = {}
    state, _ = run_stages(state, stages, run_dir=run_dir, results=results, allow_change=allow_change)
    return state, [results[s.name] for s in stages if s.name in results]

