"""KL coefficient controllers for RLHF-style penalties, as optax-style (init, update) pairs.

The controller's state is a small pytree that lives in the RL state, so it is
checkpointed and resumed with everything else.

    ctl = adaptive_kl_controller(init_beta=0.1, target=6.0, horizon=10_000)
    kl_state = ctl.init()
    kl_state = ctl.update(kl_state, observed_kl, n_steps)   # after each iteration
    beta = kl_state.beta
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KLControllerState:
    beta: jax.Array  # float32 scalar: the current KL coefficient


class KLController(NamedTuple):
    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, jax.Array, int], KLControllerState]


def fixed_kl_controller(beta: float) -> KLController:
    """β stays at `beta`."""
    if beta < 0:
        raise ValueError(f"fixed_kl_controller: beta must be >= 0, got {beta}")
    return KLController(init=lambda: KLControllerState(beta=jnp.float32(beta)),
                        update=lambda state, kl, n_steps: state)


def adaptive_kl_controller(init_beta: float, target: float, horizon: int, *, clip: float = 0.2) -> KLController:
    """Ziegler et al. (2019): e = clip(KL / target − 1, −clip, clip);
    β ← β · (1 + e · n_steps / horizon). KL above the target raises β, below lowers it.

    kl: the observed KL of the iteration (per sequence, in the units of `target`);
    n_steps: sequences (or steps) the observation covers.
    """
    if init_beta <= 0 or target <= 0 or horizon <= 0 or clip <= 0:
        raise ValueError(f"adaptive_kl_controller: init_beta, target, horizon and clip must be positive, got "
                         f"{init_beta}, {target}, {horizon}, {clip}")

    def update(state: KLControllerState, kl, n_steps) -> KLControllerState:
        error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -clip, clip)
        return KLControllerState(beta=state.beta * (1.0 + error * n_steps / horizon))

    return KLController(init=lambda: KLControllerState(beta=jnp.float32(init_beta)), update=update)
