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
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rljax.algorithms import check_group_size, get_algorithm
from rljax.models.logprobs import token_logprobs
from rljax.rewards.rules import score
from rljax.sampling import SampleConfig, sample
from rljax.state import OptimizerConfig, TrainState, create_state, make_train_step


@struct.dataclass
class RLState:
    """step: RL iterations done (the prompt data position); policy: the trained
    TrainState; ref_params: the frozen reference (start of the phase); reward_ema:
    running mean of rewards (moving-average baseline); rng: key for sampling."""

    step: jax.Array
    policy: TrainState
    ref_params: Any
    reward_ema: jax.Array
    rng: jax.Array


@dataclass(frozen=True)
class RLConfig:
    algorithm: str = "grpo"
    loss: Any = None  # the algorithm's config; None = the registry default
    sampling: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=32, n=4))
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, schedule="constant"))
    epochs: int = 1
    minibatches: int = 1
    ema_decay: float = 0.9

    def __post_init__(self):
        get_algorithm(self.algorithm)
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError(f"RLConfig: epochs and minibatches must be >= 1, got {self.epochs}, {self.minibatches}")


def create_rl_state(model, params, opt_cfg: OptimizerConfig, key) -> RLState:
    """The policy starts from `params`; the reference is a frozen copy of them."""
    k_policy, k_rl = jax.random.split(key)
    policy = create_state(model, opt_cfg, k_policy, params=params)
    return RLState(step=jnp.int32(0), policy=policy, ref_params=jax.tree.map(jnp.copy, params),
                   reward_ema=jnp.float32(0.0), rng=k_rl)


def make_rl_iteration(model, cfg: RLConfig, reward_fn: Callable, decode: Callable) -> Callable:
    """Build `iteration(state, prompt_tokens, prompt_mask, key, **metadata) -> (state, metrics)`.

    decode(ids [R, T]) -> list[str] turns token ids into the text the reward sees.
    metadata: per-prompt lists (repeated for the n samples of each prompt).
    """
    algo = get_algorithm(cfg.algorithm)
    acfg = cfg.loss if cfg.loss is not None else algo.config
    check_group_size(algo, cfg.sampling.n)
    step = make_train_step(functools.partial(algo.loss, model=model, cfg=acfg), cfg.optimizer)
    ref_lp = jax.jit(functools.partial(token_logprobs, model=model))
    needs_ref = getattr(acfg, "kl_coef", 0.0) > 0
    greedy_cfg = cfg.sampling.replace(greedy=True, n=1)

    def rewards_of(rollout, prompt_text, metadata, n):
        completions = decode(np.asarray(rollout.completions))
        meta = {k: [v for v in vals for _ in range(n)] for k, vals in metadata.items()}
        prompts = [p for p in prompt_text for _ in range(n)]
        return score(reward_fn, prompts, completions, **meta), completions

    def iteration(state: RLState, prompt_tokens, prompt_mask, key=None, **metadata):
        """key: defaults to fold_in(state.rng, state.step), so a resumed run samples the same."""
        key = jax.random.fold_in(state.rng, state.step) if key is None else key
        k_sample, k_greedy, k_perm = jax.random.split(key, 3)
        n = cfg.sampling.n
        t0 = time.perf_counter()
        rollout = jax.block_until_ready(sample(state.policy.params, prompt_tokens, prompt_mask, k_sample,
                                               model=model, cfg=cfg.sampling))
        t_sample = time.perf_counter() - t0
        P = rollout.prompt_length
        prompt_text = decode(np.asarray(rollout.tokens[::n, :P]))
        rewards, _ = rewards_of(rollout, prompt_text, metadata, n)
        greedy = None
        if getattr(acfg, "baseline", None) == "greedy":  # SCST: the greedy decode's reward is the baseline
            g = sample(state.policy.params, prompt_tokens, prompt_mask, k_greedy, model=model, cfg=greedy_cfg)
            greedy = np.repeat(rewards_of(g, prompt_text, metadata, 1)[0], n)
        ref = ref_lp(state.ref_params, rollout.tokens, rollout.attention_mask) if needs_ref else None
        batch, keep = algo.prepare(rollout, rewards, acfg, ref_logprobs=ref, greedy_rewards=greedy,
                                   ema=state.reward_ema)
        batch = batch.replace(loss_mask=batch.loss_mask * jnp.asarray(keep, batch.loss_mask.dtype)[:, None])

        R = rollout.tokens.shape[0]
        if R % cfg.minibatches:
            raise ValueError(f"{R} sampled rows do not split into {cfg.minibatches} minibatches")
        size = R // cfg.minibatches
        t0 = time.perf_counter()
        policy, metrics = state.policy, {}
        for epoch in range(cfg.epochs):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(k_perm, epoch), R))
            for j in range(cfg.minibatches):
                rows = order[j * size:(j + 1) * size] if cfg.minibatches > 1 else np.arange(R)
                policy, metrics = step(policy, jax.tree.map(lambda x: x[rows], batch))
        metrics = jax.device_get(metrics)
        t_train = time.perf_counter() - t0
        ema = cfg.ema_decay * state.reward_ema + (1 - cfg.ema_decay) * float(np.mean(rewards))
        lengths = np.asarray(rollout.lengths)
        out = {
            "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
            "completion_length": float(lengths.mean()),
            "truncated_fraction": float(np.mean(~np.asarray(rollout.stopped_at_eos))),
            "kept_fraction": float(np.mean(np.asarray(keep))),
            "sample_tokens_per_s": float(lengths.sum() / max(t_sample, 1e-9)),
            "train_tokens_per_s": float(cfg.epochs * np.asarray(rollout.attention_mask).sum() / max(t_train, 1e-9)),
            **{k: float(v) for k, v in metrics.items()},
        }
        return state.replace(step=state.step + 1, policy=policy, reward_ema=jnp.float32(ema)), out

    return iteration
