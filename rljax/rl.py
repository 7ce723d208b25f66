"""The shared on-policy RL iteration: sample -> score -> prepare -> update.

    iteration = make_rl_iteration(model, RLConfig(algorithm="grpo"), reward_fn, decode)
    state = create_rl_state(model, sft_params, cfg.optimizer, key)
    state, metrics = iteration(state, prompt_tokens, prompt_mask, problems=problems)

Every algorithm of the registry plugs in through (config, prepare, loss); the
loop itself does not change per algorithm. Python reward functions run on the
host on decoded text; sampling, reference log-probs and updates are jitted.
"""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rljax.algorithms import check_group_size, get_algorithm
from rljax.losses.actor_critic import approx_kl, token_values, value_loss
from rljax.losses.kl_control import KLController, KLControllerState
from rljax.losses.policy_gradient import kl_metrics
from rljax.models.logprobs import target_mask, token_logprobs
from rljax.ops.advantages import group_range
from rljax.rewards.reward_model import NormaliserState, RewardNormaliser
from rljax.rewards.rules import score
from rljax.sampling import SampleConfig, concat_rollouts, sample, truncate_prompts
from rljax.sharding import param_shardings, shard_batch, shard_params
from rljax.state import OptimizerConfig, TrainState, create_state, make_train_step


@struct.dataclass
class RLState:
    """step: RL iterations done (the prompt data position); policy: the trained
    TrainState; ref_params: the frozen reference (start of the phase); reward_ema:
    running mean of rewards (moving-average baseline); rng: key for sampling;
    critic: a separate value model's TrainState for actor-critic methods (None when
    there is none or the value head shares the policy's params); kl_control: the
    adaptive KL controller's state (None without one); reward_norm: the running reward
    normaliser's statistics (None without one). The loop threads the whole pytree, so
    checkpoints and resumption cover every field."""

    step: jax.Array
    policy: TrainState
    ref_params: Any
    reward_ema: jax.Array
    rng: jax.Array
    critic: TrainState | None = None
    kl_control: KLControllerState | None = None
    reward_norm: NormaliserState | None = None


