"""The registries: advantage estimators, policy losses, and name -> Algorithm(estimator, loss).

An algorithm is data, not a class: an advantage estimator (`rljax.estimators`: prepare's
half, rows and rewards -> advantages) paired with a policy loss (`rljax.losses`: a pure
`loss(params, batch, *, model, cfg)`, or its own update rule such as TRPO's). Each half
declares what it needs from the RL iteration (`Needs`: reference log-probs, values or a
separate critic, a greedy decode, a group filter with refill, a running baseline, a frozen
teacher's log-probs); the
iteration reads the declarations and never names a method. A variant (Dr. GRPO, DAPO) is
other configs, never a subclass; `compose` pairs any estimator with any loss that accepts
its output by name.

    algo = get_algorithm("rloo")                      # or compose("baseline", "cispo")
    batch, keep = prepare(algo, PrepareInput(rollout, rewards), algo.estimator.config)
    loss, metrics = algo.loss.loss(params, batch, model=model, cfg=algo.loss.config)

An entry whose half needs more reads it from PrepareInput, and says which field is missing: "grpo"
(kl_coef 0.04) needs ref_logprobs=, "dr_grpo" aggregates by a constant (`RLConfig.algo` fills it with
the sampler's max_new_tokens; called directly, set `constant=` in its loss config). The RL iteration
(`rljax.rl.make_rl_iteration`) provides all of this from `algo.needs`.

Preference methods (`rljax.losses.preference.PREFERENCE_METHODS`) and reward-model
objectives (`rljax.losses.reward_model.REWARD_MODEL_OBJECTIVES`) and OREO
(`rljax.losses.oreo.OREO_METHODS`) are named the same way:
name -> default config, the config's type picks the loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax.numpy as jnp

from rljax.data.batch import PolicyBatch
from rljax.estimators import (BaselineConfig, DistillConfig, Estimate, GAEConfig, GroupAdvantageConfig, Needs,
                              PrepareInput, baseline_estimate, baseline_needs, distill_estimate, distill_needs,
                              gae_estimate, gae_needs, group_estimate, group_needs)
from rljax.losses.actor_critic import A2CConfig, PPOConfig, a2c_loss, ppo_loss
from rljax.losses.grpo import CISPOConfig, GRPOConfig, GSPOConfig, cispo_loss, grpo_loss, gspo_loss
from rljax.losses.policy_gradient import MRTConfig, ReinforceConfig, mrt_loss, reinforce_loss
from rljax.losses.trpo import TRPOConfig, make_trpo_objectives, trpo_update

SEQUENCE, TOKEN = "sequence", "token"  # the shapes of advantages: [R] or [R, T-1]


@dataclass(frozen=True)
class Estimator:
    """name; config: the default config; estimate(PrepareInput, cfg) -> Estimate;
    needs(cfg) -> Needs; output: SEQUENCE ([R] advantages) or TOKEN ([R, T-1]); returns: whether
    its Estimate holds the value targets R_t a value-fitting loss regresses on (GAE's A + V_old).
    The RL iteration runs `estimate` traced (under jax.jit, with the reward transforms), so it
    is written in jax.numpy without Python branches on array values; the config is static."""

    name: str
    config: Any
    estimate: Callable[[PrepareInput, Any], Estimate]
    needs: Callable[[Any], Needs]
    output: str
    returns: bool = False


@dataclass(frozen=True)
class PolicyLoss:
    """name; config: the default config; loss(params, batch, *, model, cfg) -> (scalar,
    metrics); needs(cfg) -> Needs; accepts: the advantage shapes it takes; update: its own
    update rule `update(state, batch, *, model, cfg) -> (state, metrics)` replacing the
    optimizer step (one step on the whole batch per iteration), or None.
    signal: the PolicyBatch field it learns from, "advantages" (the estimator's) or "rewards"
    (MRT's risk: the estimator's KL shaping reaches it, a baseline does not, and is refused).
    corrects_stale: it corrects rows sampled by older params (RLConfig.staleness > 0), by a
    truncated importance weight on batch.lag (a2c) or by weighing every token with the ratio
    π_θ/π_old to the sampler's log-probs (clipped surrogates, CISPO, TRPO); a loss without it
    (reinforce, mrt) would learn from stale rows as if on-policy, and staleness > 0 is refused."""

    name: str
    config: Any
    loss: Callable
    needs: Callable[[Any], Needs]
    accepts: tuple[str, ...]
    update: Callable | None = None
    signal: str = "advantages"
    corrects_stale: bool = False


@dataclass(frozen=True)
class Algorithm:
    """name; estimator and loss (with their default configs); kl_in: where the algorithm's
    KL penalty to the reference lives, "loss" (a loss term, e.g. GRPO's k3) or "reward"
    (shaped into the rewards by the estimator, e.g. PPO's per-token −β k1)."""

    name: str
    estimator: Estimator
    loss: PolicyLoss
    kl_in: str = "loss"

    def configs(self, advantage=None, loss=None) -> tuple[Any, Any]:
        """(estimator config, loss config): the given ones (checked against this algorithm's
        types, naming the field) or the defaults. A loss that learns from the rewards
        (PolicyLoss.signal) refuses an estimator config with a baseline other than "none"."""
        out = []
        for field, given, default in (("advantage", advantage, self.estimator.config),
                                      ("loss", loss, self.loss.config)):
            if given is not None and not isinstance(given, type(default)):
                raise TypeError(f"RLConfig.{field}: {self.name} takes a {type(default).__name__}, got "
                                f"{type(given).__name__}")
            out.append(default if given is None else given)
        baseline = getattr(out[0], "baseline", "none")
        if self.loss.signal == "rewards" and baseline != "none":
            cost = (", yet cost a greedy decode and its reward calls every iteration"
                    if self.estimator.needs(out[0]).greedy else "")
            raise ValueError(f"RLConfig.advantage: {self.name}'s loss ({self.loss.name}) learns from the rewards, not "
                             f"the advantages, so baseline={baseline!r} would change nothing{cost}; use "
                             "BaselineConfig('none') (its kl_coef still shapes the rewards the loss reads)")
        return tuple(out)

    def needs(self, advantage=None, loss=None) -> Needs:
        adv_cfg, loss_cfg = self.configs(advantage, loss)
        return self.estimator.needs(adv_cfg) | self.loss.needs(loss_cfg)

    def with_config(self, *, advantage=None, loss=None, **loss_changes) -> "Algorithm":
        """A copy with other default configs (or loss fields changed)."""
        adv_cfg, loss_cfg = self.configs(advantage, loss)
        if loss_changes:
            fields = [f.name for f in dataclasses.fields(loss_cfg)]
            unknown = sorted(set(loss_changes) - set(fields))
            if unknown:
                raise ValueError(f"{self.name}: its loss {self.loss.name!r} ({type(loss_cfg).__name__}) has no "
                                 f"field(s) {unknown}; its fields: {fields}")
            loss_cfg = dataclasses.replace(loss_cfg, **loss_changes)
        return dataclasses.replace(self, estimator=dataclasses.replace(self.estimator, config=adv_cfg),
                                   loss=dataclasses.replace(self.loss, config=loss_cfg))

    def with_kl_coef(self, beta: float) -> "Algorithm":
        """A copy whose KL penalty to the reference has coefficient β, wherever it lives (kl_in)."""
        where = self.estimator if self.kl_in == "reward" else self.loss
        if not _has_kl_coef(where.config):
            half = "estimator" if self.kl_in == "reward" else "loss"
            raise ValueError(f"{self.name}: no KL penalty to set; its {half} {where.name!r} (kl_in={self.kl_in!r}) "
                             "has no kl_coef")
        if self.kl_in == "reward":
            return self.with_config(advantage=dataclasses.replace(self.estimator.config, kl_coef=beta))
        return self.with_config(kl_coef=beta)


def _has_kl_coef(config) -> bool:
    return any(f.name == "kl_coef" for f in dataclasses.fields(config))


def prepare(algorithm: Algorithm, inp: PrepareInput, advantage_cfg=None) -> tuple[PolicyBatch, jnp.ndarray]:
    """-> (PolicyBatch, keep [R] bool): the estimator's advantages (and returns) with the
    rollout's tokens, masks and the sampler's log-probs; keep False marks rows to drop."""
    if not isinstance(inp, PrepareInput):
        raise TypeError(f"prepare: takes a PrepareInput, got {type(inp).__name__}")
    cfg = algorithm.configs(advantage=advantage_cfg)[0]
    est = algorithm.estimator.estimate(inp, cfg)
    r = inp.rollout
    batch = PolicyBatch(tokens=r.tokens, attention_mask=r.attention_mask, loss_mask=r.loss_mask,
                        old_logprobs=r.logprobs, advantages=est.advantages, rewards=est.rewards,
                        group_ids=r.group_ids, ref_logprobs=inp.ref_logprobs, returns=est.returns,
                        old_values=inp.values if est.returns is not None else None)
    return batch, est.keep


# ----------------------------------------------------------------------------- estimators

ESTIMATORS: dict[str, Estimator] = {
    "group": Estimator("group", GroupAdvantageConfig(), group_estimate, group_needs, SEQUENCE),
    "baseline": Estimator("baseline", BaselineConfig(), baseline_estimate, baseline_needs, SEQUENCE),
    "gae": Estimator("gae", GAEConfig(), gae_estimate, gae_needs, TOKEN, returns=True),
    "distill": Estimator("distill", DistillConfig(), distill_estimate, distill_needs, TOKEN),
}


# ----------------------------------------------------------------------------- policy losses


def _kl_term_needs(cfg) -> Needs:
    return Needs(reference=cfg.kl_coef > 0)


def _actor_critic_needs(cfg) -> Needs:
    return Needs(values=True)


def trpo_surrogate_loss(params, batch: PolicyBatch, *, model, cfg: TRPOConfig):
    """−L(θ), TRPO's surrogate as a loss (what the trust-region step maximises)."""
    surrogate, _ = make_trpo_objectives(params, batch, model=model, cfg=cfg)
    loss = -surrogate(params)
    return loss, {"surrogate": -loss}


def trpo_step(state, batch: PolicyBatch, *, model, cfg: TRPOConfig):
    """TRPO's update rule on a TrainState: a trust-region step on the params (the optimizer
    state is not used); a rejected step (no improvement within the region, or non-finite
    terms) keeps the params. -> (state, metrics with loss = −surrogate gain)."""
    params, metrics = trpo_update(state.params, batch, model=model, cfg=cfg)
    return state.replace(step=state.step + 1, params=params), dict(metrics, loss=-metrics["surrogate_gain"])


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "reinforce": PolicyLoss("reinforce", ReinforceConfig(), reinforce_loss, _kl_term_needs, (SEQUENCE,)),
    "mrt": PolicyLoss("mrt", MRTConfig(), mrt_loss, lambda cfg: _kl_term_needs(cfg) | Needs(groups=True),
                      (SEQUENCE,), signal="rewards"),
    "clip": PolicyLoss("clip", GRPOConfig(), grpo_loss, _kl_term_needs, (SEQUENCE, TOKEN), corrects_stale=True),
    "gspo": PolicyLoss("gspo", GSPOConfig(), gspo_loss, _kl_term_needs, (SEQUENCE,), corrects_stale=True),
    "cispo": PolicyLoss("cispo", CISPOConfig(), cispo_loss, _kl_term_needs, (SEQUENCE, TOKEN), corrects_stale=True),
    "a2c": PolicyLoss("a2c", A2CConfig(), a2c_loss, _actor_critic_needs, (TOKEN,), corrects_stale=True),
    "ppo": PolicyLoss("ppo", PPOConfig(), ppo_loss, _actor_critic_needs, (TOKEN,), corrects_stale=True),
    "trpo": PolicyLoss("trpo", TRPOConfig(), trpo_surrogate_loss, lambda cfg: Needs(values=True, critic=True),
                       (TOKEN,), update=trpo_step, corrects_stale=True),
}


def compose(estimator: str, loss: str, *, name: str | None = None, advantage=None, loss_config=None,
            kl_in: str | None = None) -> Algorithm:
    """Pair the estimator and the policy loss registered under these names (with their
    default configs unless given). The loss must accept the estimator's output shape; a loss
    that fits a value function (a2c, ppo, trpo's critic) needs an estimator that gives returns
    (gae), and an estimator that reads values (gae) needs such a loss, or V would never be
    trained. kl_in (where `with_kl_coef` puts β): None picks the loss when its config has a
    kl_coef, else the estimator ("reward") when its config has one."""
    if kl_in not in (None, "loss", "reward"):
        raise ValueError(f"compose: kl_in must be 'loss' or 'reward', got {kl_in!r}")
    if estimator not in ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {estimator!r}; choose from {sorted(ESTIMATORS)}")
    if loss not in POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {loss!r}; choose from {sorted(POLICY_LOSSES)}")
    est, pl = ESTIMATORS[estimator], POLICY_LOSSES[loss]
    if est.output not in pl.accepts:
        raise ValueError(f"policy loss {loss!r} takes {' or '.join(pl.accepts)}-level advantages; estimator "
                         f"{estimator!r} gives {est.output}-level ones")
    fits_values = pl.needs(pl.config).values
    if fits_values and not est.returns:
        raise ValueError(f"policy loss {loss!r} fits a value function on the estimator's returns; estimator "
                         f"{estimator!r} gives none (pair it with one that does: "
                         f"{sorted(n for n, e in ESTIMATORS.items() if e.returns)})")
    if est.needs(est.config).values and not fits_values:
        raise ValueError(f"estimator {estimator!r} reads V(s) from a value function that only a loss with a value "
                         f"term trains ({sorted(n for n, p in POLICY_LOSSES.items() if p.needs(p.config).values)}); "
                         f"with {loss!r} V would stay at its initial value")
    if kl_in is None:
        kl_in = "reward" if not _has_kl_coef(pl.config) and _has_kl_coef(est.config) else "loss"
    algo = Algorithm(name or f"{estimator}+{loss}", est, pl, kl_in)
    return algo.with_config(advantage=advantage, loss=loss_config)


# A3C is A2C with asynchronous actors: `RLConfig(algorithm="a2c", staleness=1, actors=2)`.
ALGORITHMS: dict[str, Algorithm] = {
    "reinforce": compose("baseline", "reinforce", name="reinforce", advantage=BaselineConfig("batch_mean")),
    "rloo": compose("baseline", "reinforce", name="rloo", advantage=BaselineConfig("leave_one_out")),
    "scst": compose("baseline", "reinforce", name="scst", advantage=BaselineConfig("greedy")),
    "mrt": compose("baseline", "mrt", name="mrt", advantage=BaselineConfig("none")),
    "grpo": compose("group", "clip", name="grpo"),
    # Dr. GRPO: no std scaling, a constant normaliser: constant=None is the max completion length, which
    # RLConfig.algo fills in from sampling.max_new_tokens (a loss called directly needs it set).
    "dr_grpo": compose("group", "clip", name="dr_grpo", advantage=GroupAdvantageConfig(scale_by_std=False),
                       loss_config=GRPOConfig(aggregation="constant", constant=None, kl_coef=0.0)),
    # DAPO: clip-higher, token-mean, no KL, drop groups with equal rewards (overlong shaping is a reward term).
    "dapo": compose("group", "clip", name="dapo", advantage=GroupAdvantageConfig(drop_equal_groups=True),
                    loss_config=GRPOConfig(eps_low=0.2, eps_high=0.28, aggregation="token_mean", kl_coef=0.0)),
    # GSPO: one clipped importance ratio per sequence (the geometric mean of its token ratios).
    "gspo": compose("group", "gspo", name="gspo"),
    # CISPO: a REINFORCE term with a clipped, stop-gradient importance weight (no token's gradient dropped).
    "cispo": compose("group", "cispo", name="cispo"),
    # A2C: Monte-Carlo returns minus V (λ = 1), no KL, no whitening.
    "a2c": compose("gae", "a2c", name="a2c", advantage=GAEConfig(lam=1.0, kl_coef=0.0, whiten_advantages=False),
                   kl_in="reward"),
    # PPO (RLHF): GAE(γ = 1, λ = 0.95) with a per-token KL in the reward, clipped surrogate + clipped value loss.
    # Epochs over each batch are the RL loop's, not the registry's (an entry has no place for them):
    # RLConfig(algorithm="ppo", epochs=4) is the paper's setting; RLConfig.epochs defaults to 1.
    "ppo": compose("gae", "ppo", name="ppo", kl_in="reward"),
    # TRPO: a natural-gradient step in a KL trust region (no optimizer), a separate critic fitted by regression.
    "trpo": compose("gae", "trpo", name="trpo", advantage=GAEConfig(kl_coef=0.0), kl_in="reward"),
    # On-policy distillation: per-token advantage λ(log π_teacher − log π_student) of the student's own samples
    # (the reverse KL to a frozen teacher, RLState.teacher_params), optimised with the clipped surrogate (ρ = 1 on
    # the first minibatch: a per-token REINFORCE step; Tinker's "ppo" loss), token mean, no reference KL.
    "on_policy_distill": compose("distill", "clip", name="on_policy_distill",
                                 loss_config=GRPOConfig(kl_coef=0.0, aggregation="token_mean")),
}


def get_algorithm(name: "str | Algorithm") -> Algorithm:
    if isinstance(name, Algorithm):
        return name
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; choose from {sorted(ALGORITHMS)}, or pair an estimator "
                       f"{sorted(ESTIMATORS)} with a policy loss {sorted(POLICY_LOSSES)} by compose(estimator, loss)")
    return ALGORITHMS[name]


def check_staleness(algorithm: Algorithm, staleness: int) -> None:
    """Rows sampled `staleness` > 0 updates ago (asynchronous actors) need a loss that corrects
    them (`PolicyLoss.corrects_stale`); otherwise a ValueError naming the algorithm and the
    registry's entries whose loss does."""
    if staleness > 0 and not algorithm.loss.corrects_stale:
        ok = [n for n, a in ALGORITHMS.items() if a.loss.corrects_stale]
        raise ValueError(f"RLConfig.staleness={staleness}: {algorithm.name}'s loss ({algorithm.loss.name}) reads "
                         "neither the rows' lag nor the ratio to the sampler's log-probs, so rows sampled by older "
                         "params would be learned from as if on-policy, with no importance correction; use "
                         f"staleness=0, or an algorithm whose loss corrects stale rows: {', '.join(ok)}")


def check_group_size(algorithm: Algorithm, n: int, advantage=None, loss=None) -> None:
    """Group methods compare the n samples of one prompt: n = 1 gives no signal."""
    if algorithm.needs(advantage, loss).groups and n < 2:
        raise ValueError(f"{algorithm.name} compares the samples of each prompt and needs n >= 2 samples per "
                         f"prompt; got n={n}")
