"""Per-iteration reward transforms: stateful helpers of the RL iteration as optax-style pairs.

A transform is `RewardTransform(init, update, needs, provides, name)`: `init() -> state` and
`update(signals, state) -> (signals, state)`, where `Signals` carries the iteration's
rewards and what the transforms compute for the advantage estimator (a running baseline,
the KL coefficient). `chain(*transforms)` composes them in order, like `optax.chain`, into
one transform whose state (a tuple) lives in one slot, `RLState.transforms`, so
checkpoints and resumption cover it. The RL iteration knows none of them by name: it fills
`Signals.seq_kl` when a transform needs the reference, runs the chain on the iteration's
rewards, and hands the estimator what the chain provided.

    RLConfig(algorithm="ppo", transforms=(normalise_rewards(), kl_control(adaptive_kl_controller(0.1, 6.0, 10_000))))
    RLConfig(algorithm="reinforce", advantage=BaselineConfig("moving_average"),
             transforms=(moving_average_baseline(0.9),))

Order matters as in optax: a baseline after a normaliser averages normalised rewards, and RLConfig
refuses a baseline placed before a transform that replaces the rewards (it would be on the raw
scale while the estimator subtracts it from the normalised rewards). Like an
optax update, `update` runs traced: the RL iteration compiles the transforms, the advantage
estimator and its KL metrics as one program, so a transform is written in jax.numpy without
Python branches on array values (a branch on whether a field is None is fine: that is static).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from rljax.estimators import Needs
from rljax.losses.kl_control import KLController
from rljax.rewards.learned import RewardNormaliser, running_normaliser


@struct.dataclass
class Signals:
    """rewards [R] float32 (each transform may replace them); seq_kl: the sampled sequences'
    KL to the reference, Σ_t k1 over the completion, mean over rows (set by the iteration
    when a transform needs it); baseline: a running baseline for the estimator; kl_coef: the
    reward's KL coefficient β for the estimator (None: the estimator config's)."""

    rewards: jax.Array
    seq_kl: jax.Array | None = None
    baseline: jax.Array | None = None
    kl_coef: jax.Array | None = None


class RewardTransform(NamedTuple):
    """init() -> state; update(signals, state) -> (signals, state). needs: what the iteration
    must compute for it (e.g. the reference's log-probs for the KL); provides: the Signals
    fields it sets for the estimator, in the order it sets them ("baseline", "kl_coef", or
    "rewards" when it replaces the rewards themselves: RLConfig refuses a transform providing
    "baseline" placed before one providing "rewards", whose baseline would be on the raw scale);
    name: how error messages call it (e.g. "normalise_rewards()")."""

    init: Callable[[], Any]
    update: Callable[[Signals, Any], tuple[Signals, Any]]
    needs: Needs = Needs()
    provides: tuple[str, ...] = ()
    name: str = ""


def chain(*transforms: RewardTransform) -> RewardTransform:
    """Apply `transforms` in order; the state is the tuple of their states, `provides` their
    provides in order."""

    def init():
        return tuple(t.init() for t in transforms)

    def update(signals: Signals, states):
        new = []
        for t, s in zip(transforms, states):
            signals, s = t.update(signals, s)
            new.append(s)
        return signals, tuple(new)

    needs = Needs()
    for t in transforms:
        needs = needs | t.needs
    return RewardTransform(init, update, needs, tuple(p for t in transforms for p in t.provides),
                           f"chain({', '.join(t.name or '?' for t in transforms)})")


class MovingAverageState(NamedTuple):
    mean: jax.Array  # float32: the running mean of past iterations' mean rewards
    count: jax.Array  # int32: iterations seen


def moving_average_baseline(decay: float = 0.9) -> RewardTransform:
    """b_i = m_{i−1}, the running mean of past iterations' mean rewards; the first
    iteration's baseline is its own batch mean (no past yet). Then m_i = decay · b_i +
    (1 − decay) · mean(r_i)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"moving_average_baseline: decay must be in [0, 1), got {decay}")

    def init():
        return MovingAverageState(jnp.float32(0.0), jnp.int32(0))

    def update(signals: Signals, state: MovingAverageState):
        batch_mean = jnp.mean(jnp.asarray(signals.rewards, jnp.float32))
        baseline = jnp.where(state.count > 0, state.mean, batch_mean)
        new = MovingAverageState(decay * baseline + (1 - decay) * batch_mean, state.count + 1)
        return signals.replace(baseline=baseline), new

    return RewardTransform(init, update, provides=("baseline",), name=f"moving_average_baseline({decay:g})")


def normalise_rewards(normaliser: RewardNormaliser | None = None) -> RewardTransform:
    """Standardise every iteration's rewards with running statistics over all rewards so far
    (default `running_normaliser()`), e.g. for a learned reward model whose scale drifts.
    Metrics still report the raw rewards."""
    normaliser = running_normaliser() if normaliser is None else normaliser

    def update(signals: Signals, state):
        rewards, state = normaliser.update(state, signals.rewards)
        return signals.replace(rewards=rewards), state

    return RewardTransform(normaliser.init, update, provides=("rewards",), name="normalise_rewards()")


def kl_control(controller: KLController) -> RewardTransform:
    """The reward's KL coefficient β from a controller (`adaptive_kl_controller`,
    `fixed_kl_controller`): this iteration's estimator uses the current β, then the
    controller sees the sampled sequences' KL (Σ_t k1, mean over rows) for R rows."""

    def update(signals: Signals, state):
        if signals.seq_kl is None:
            raise ValueError("kl_control: Signals.seq_kl is missing (the iteration computes it when a transform "
                             "declares needs.reference)")
        rows = jnp.asarray(signals.rewards).shape[0]
        return signals.replace(kl_coef=state.beta), controller.update(state, signals.seq_kl, rows)

    return RewardTransform(controller.init, update, Needs(reference=True), provides=("kl_coef",), name="kl_control()")