@dataclass(frozen=True)
class RLConfig:
    """algorithm: a registry name; loss: its config (None = the registry default).
    epochs x minibatches: updates per iteration over the sampled rows.
    ema_decay: decay of the running reward mean (moving-average baseline).
    track_kl: compute the reference's log-probs every iteration to report KL (k1,
    k3) to it even when the loss has no KL term (one extra forward pass).
    truncate_prompts: prompts longer than max_seq_len − max_new_tokens keep their
    last tokens instead of raising.
    max_refills: dynamic sampling (DAPO; for configs with drop_equal_groups): while
    fewer groups than prompts have unequal rewards, sample up to this many more
    prompt batches and fill the batch with their informative groups.
    target_kl: PPO's early stop: before each minibatch update the policy's approx
    KL to π_old on that minibatch is measured (one forward pass); above 1.5 ×
    target_kl the iteration's remaining updates are skipped.
    kl_controller: adaptive β for losses with a per-token KL penalty (e.g.
    `adaptive_kl_controller`); its state lives in RLState.kl_control and is updated
    with the sampled sequences' KL to the reference (Σ_t k1, mean over rows).
    staleness, actors: asynchronous actors (A3C style, used by the `rl` phase): actor
    threads sample the batch of iteration i + staleness with a snapshot of the
    params while the learner trains on batch i, so a batch is `staleness`
    iterations old when it is learned from (0: synchronous, identical to the plain
    loop); `actors` threads share the sampling.
    critic_optimizer, critic_epochs: a separate critic (RLState.critic) is fitted
    after the policy update by critic_epochs x minibatches regression steps on the
    returns (optimizer: critic_optimizer, default `optimizer`).
    reward_normaliser: standardise every iteration's rewards with running statistics
    over all rewards so far before the loss sees them (e.g.
    `rljax.rewards.reward_model.running_normaliser()`, for a learned reward model whose
    scale drifts); its state is RLState.reward_norm (create_rl_state(...,
    reward_normaliser=)). Metrics report the raw rewards."""

    algorithm: str = "grpo"
    loss: Any = None
    sampling: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=32, n=4))
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, schedule="constant"))
    epochs: int = 1
    minibatches: int = 1
    ema_decay: float = 0.9
    track_kl: bool = True
    truncate_prompts: bool = False
    max_refills: int = 0
    target_kl: float | None = None
    kl_controller: KLController | None = None
    staleness: int = 0
    actors: int = 1
    critic_optimizer: OptimizerConfig | None = None
    critic_epochs: int = 1
    reward_normaliser: RewardNormaliser | None = None

    def __post_init__(self):
        algo = get_algorithm(self.algorithm)
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError(f"RLConfig: epochs and minibatches must be >= 1, got {self.epochs}, {self.minibatches}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"RLConfig.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.max_refills < 0:
            raise ValueError(f"RLConfig.max_refills: must be >= 0, got {self.max_refills}")
        if self.max_refills and not getattr(self.loss or algo.config, "drop_equal_groups", False):
            raise ValueError("RLConfig.max_refills: refilling replaces dropped groups, so it needs a loss config "
                             "with drop_equal_groups=True (e.g. algorithm='dapo')")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"RLConfig.target_kl: must be positive or None, got {self.target_kl}")
        if self.critic_epochs < 1:
            raise ValueError(f"RLConfig.critic_epochs: must be >= 1, got {self.critic_epochs}")
        if algo.make_update is not None and (self.epochs, self.minibatches) != (1, 1):
            raise ValueError(f"RLConfig: {self.algorithm} takes one step on the whole batch per iteration; "
                             f"got epochs={self.epochs}, minibatches={self.minibatches}")
        if self.staleness < 0 or self.actors < 1:
            raise ValueError(f"RLConfig: need staleness >= 0 and actors >= 1, got {self.staleness}, {self.actors}")
        if self.kl_controller is not None and not algo.uses_values:
            raise ValueError(f"RLConfig.kl_controller: {self.algorithm} has no per-token KL reward to control; "
                             "use an actor-critic algorithm (a2c, ppo)")


def create_rl_state(model, params, opt_cfg: OptimizerConfig, key, *, kl_controller: KLController | None = None,
                    critic_model=None, critic_params=None, critic_optimizer: OptimizerConfig | None = None,
                    reward_normaliser: RewardNormaliser | None = None) -> RLState:
    """The policy starts from a copy of `params` (updates donate their input, so the
    caller's arrays stay valid); `params` themselves become the frozen reference.
    With `model.mesh`, policy, optimizer state and reference are placed sharded.
    kl_controller: the adaptive KL controller whose state starts here.
    critic_model, critic_params: a separate critic (e.g. `with_value_head(model,
    params)` for one initialised from the policy, `critic_from_reward_model` from a
    reward model) with its own optimizer state (critic_optimizer, default opt_cfg).
    reward_normaliser: the RLConfig.reward_normaliser whose state starts here."""
    if critic_model is not None and (critic_params is None or "value" not in critic_model.config.heads):
        raise ValueError("create_rl_state: a separate critic needs critic_params and a critic_model with a "
                         "value head (see rljax.losses.actor_critic.with_value_head)")
    k_policy, k_rl, k_critic = jax.random.split(key, 3)
    mesh = model.mesh
    for name, m, p, o in (("policy", model, params, opt_cfg), ("critic", critic_model, critic_params,
                                                               critic_optimizer or opt_cfg)):
        head = None if m is None or "value" not in m.config.heads else p["value_head"]
        # at fine-tuning learning rates (<= 1e-4) a zero head needs hundreds of Adam steps to reach E[reward]
        if head is not None and o.head_lr is None and o.lr <= 1e-4 and \
                getattr(head, "is_fully_addressable", True) and not np.any(np.asarray(jax.device_get(head))):
            warnings.warn(f"create_rl_state: the {name}'s value head is freshly initialised (zero) and trains at "
                          f"the backbone's learning rate {o.lr:g}; it will lag the rewards for many iterations. "
                          "Set OptimizerConfig.head_lr (e.g. 100x lr) to fit it faster.", stacklevel=2)
    policy = create_state(model, opt_cfg, k_policy, mesh=mesh, params=jax.tree.map(jnp.copy, params))
    ref = params if mesh is None else shard_params(params, param_shardings(model, mesh))
    critic = None
    if critic_model is not None:
        critic = create_state(critic_model, critic_optimizer or opt_cfg, k_critic, mesh=critic_model.mesh,
                              params=jax.tree.map(jnp.copy, critic_params))
    return RLState(step=jnp.int32(0), policy=policy, ref_params=ref, reward_ema=jnp.float32(0.0), rng=k_rl,
                   critic=critic, kl_control=None if kl_controller is None else kl_controller.init(),
                   reward_norm=None if reward_normaliser is None else reward_normaliser.init())


