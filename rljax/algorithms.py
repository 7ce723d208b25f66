"""The algorithm registry: name -> Algorithm(name, Config, prepare, loss).

An algorithm is data, not a class: `prepare` turns a sampled `Rollout` and its
rewards into a `PolicyBatch` (advantages, old and reference log-probabilities),
`loss` is the pure loss. Variants are configs with other defaults.

    algo = ALGORITHMS["grpo"]
    batch, keep = algo.prepare(rollout, rewards, algo.config, ref_logprobs=ref)
    loss, metrics = algo.loss(params, batch, model=model, cfg=algo.config)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax.numpy as jnp

from rljax.losses.actor_critic import A2CConfig, PPOConfig, a2c_loss, actor_critic_targets, ppo_loss
from rljax.losses.grpo import GRPOConfig, grpo_advantages, grpo_loss
from rljax.losses.trpo import TRPOConfig, make_trpo_objectives, make_trpo_step
from rljax.losses.policy_gradient import (MRTConfig, PolicyBatch, ReinforceConfig, kl_shaped_rewards, mrt_loss,
                                          reinforce_advantages, reinforce_loss)
from rljax.models.logprobs import target_mask


@dataclass(frozen=True)
class Algorithm:
    name: str
    config: Any  # the default config (a frozen dataclass); replace fields for a run
    prepare: Callable
    loss: Callable
    group_based: bool  # needs n >= 2 samples per prompt
    uses_values: bool = False  # actor-critic: prepare needs the value head's V_old
    # make_update(model, cfg) -> step(TrainState, batch) replacing the gradient step (TRPO); None: optimizer step
    make_update: Callable | None = None

    def with_config(self, **changes) -> "Algorithm":
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))


def _batch(rollout, rewards, advantages, ref_logprobs):
    return PolicyBatch(tokens=rollout.tokens, attention_mask=rollout.attention_mask, loss_mask=rollout.loss_mask,
                       old_logprobs=rollout.logprobs, advantages=advantages,
                       rewards=jnp.asarray(rewards, jnp.float32), group_ids=rollout.group_ids,
                       ref_logprobs=ref_logprobs)


def prepare_reinforce(rollout, rewards, cfg: ReinforceConfig, *, ref_logprobs=None, greedy_rewards=None, ema=None,
                      **_):
    """-> (PolicyBatch, keep [R] bool). rewards [R] per sampled row."""
    if cfg.kl_in_reward and cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_in_reward needs ref_logprobs")
        mask = target_mask(rollout.loss_mask, rollout.attention_mask)
        rewards = kl_shaped_rewards(rewards, rollout.logprobs, ref_logprobs, mask, cfg.kl_coef)
    adv = reinforce_advantages(rewards, rollout.group_ids, cfg, greedy_rewards=greedy_rewards, ema=ema)
    return _batch(rollout, rewards, adv, ref_logprobs), jnp.ones(adv.shape, bool)


def prepare_mrt(rollout, rewards, cfg: MRTConfig, *, ref_logprobs=None, **_):
    r = jnp.asarray(rewards, jnp.float32)
    return _batch(rollout, r, jnp.zeros_like(r), ref_logprobs), jnp.ones(r.shape, bool)


def prepare_grpo(rollout, rewards, cfg: GRPOConfig, *, ref_logprobs=None, **_):
    """keep marks rows of groups whose rewards differ (all rows unless drop_equal_groups)."""
    adv, keep = grpo_advantages(rewards, rollout.group_ids, cfg)
    return _batch(rollout, rewards, adv, ref_logprobs), keep


def prepare_actor_critic(rollout, rewards, cfg, *, ref_logprobs=None, values=None, kl_coef=None, **_):
    """Per-token rewards (−β k1 + the sequence reward on the last token), GAE
    advantages and returns from V_old = `values` [R, T-1]. kl_coef overrides
    cfg.kl_coef (an adaptive controller's current β)."""
    if values is None:
        raise ValueError(f"{type(cfg).__name__}: prepare needs the value head's values of the sampled tokens")
    beta = cfg.kl_coef if kl_coef is None else kl_coef
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"{type(cfg).__name__}: a KL penalty (kl_coef={beta}) needs ref_logprobs")
    mask = target_mask(rollout.loss_mask, rollout.attention_mask)
    adv, returns = actor_critic_targets(rewards, values, rollout.logprobs, ref_logprobs, mask, cfg, kl_coef=beta)
    batch = _batch(rollout, rewards, adv, ref_logprobs).replace(returns=returns, old_values=values)
    return batch, jnp.ones(adv.shape[0], bool)


def trpo_surrogate_loss(params, batch: PolicyBatch, *, model, cfg: TRPOConfig):
    """−L(θ), TRPO's surrogate as a loss (what the trust-region step maximises)."""
    surrogate, _ = make_trpo_objectives(params, batch, model=model, cfg=cfg)
    loss = -surrogate(params)
    return loss, {"surrogate": -loss}


def check_group_size(algorithm: Algorithm, n: int) -> None:
    """Group methods compare the n samples of one prompt: n = 1 gives no signal."""
    if algorithm.group_based and n < 2:
        raise ValueError(f"{algorithm.name} compares the samples of each prompt and needs n >= 2 samples per "
                         f"prompt; got n={n}")


ALGORITHMS: dict[str, Algorithm] = {
    "reinforce": Algorithm("reinforce", ReinforceConfig(baseline="batch_mean"), prepare_reinforce, reinforce_loss,
                           group_based=False),
    "rloo": Algorithm("rloo", ReinforceConfig(baseline="leave_one_out"), prepare_reinforce, reinforce_loss,
                      group_based=True),
    "scst": Algorithm("scst", ReinforceConfig(baseline="greedy"), prepare_reinforce, reinforce_loss,
                      group_based=False),
    "mrt": Algorithm("mrt", MRTConfig(), prepare_mrt, mrt_loss, group_based=True),
    "grpo": Algorithm("grpo", GRPOConfig(), prepare_grpo, grpo_loss, group_based=True),
    # Dr. GRPO: no std scaling, a constant normaliser (set `constant` to the max completion length).
    "dr_grpo": Algorithm("dr_grpo", GRPOConfig(scale_by_std=False, aggregation="constant", constant=1.0,
                                               kl_coef=0.0), prepare_grpo, grpo_loss, group_based=True),
    # DAPO: clip-higher, token-mean, no KL, drop groups with equal rewards (overlong shaping is a reward term).
    "dapo": Algorithm("dapo", GRPOConfig(eps_low=0.2, eps_high=0.28, aggregation="token_mean", kl_coef=0.0,
                                         drop_equal_groups=True), prepare_grpo, grpo_loss, group_based=True),
    "a2c": Algorithm("a2c", A2CConfig(), prepare_actor_critic, a2c_loss, group_based=False, uses_values=True),
    # A3C-style: A2C whose batches come from asynchronous actors (RLConfig.staleness, actors); stale rows get
    # the truncated importance weight min(is_clip, π_θ / π_behaviour).
    "a3c": Algorithm("a3c", A2CConfig(), prepare_actor_critic, a2c_loss, group_based=False, uses_values=True),
    "ppo": Algorithm("ppo", PPOConfig(), prepare_actor_critic, ppo_loss, group_based=False, uses_values=True),
    # TRPO: a natural-gradient step in a KL trust region (no optimizer), a separate critic fitted by regression.
    "trpo": Algorithm("trpo", TRPOConfig(), prepare_actor_critic, trpo_surrogate_loss, group_based=False,
                      uses_values=True, make_update=make_trpo_step),
}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; choose from {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
