"""RLHF as InstructGPT does it (Ouyang et al. 2022), and iterative RLHF, as a pipeline of `rljax.pipelines.run_stages`.

    state, rows = rlhf_pipeline(base_params, RLHFConfig(), model=model, tokenizer=tok, task=ARITHMETIC,
                                sft_problems=a, rm_problems=b, rl_problems=c, held_out=test, key=key,
                                run_dir="runs/rlhf")

Stages (each one stage of `run_stages`, its directory run_dir/<name>, one results row each):

  sft             SFT of the base params on the task's reference completions (task.prompt(p), task.reference(p)) of
                  `sft_problems` (`rljax.pipeline_steps.sft_on_rows`).
  reward-model    a Bradley–Terry reward model r_θ: the SFT policy's backbone with a zero reward head, trained on
                  preference pairs of the `rm_problems` (problems no other stage sees), the first of two candidates
                  preferred with probability σ(β (gold_a − gold_b)), gold = task.gold_score
                  (`rljax.pipeline_steps.bradley_terry_reward_model`); its row holds the pairwise accuracy on
                  noise-free pairs of the held-out problems.
  ppo             PPO (registry algorithm "ppo": GAE, clipped surrogate, a value head on the policy's backbone)
                  from the SFT policy on the `rl_problems`, against r_θ(x, y) with the per-token KL penalty to the
                  SFT policy, r_t = −β (log π(y_t) − log π_SFT(y_t)) + [t = last] r_θ(x, y), and β set every
                  iteration by the adaptive controller of Ziegler et al. (2019) (`rljax.transforms.kl_control(
                  adaptive_kl_controller(kl_init, kl_target, kl_horizon))`):
                      β_{i+1} = β_i (1 + clip(KL_i / target − 1, −0.2, 0.2) · B / horizon),
                  KL_i the iteration's mean over its B samples of Σ_t (log π_old − log π_SFT). The gold score is
                  never trained on: each iteration logs it beside the proxy (metrics.jsonl of run_dir/policy:
                  rl/reward_mean the proxy r_θ, rl/gold_mean the gold score, rl/kl_per_sequence KL_i, rl/kl_coef
                  the β_i it used), drawn against the iteration in run_dir/rlhf.png (when matplotlib is there).
  ppo-round-r     with cfg.refresh_every = K > 0, iterative RLHF instead of `ppo` (`rljax.pipelines.
                  iterative_rlhf_stages`): before every block of K iterations but the first, the reward model is
                  refreshed on gold-ranked lists of cfg.refresh_samples samples of the current policy on
                  cfg.refresh_prompts RL problems (the next ones in order), replaying its pairs and every earlier
                  list, for refresh_epochs passes over the new lists; one row per round.

Every row but reward-model's measures the policy on `held_out` (`rljax.eval.evaluate_policy`: greedy and sampled
accuracy with task.check, gold_mean (and proxy_mean once there is a reward model) over the same samples, completion
length, kl_to_start: the KL to the policy the stage started from: the base for sft, the SFT policy for the PPO
rows); the PPO rows add the training batches' proxy and gold means at the round's first and last iteration, its
last KL and the controller's β after it. The table over every stage is run_dir/results.jsonl and results.md.

The pipeline state is {"sft": the SFT policy's params, "reward_model": the reward model's TrainState, "policy":
the PPO RLState (policy with value head and optimizer state, the frozen SFT reference, the controller's β)}; each
phase checkpoints into its component directory (run_dir/sft, run_dir/reward_model, run_dir/policy), so a run killed
anywhere resumes bit-identically: finished stages are skipped, an interrupted one resumes its phase. Each stage's
arguments (the config, digests of every problem set and of the base params, the task's name) are saved in
run_dir/<stage>/stage.json; a rerun with other ones is refused naming the stage and the file. With
allow_change=True (the study's --force-config) the new ones are recorded (stage_changes.jsonl) and reach the stages
still to run; finished stages are not run again.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax

from rljax.checkpoint import state_digest
from rljax.data.batch import PromptBatch
from rljax.data.collate import BatchIterator
from rljax.distributed import on_main
from rljax.eval import PolicyEvalConfig, complete, evaluate_policy
from rljax.metrics import WandbConfig
from rljax.pipeline_steps import (bradley_terry_reward_model, config_args, gold_pairs, json_digest,
                                  sft_on_rows)
from rljax.pipelines import IterativeRLHFConfig, Stage, iterative_rlhf_stages, rl_state, run_stages
from rljax.sampling import SampleConfig, tokenizer_ids
from rljax.sharding import place_params
from rljax.state import OptimizerConfig, create_state

__all__ = ["PLOTTED", "RLHFConfig", "plot_rlhf", "ppo_metrics", "rlhf_pipeline"]

# what run_dir/rlhf.png draws against the PPO iteration (keys of run_dir/policy/metrics.jsonl)
PLOTTED = ("rl/reward_mean", "rl/gold_mean", "rl/kl_per_sequence", "rl/kl_coef")


@dataclass(frozen=True)
class RLHFConfig:
    """The RLHF pipeline's sizes (see the module docstring for the stages).

    sft: sft_steps steps of sft_batch_size rows (sft_optimizer). reward model: rm_steps steps of rm_batch_size pairs
    (rm_optimizer; its head may train faster with head_lr), labels Bradley–Terry at rm_beta. ppo: ppo_iterations
    iterations of prompts_per_iteration prompts x samples_per_prompt samples of at most max_new_tokens at
    `temperature`; ppo_epochs x ppo_minibatches updates an iteration (ppo_optimizer; the value head starts at 0, so
    give it a head_lr); the KL controller starts at kl_init and steers the sequence KL to kl_target over kl_horizon
    samples. iterative RLHF (refresh_every > 0): refresh_prompts problems x refresh_samples samples a refresh,
    refresh_epochs passes over the new lists in batches of refresh_batch_size lists. evaluation: how every row
    measures a policy. seed: the pairs' labels and every stage's batch order (stage i: seed + i). log_every,
    eval_every, checkpoint_every, progress, tensorboard, wandb: how the phases report (not part of a stage's
    arguments; keep log_every = 1 so that every PPO iteration is in metrics.jsonl, plotted and in the rows)."""

    sft_steps: int = 300
    sft_batch_size: int = 16
    sft_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=3e-3, schedule="constant"))
    rm_steps: int = 100
    rm_batch_size: int = 16
    rm_beta: float = 5.0
    rm_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, schedule="constant",
                                                                                  head_lr=1e-3))
    ppo_iterations: int = 30
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    ppo_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, schedule="constant",
                                                                                   head_lr=1e-3))
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    kl_init: float = 0.1
    kl_target: float = 6.0
    kl_horizon: int = 10_000
    refresh_every: int = 0
    refresh_prompts: int = 32
    refresh_samples: int = 4
    refresh_epochs: int = 2
    refresh_batch_size: int = 4
    evaluation: PolicyEvalConfig = field(default_factory=PolicyEvalConfig)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    tensorboard: bool | None = None
    wandb: WandbConfig | None = None

    def __post_init__(self):
        for name in ("sft_steps", "sft_batch_size", "rm_steps", "rm_batch_size", "ppo_iterations",
                     "prompts_per_iteration", "samples_per_prompt", "max_new_tokens", "ppo_epochs", "ppo_minibatches",
                     "kl_horizon", "refresh_prompts", "refresh_epochs", "refresh_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLHFConfig.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("rm_beta", "kl_init", "kl_target", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RLHFConfig.{name}: must be > 0, got {getattr(self, name)}")
        if self.refresh_every < 0:
            raise ValueError(f"RLHFConfig.refresh_every: must be >= 0 (0: a fixed reward model), got "
                             f"{self.refresh_every}")
        if self.refresh_samples < 2:
            raise ValueError(f"RLHFConfig.refresh_samples: a ranked list compares samples, so it needs >= 2, got "
                             f"{self.refresh_samples}")
        if (self.prompts_per_iteration * self.samples_per_prompt) % self.ppo_minibatches:
            raise ValueError(f"RLHFConfig.ppo_minibatches: {self.ppo_minibatches} does not divide the "
                             f"{self.prompts_per_iteration} x {self.samples_per_prompt} samples of an iteration")

    @property
    def rlhf(self) -> IterativeRLHFConfig:
        """The PPO stage as `rljax.pipelines.iterative_rlhf` runs it (refresh_every 0: one round, never refreshed)."""
        return IterativeRLHFConfig(iterations=self.ppo_iterations, refresh_every=self.refresh_every,
                                   rm_epochs=self.refresh_epochs, rm_batch_size=self.refresh_batch_size,
                                   rm_optimizer=self.rm_optimizer, seed=self.seed, log_every=self.log_every,
                                   checkpoint_every=self.checkpoint_every, eval_every=self.eval_every,
                                   progress=self.progress,
                                   tensorboard=self.tensorboard, wandb=self.wandb)


def ppo_metrics(run_dir: str) -> dict[int, dict]:
    """{iteration: its record} of the PPO phase's metrics (run_dir/policy/metrics.jsonl; a resumed run's repeated
    iterations count once, the later record kept)."""
    from rljax.metrics import read_metrics

    return {int(r["step"]): r for r in read_metrics(f"{run_dir}/policy") if "rl/reward_mean" in r}


def plot_rlhf(run_dir: str, out_png: str | None = None) -> str | None:
    """Proxy reward, gold reward, KL to the SFT policy and the controller's β against the PPO iteration
    (`PLOTTED`) into run_dir/rlhf.png (or out_png); returns its path, or None with a warning when matplotlib is
    missing (the run does not need it)."""
    from rljax.metrics import plot_metrics

    try:
        return plot_metrics(f"{run_dir}/policy", list(PLOTTED), out_png or f"{run_dir}/rlhf.png",
                            title="PPO against the reward model: proxy, gold, KL to SFT, beta")
    except ImportError as e:
        warnings.warn(f"rlhf: no plot of the PPO curves ({e}); the numbers are in {run_dir}/policy/metrics.jsonl",
                      stacklevel=2)
        return None


def rlhf_pipeline(params, cfg: RLHFConfig, *, model, tokenizer, task, sft_problems: Sequence[Any],
                  rm_problems: Sequence[Any], rl_problems: Sequence[Any], held_out: Sequence[Any], key,
                  run_dir: str | None = None, allow_change: bool = False, eval_fn: Callable | None = None):
    """SFT → reward model → PPO (or iterative RLHF) from the base `params` of `model` (module docstring).
    -> (state, rows): state {"sft": params, "reward_model": TrainState, "policy": RLState}, rows: every stage's
    results row, in order.

    task: a `rljax.tasks.Task` (prompt, reference, check, gold_score, corruptions); sft_problems: the SFT data;
    rm_problems: the reward model's preference pairs (keep them apart from the others); rl_problems: PPO's prompts
    (and the refreshes' prompts); held_out: the evaluation set of every row. key: stage i uses fold_in(key, i).
    eval_fn: every phase's eval_fn (every cfg.eval_every steps)."""
    from rljax.algorithms import get_algorithm
    from rljax.data.reward_collate import collate_ranked
    from rljax.data.synthetic import gold_ranked_lists
    from rljax.losses.actor_critic import with_value_head
    from rljax.losses.kl_control import adaptive_kl_controller
    from rljax.models.transformer import add_head
    from rljax.rewards.learned import reward_model_reward
    from rljax.rl import RLConfig
    from rljax.transforms import kl_control

    for name, values, need in (("sft_problems", sft_problems, 1), ("rm_problems", rm_problems, 1),
                               ("rl_problems", rl_problems, cfg.prompts_per_iteration), ("held_out", held_out, 1)):
        if len(values) < need:
            raise ValueError(f"rlhf_pipeline: {name} has {len(values)} problems, the config needs at least {need}")
    rounds = cfg.rlhf.rounds
    if cfg.refresh_every and (rounds - 1) * cfg.refresh_prompts > len(rl_problems):
        raise ValueError(f"rlhf_pipeline: {rounds - 1} refreshes of {cfg.refresh_prompts} prompts need "
                         f"{(rounds - 1) * cfg.refresh_prompts} rl_problems, there are {len(rl_problems)}")
    gold = task.gold_reward()
    tok_ids = tokenizer_ids(tokenizer)
    value_model, _ = with_value_head(model, params)
    rm_model, rm_init = add_head(model, params, "reward")
    phase_loop = dict(log_every=cfg.log_every, eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                      progress=cfg.progress, tensorboard=cfg.tensorboard, wandb=cfg.wandb)
    rl_cfg = RLConfig(algorithm=get_algorithm("ppo"), epochs=cfg.ppo_epochs, minibatches=cfg.ppo_minibatches,
                      sampling=SampleConfig(max_new_tokens=cfg.max_new_tokens, n=cfg.samples_per_prompt,
                                            temperature=cfg.temperature, **tok_ids),
                      optimizer=cfg.ppo_optimizer, track_kl=True,
                      transforms=(kl_control(adaptive_kl_controller(cfg.kl_init, cfg.kl_target, cfg.kl_horizon)),))
    shared = dict(config_args(cfg), task=task.name, base=state_digest(params),
                  model=json_digest(dataclasses.asdict(model.config)),
                  **{name: json_digest([task.prompt(p) for p in values])
                     for name, values in (("sft_problems", sft_problems), ("rm_problems", rm_problems),
                                          ("rl_problems", rl_problems), ("held_out", held_out))})

    def proxy(rm_params) -> Callable:
        return reward_model_reward(rm_model, rm_params, tokenizer)

    def evaluate(p, m, start=None, rm_params=None) -> dict:
        rewards = {"gold": gold} if rm_params is None else {"gold": gold, "proxy": proxy(rm_params)}
        return evaluate_policy(p, m, tokenizer, list(held_out), cfg.evaluation, check=task.check, prompt=task.prompt,
                               rewards=rewards, start_params=start, start_model=model)

    # ------------------------------------------------------------------ the stages
    def train_sft(state, data, ctx):
        rows = [(task.prompt(p), task.reference(p)) for p in sft_problems]
        trained = sft_on_rows(model, state["sft"], rows, tokenizer=tokenizer, optimizer=cfg.sft_optimizer,
                              steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, seed=cfg.seed + ctx.index,
                              key=jax.random.fold_in(key, ctx.index), run_dir=ctx.component_dir("sft"),
                              loop=phase_loop, eval_fn=eval_fn)
        ctx.record(dict(sft_rows=len(rows), sft_steps=int(jax.device_get(trained.step)),
                        **evaluate(trained.params, model, start=state["sft"])))
        # PPO starts here: the policy (with a zero value head) and its frozen reference are the SFT policy
        _, with_value = with_value_head(model, trained.params)
        policy = rl_state(value_model, with_value, rl_cfg, jax.random.fold_in(key, 100 + ctx.index))
        return dict(state, sft=trained.params, policy=policy)

    def train_rm(state, data, ctx):
        _, rm, row = bradley_terry_reward_model(
            state["sft"], model=model, rm_model=rm_model, tokenizer=tokenizer, task=task, train_problems=rm_problems,
            held_out=held_out, beta=cfg.rm_beta, steps=cfg.rm_steps, batch_size=cfg.rm_batch_size,
            optimizer=cfg.rm_optimizer, pair_seed=cfg.seed, batch_seed=cfg.seed + ctx.index,
            key=jax.random.fold_in(key, ctx.index), run_dir=ctx.component_dir("reward_model"), loop=phase_loop,
            eval_fn=eval_fn, what=f"rlhf_pipeline: stage {ctx.name!r}")
        ctx.record(dict(**row, **evaluate(state["sft"], model, rm_params=rm.params)))  # the SFT policy, scored
        return dict(state, reward_model=rm)

    def prompt_batches():
        def collate(chunk):
            tokens, mask = tokenizer.encode_batch([task.prompt(p) for p in chunk], padding_side="left")
            return PromptBatch(tokens=tokens, mask=mask, metadata={"problems": list(chunk)})
        return BatchIterator(list(rl_problems), cfg.prompts_per_iteration, collate, seed=cfg.seed + 2)

    def rank_samples(policy_params, r: int) -> list:
        """Gold-ranked lists of refresh_samples samples of the policy on the next refresh_prompts RL problems."""
        problems = list(rl_problems[(r - 1) * cfg.refresh_prompts:r * cfg.refresh_prompts])
        texts = complete(policy_params, value_model, tokenizer, [task.prompt(p) for p in problems],
                         max_new_tokens=cfg.max_new_tokens, n=cfg.refresh_samples, temperature=cfg.temperature,
                         key=jax.random.fold_in(key, 1000 + r), batch_size=len(problems))
        k = cfg.refresh_samples
        return [list(x) for x in gold_ranked_lists(problems, [texts[i * k:(i + 1) * k] for i in range(len(problems))],
                                                     task)]

    def collate_lists(lists):
        return collate_ranked(tokenizer, [tuple(x[:3]) for x in lists], answers_per_list=cfg.refresh_samples)

    # the reward model's own training pairs, replayed at every refresh (as 2-answer lists)
    def initial_lists() -> list:
        pairs, _ = gold_pairs(rm_problems, cfg.seed, task=task, tokenizer=tokenizer,
                              max_length=rm_model.config.max_seq_len, beta=cfg.rm_beta)
        return [(q, [c, r], [0, 1]) for q, c, r in pairs]

    def record_round(state, r: int) -> dict:
        """The round's row: the policy on held_out (KL to the SFT policy), and from metrics.jsonl the training
        batches' proxy and gold means at the round's first and last iteration, the last KL and β."""
        policy = state["policy"]
        step = int(jax.device_get(policy.step))
        first = r * (cfg.refresh_every or cfg.ppo_iterations) + 1
        row = dict(rl_iterations=step, beta=float(jax.device_get(policy.transforms[0].beta)))
        if run_dir is not None:
            logged = ppo_metrics(run_dir)
            a, b = logged.get(first, {}), logged.get(step, {})
            for name, k in (("proxy", "rl/reward_mean"), ("gold", "rl/gold_mean")):
                if k in a and k in b:
                    row[f"train_{name}_first"], row[f"train_{name}_last"] = a[k], b[k]
            if "rl/kl_per_sequence" in b:
                row["train_kl_last"] = b["rl/kl_per_sequence"]
        return dict(row, **evaluate(policy.policy.params, value_model, start=state["sft"],
                                    rm_params=state["reward_model"].params))

    def round_name(r: int) -> str:
        return "ppo" if cfg.refresh_every == 0 else f"ppo-round-{r}"

    ppo_stages = iterative_rlhf_stages(prompt_batches(), rank_samples, proxy, cfg.rlhf,
                                       rl_cfg, model=value_model, rm_model=rm_model, decode=tokenizer.decode_batch,
                                       collate=collate_lists, initial_lists=initial_lists() if cfg.refresh_every
                                       else (), eval_fn=eval_fn, record=record_round, stage_name=round_name,
                                       accuracy_fn=task.answer_reward(), monitors={"gold": gold})
    stages = [Stage("sft", train=train_sft, data_file=None), Stage("reward-model", train=train_rm, data_file=None),
              *ppo_stages]
    stages = [dataclasses.replace(s, args=dict(shared, stage=s.name)) for s in stages]
    # the templates a checkpoint restores onto (device arrays, whatever the caller's params are)
    rm_template = create_state(rm_model, cfg.rm_optimizer, jax.random.fold_in(key, 1), params=rm_init)
    _, with_value = with_value_head(model, params)
    state = dict(sft=place_params(model, params), reward_model=rm_template,
                 policy=rl_state(value_model, with_value, rl_cfg, jax.random.fold_in(key, 100)))
    results: dict = {}
    state, _ = run_stages(state, stages, run_dir=run_dir, results=results, allow_change=allow_change)
    if run_dir is not None:  # several processes: one draws it
        on_main(f"rlhf: drawing {run_dir}/rlhf.png", plot_rlhf, run_dir)
    return state, [results[s.name] for s in stages if s.name in results]