def _informative_groups(rewards: np.ndarray, n: int) -> np.ndarray:
    """[R] rewards, n per group (contiguous rows) -> [R / n] bool: the group's rewards are not all equal."""
    ids = jnp.arange(len(rewards), dtype=jnp.int32) // n
    return np.asarray(group_range(jnp.asarray(rewards), ids))[::n] > 0


@dataclass
class Collected:
    """What the actor side of an iteration hands to the learner: the rollout (after
    dynamic-sampling refills), its rewards, all sampled rewards / correctness (for
    metrics), SCST's greedy rewards, the raw rollouts, prompts cut, refill rounds and
    seconds per stage so far."""

    rollout: Any
    rewards: np.ndarray
    all_rewards: np.ndarray
    all_correct: np.ndarray | None
    greedy: np.ndarray | None
    sampled: list
    cut: int
    rounds: int
    times: dict


class RLIteration(NamedTuple):
    """`iteration(state, tokens, mask, key=None, refill=None, **metadata) -> (state, metrics)`,
    made of its two halves: collect(params, tokens, mask, key, refill=None, **metadata)
    -> Collected (sampling, scoring) and learn(state, collected, key, lag=0) -> (state,
    metrics) (reference and value forwards, prepare, updates). Asynchronous actors call
    collect with a snapshot of the params and the learner calls learn."""

    collect: Callable
    learn: Callable

    def __call__(self, state: RLState, prompt_tokens, prompt_mask, key=None, refill=None, **metadata):
        """key: defaults to fold_in(state.rng, state.step), so a resumed run samples the same."""
        key = jax.random.fold_in(state.rng, state.step) if key is None else key
        collected = self.collect(state.policy.params, prompt_tokens, prompt_mask, key, refill=refill, **metadata)
        return self.learn(state, collected, key)


def make_rl_iteration(model, cfg: RLConfig, reward_fn: Callable, decode: Callable,
                      accuracy_fn: Callable | None = None, critic_model=None,
                      decode_prompts: Callable | None = None) -> RLIteration:
    """Build `iteration(state, prompt_tokens, prompt_mask, key=None, refill=None, **metadata) -> (state, metrics)`
    (an `RLIteration`: its `collect` and `learn` halves are also usable apart).

    decode(ids [R, T]) -> list[str] turns token ids into the text the reward sees.
    accuracy_fn: optional, same protocol as reward_fn, 1 for a correct sample; its
    mean is reported as `accuracy`. metadata: per-prompt lists (repeated for the n
    samples of each prompt). refill(k) -> (tokens, mask, metadata), k = 1, 2, ...:
    more prompts for dynamic sampling (cfg.max_refills). critic_model: the model of a
    separate critic (RLState.critic); without it, actor-critic methods use the
    policy's own value head. decode_prompts(ids [B, P]) -> list[str]: the prompts' text
    the reward sees (default `decode`); a chat-templated prompt holds stop tokens (Qwen's
    <|im_end|> closes every turn), which a decode that stops at eos would cut at, so pass
    one that does not, e.g. `functools.partial(tok.decode_batch, stop_at_eos=False)`.

    Metrics: reward mean/std, accuracy, KL to the reference of the sampled tokens
    (kl_k1, kl_k3; token mean), entropy, clip fraction (clipped losses), completion
    length, truncated fraction, kept fraction, tokens/s of sampling and training,
    and seconds spent in sampling / scoring / reference log-probs / updates.
    """
    algo = get_algorithm(cfg.algorithm)
    acfg = cfg.loss if cfg.loss is not None else algo.config
    check_group_size(algo, cfg.sampling.n)
    mesh = model.mesh  # with a mesh, sampling, reference log-probs and updates all run sharded
    if algo.make_update is not None:
        if critic_model is None:
            raise ValueError(f"{algo.name} fits a separate critic: pass critic_model= (and create the state with "
                             "critic_model, critic_params)")
        step = algo.make_update(model, acfg)
    else:
        step = make_train_step(functools.partial(algo.loss, model=model, cfg=acfg), cfg.optimizer,
                               model=model if mesh is not None else None, mesh=mesh)
    critic_step = None
    if critic_model is not None:
        critic_step = make_train_step(functools.partial(value_loss, model=critic_model, cfg=acfg),
                                      cfg.critic_optimizer or cfg.optimizer,
                                      model=critic_model if critic_model.mesh is not None else None,
                                      mesh=critic_model.mesh)
    ref_lp = jax.jit(functools.partial(token_logprobs, model=model))
    if algo.uses_values and critic_model is None and "value" not in model.config.heads:
        raise ValueError(f"{algo.name} needs a value head: build the model and params with "
                         "rljax.losses.actor_critic.with_value_head(model, params), or pass a separate critic_model")
    values_fn = jax.jit(functools.partial(token_values, model=critic_model or model))

    @jax.jit
    def policy_kl(params, batch):
        lp = token_logprobs(params, batch.tokens, batch.attention_mask, model=model)
        return approx_kl(lp, batch.old_logprobs, target_mask(batch.loss_mask, batch.attention_mask))
    controller = cfg.kl_controller
    needs_ref = getattr(acfg, "kl_coef", 0.0) > 0 or controller is not None
    greedy_cfg = cfg.sampling.replace(greedy=True, n=1)
    dynamic = getattr(acfg, "drop_equal_groups", False)
    room = model.config.max_seq_len - cfg.sampling.max_new_tokens
    n = cfg.sampling.n
    decode_prompts = decode if decode_prompts is None else decode_prompts

    def fit(tokens, mask):
        """Truncate (or reject, naming the row) prompts longer than the cache allows."""
        if not cfg.truncate_prompts:
            return tokens, mask, 0
        return truncate_prompts(tokens, mask, room, pad_id=cfg.sampling.pad_id)

    def scored(fn, rollout, prompt_text, metadata, k):
        completions = decode(np.asarray(rollout.completions))
        meta = {key: [v for v in vals for _ in range(k)] for key, vals in metadata.items()}
        prompts = [p for p in prompt_text for _ in range(k)]
        return score(fn, prompts, completions, **meta)

    def rollout_of(params, tokens, mask, metadata, key, times):
        t0 = time.perf_counter()
        rollout = jax.block_until_ready(sample(params, tokens, mask, key, model=model, cfg=cfg.sampling))
        t1 = time.perf_counter()
        prompt_text = decode_prompts(np.asarray(rollout.tokens[::n, :rollout.prompt_length]))
        rewards = scored(reward_fn, rollout, prompt_text, metadata, n)
        correct = scored(accuracy_fn, rollout, prompt_text, metadata, n) if accuracy_fn else None
        times["sample"] += t1 - t0
        times["score"] += time.perf_counter() - t1
        return rollout, rewards, correct, prompt_text

    def collect(params, prompt_tokens, prompt_mask, key, refill=None, **metadata) -> Collected:
        """Sample (with refills), score and, for SCST, decode greedily with `params`."""
        k_sample, k_greedy, _ = jax.random.split(key, 3)
        times = dict(sample=0.0, score=0.0, ref=0.0, values=0.0, update=0.0)
        prompt_tokens, prompt_mask, cut = fit(prompt_tokens, prompt_mask)
        rollout, rewards, correct, prompt_text = rollout_of(params, prompt_tokens, prompt_mask, metadata,
                                                            k_sample, times)
        sampled = [(rollout, rewards, correct)]
        G = rollout.tokens.shape[0] // n
        informative, rounds = int(_informative_groups(rewards, n).sum()), 0
        while dynamic and refill is not None and informative < G and rounds < cfg.max_refills:
            rounds += 1
            tokens, mask, meta = refill(rounds)
            tokens, mask, more_cut = fit(tokens, mask)
            cut += more_cut
            r, rw, c, _ = rollout_of(params, tokens, mask, meta, jax.random.fold_in(k_sample, rounds), times)
            sampled.append((r, rw, c))
            informative += int(_informative_groups(rw, n).sum())
        all_rewards = np.concatenate([s[1] for s in sampled])
        all_correct = np.concatenate([s[2] for s in sampled]) if accuracy_fn else None
        if rounds:  # the first G groups with unequal rewards, topped up with equal ones (then dropped)
            rollout = concat_rollouts([s[0] for s in sampled], pad_id=cfg.sampling.pad_id)
            good = _informative_groups(all_rewards, n)
            groups = np.concatenate([np.flatnonzero(good), np.flatnonzero(~good)])[:G]
            rows = (groups[:, None] * n + np.arange(n)).ravel()
            rollout = jax.tree.map(lambda x: x[rows], rollout)
            rollout = rollout.replace(group_ids=jnp.arange(G * n, dtype=jnp.int32) // n)
            rewards = all_rewards[rows]

        greedy = None
        if getattr(acfg, "baseline", None) == "greedy":  # SCST: the greedy decode's reward is the baseline
            t0 = time.perf_counter()
            g = sample(params, prompt_tokens, prompt_mask, k_greedy, model=model, cfg=greedy_cfg)
            times["sample"] += time.perf_counter() - t0
            greedy = np.repeat(scored(reward_fn, g, prompt_text, metadata, 1), n)
        return Collected(rollout, rewards, all_rewards, all_correct, greedy, sampled, cut, rounds, times)

    def learn(state: RLState, c: Collected, key, lag: int = 0):
        """Prepare and update on collected samples. lag: updates the learner has made since
        the params that sampled them (asynchronous actors); > 0 turns on the clipped
        importance weights of losses that have them (a2c's is_clip)."""
        _, _, k_perm = jax.random.split(key, 3)
        rollout, rewards, times, params = c.rollout, c.rewards, dict(c.times), state.policy.params
        if critic_model is not None and state.critic is None:
            raise ValueError("a critic_model was given but the RLState has no critic: create_rl_state(..., "
                             "critic_model=, critic_params=)")
        ref = None
        if needs_ref or cfg.track_kl:
            t0 = time.perf_counter()
            ref = jax.block_until_ready(ref_lp(state.ref_params, rollout.tokens, rollout.attention_mask))
            times["ref"] = time.perf_counter() - t0
        values = None
        if algo.uses_values:
            t0 = time.perf_counter()
            critic_params = params if critic_model is None else state.critic.params
            values = jax.block_until_ready(values_fn(critic_params, rollout.tokens, rollout.attention_mask))
            times["values"] = time.perf_counter() - t0
        reward_norm = state.reward_norm
        if cfg.reward_normaliser is not None:
            if reward_norm is None:
                raise ValueError("RLConfig.reward_normaliser is set but the RLState has no reward_norm: "
                                 "create_rl_state(..., reward_normaliser=cfg.reward_normaliser)")
            rewards, reward_norm = cfg.reward_normaliser.update(reward_norm, rewards)
            rewards = np.asarray(rewards)
        extra = {} if state.kl_control is None else {"kl_coef": state.kl_control.beta}
        # The moving-average baseline of iteration 0 is the batch mean: no past rewards yet.
        ema = state.reward_ema if int(state.step) > 0 else jnp.float32(np.mean(rewards))
        batch, keep = algo.prepare(rollout, rewards, acfg, ref_logprobs=ref if needs_ref else None,
                                   greedy_rewards=c.greedy, ema=ema, values=values, **extra)
        if lag:
            batch = batch.replace(lag=jnp.full((rollout.tokens.shape[0],), lag, jnp.int32))
        batch = batch.replace(loss_mask=batch.loss_mask * jnp.asarray(keep, batch.loss_mask.dtype)[:, None])

        R = rollout.tokens.shape[0]
        if R % cfg.minibatches:
            raise ValueError(f"{R} sampled rows do not split into RLConfig.minibatches={cfg.minibatches}")
        size = R // cfg.minibatches

        def minibatches(epochs, seed, mesh):
            """epochs x minibatches row subsets of `batch`, each epoch a fresh permutation."""
            for epoch in range(epochs):
                order = np.asarray(jax.random.permutation(jax.random.fold_in(k_perm, seed + epoch), R))
                for j in range(cfg.minibatches):
                    rows = order[j * size:(j + 1) * size] if cfg.minibatches > 1 else np.arange(R)
                    minibatch = jax.tree.map(lambda x: x[rows], batch)
                    yield minibatch if mesh is None else shard_batch(minibatch, mesh)

        t0 = time.perf_counter()
        policy, metrics, updates = state.policy, {}, 0
        for minibatch in minibatches(cfg.epochs, 0, mesh):
            # PPO's early stop, measured before the update (the first one, at π_old, always runs)
            if updates and cfg.target_kl is not None and \
                    float(policy_kl(policy.params, minibatch)) > 1.5 * cfg.target_kl:
                break
            policy, metrics = step(policy, minibatch)
            updates += 1
        critic = state.critic
        if critic_step is not None:  # the separate critic regresses on the returns
            for minibatch in minibatches(cfg.critic_epochs, 1000, critic_model.mesh):
                critic, critic_metrics = critic_step(critic, minibatch)
            metrics = dict(metrics, **{f"critic_{k}": v for k, v in critic_metrics.items()})
        metrics = jax.device_get(metrics)
        times["update"] = time.perf_counter() - t0
        lengths = np.asarray(rollout.lengths)
        out = {k: float(v) for k, v in metrics.items()}
        out.update({
            "reward_mean": float(np.mean(c.all_rewards)), "reward_std": float(np.std(c.all_rewards)),
            "completion_length": float(lengths.mean()),
            "tokens": float(np.asarray(rollout.attention_mask).sum()),
            "truncated_fraction": float(np.mean(~np.asarray(rollout.stopped_at_eos))),
            "kept_fraction": float(np.mean(np.asarray(keep))),
            "sample_tokens_per_s": float(sum(int(np.asarray(s[0].lengths).sum()) for s in c.sampled)
                                         / max(times["sample"], 1e-9)),
            "train_tokens_per_s": float(cfg.epochs * np.asarray(rollout.attention_mask).sum()
                                        / max(times["update"], 1e-9)),
            **{f"time_{k}_s": v for k, v in times.items()},
        })
        if accuracy_fn:
            out["accuracy"] = float(np.mean(c.all_correct))
        if cfg.truncate_prompts:
            out["truncated_prompts"] = float(c.cut)
        if dynamic:
            out["refill_rounds"] = float(c.rounds)
        if lag:
            out["staleness"] = float(lag)
        if cfg.target_kl is not None:
            out["updates"] = float(updates)
        if ref is not None:  # KL(π_old ‖ π_ref) over the sampled completion tokens
            mask = target_mask(rollout.loss_mask, rollout.attention_mask)
            out.update({k: float(v) for k, v in kl_metrics(rollout.logprobs, ref, mask).items()})
        new_ema = cfg.ema_decay * ema + (1 - cfg.ema_decay) * float(np.mean(rewards))
        kl_control = state.kl_control
        if kl_control is not None:  # observed KL per sequence: Σ_t k1 over the completion, mean over rows
            mask = target_mask(rollout.loss_mask, rollout.attention_mask)
            seq_kl = float(jnp.mean(jnp.sum((rollout.logprobs - ref) * mask, axis=1)))
            out["kl_coef"], out["kl_per_sequence"] = float(kl_control.beta), seq_kl
            kl_control = controller.update(kl_control, seq_kl, R)
        return state.replace(step=state.step + 1, policy=policy, reward_ema=jnp.float32(new_ema),
                             kl_control=kl_control, critic=critic, reward_norm=reward_norm), out

    return RLIteration(collect, learn)
