"""RLConfig refuses settings that the iteration would silently ignore or get wrong: a running
baseline placed before a transform that rescales the rewards, asynchronous actors (staleness > 0)
with a loss that does not correct stale rows, and a baseline for MRT, whose loss reads the
rewards; and the moving-average baseline's documented behaviour with a KL in the reward."""
import re

import jax.numpy as jnp
import numpy as np
import pytest

from rljax.algorithms import compose, get_algorithm, prepare
from rljax.data.batch import Rollout
from rljax.estimators import BaselineConfig, PrepareInput, baseline_estimate
from rljax.losses.kl_control import fixed_kl_controller
from rljax.rl import RLConfig
from rljax.transforms import Signals, chain, kl_control, moving_average_baseline, normalise_rewards

MA = BaselineConfig("moving_average")


def _order_message(first: str, second: str) -> str:
    return re.escape(f"RLConfig.transforms: {first} computes a running baseline from the raw rewards, and {second} "
                     "then replaces the rewards (e.g. normalises them): the estimator would subtract a raw-scale "
                     "baseline from rescaled rewards. Put the baseline after the transform that replaces the rewards")


def test_a_baseline_before_a_reward_normaliser_is_refused_naming_both():
    with pytest.raises(ValueError, match=_order_message("transforms[0] (moving_average_baseline(0.9))",
                                                        "transforms[1] (normalise_rewards())")):
        RLConfig(algorithm="reinforce", advantage=MA, transforms=(moving_average_baseline(0.9), normalise_rewards()))
    # positions are those in RLConfig.transforms, with a transform between them
    with pytest.raises(ValueError, match=_order_message("transforms[0] (moving_average_baseline(0.5))",
                                                        "transforms[2] (normalise_rewards())")):
        RLConfig(algorithm="reinforce", advantage=MA,
                 transforms=(moving_average_baseline(0.5), kl_control(fixed_kl_controller(0.1)), normalise_rewards()))
    # a chain given as one transform is walked in its own order
    with pytest.raises(ValueError, match=_order_message(
            "transforms[0] (chain(moving_average_baseline(0.9), normalise_rewards()))",
            "transforms[0] (chain(moving_average_baseline(0.9), normalise_rewards()))")):
        RLConfig(algorithm="reinforce", advantage=MA, transforms=(chain(moving_average_baseline(0.9),
                                                                        normalise_rewards()),))


def test_a_baseline_after_the_normaliser_centres_the_normalised_rewards():
    """The accepted order: rewards 10..13 are normalised by their own mean 11.5 and population std
    sqrt(1.25) (the first batch), and the first baseline is the normalised batch's mean, 0."""
    transforms = (normalise_rewards(), moving_average_baseline(0.9))
    RLConfig(algorithm="reinforce", advantage=MA, transforms=transforms)
    t = chain(*transforms)
    signals, _ = t.update(Signals(rewards=jnp.array([10.0, 11.0, 12.0, 13.0])), t.init())
    expected = (np.array([10.0, 11.0, 12.0, 13.0]) - 11.5) / np.sqrt(1.25)  # [-1.342, -0.447, 0.447, 1.342]
    np.testing.assert_allclose(np.asarray(signals.rewards - signals.baseline), expected, atol=1e-5)


def _stale_message(name: str, loss: str) -> str:
    return re.escape(f"RLConfig.staleness=2: {name}'s loss ({loss}) reads neither the rows' lag nor the ratio to the "
                     "sampler's log-probs, so rows sampled by older params would be learned from as if on-policy, "
                     "with no importance correction; use staleness=0, or an algorithm whose loss corrects stale "
                     "rows: grpo, dr_grpo, dapo, gspo, cispo, a2c, ppo, trpo, on_policy_distill")


@pytest.mark.parametrize("name,loss", [("reinforce", "reinforce"), ("rloo", "reinforce"), ("scst", "reinforce"),
                                       ("mrt", "mrt")])
def test_staleness_is_refused_for_losses_that_ignore_stale_rows(name, loss):
    with pytest.raises(ValueError, match=_stale_message(name, loss)):
        RLConfig(algorithm=name, staleness=2)
    RLConfig(algorithm=name, staleness=0)


def test_staleness_follows_the_loss_declaration():
    """A3C (a2c's truncated weight on batch.lag) and the losses with a ratio to the sampler's
    log-probs take stale rows; a composed algorithm follows its loss."""
    for name in ("a2c", "ppo", "trpo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "on_policy_distill"):
        assert RLConfig(algorithm=name, staleness=2).staleness == 2
    RLConfig(algorithm=compose("baseline", "clip"), staleness=2)
    with pytest.raises(ValueError, match=_stale_message("group+reinforce", "reinforce")):
        RLConfig(algorithm=compose("group", "reinforce"), staleness=2)


def _mrt_message(baseline: str, cost: str = "", name: str = "mrt") -> str:
    return re.escape(f"RLConfig.advantage: {name}'s loss (mrt) learns from the rewards, not the advantages, so "
                     f"baseline={baseline!r} would change nothing{cost}; use BaselineConfig('none') (its kl_coef "
                     "still shapes the rewards the loss reads)")


def test_mrt_refuses_a_baseline():
    with pytest.raises(ValueError, match=_mrt_message("greedy", ", yet cost a greedy decode and its reward calls "
                                                                "every iteration")):
        RLConfig(algorithm="mrt", advantage=BaselineConfig("greedy"))
    for b in ("batch_mean", "leave_one_out", "moving_average"):
        with pytest.raises(ValueError, match=_mrt_message(b)):
            RLConfig(algorithm="mrt", advantage=BaselineConfig(b, kl_coef=0.1))
    # composing the pair directly meets the same check (the baseline estimator's default is leave_one_out)
    with pytest.raises(ValueError, match=_mrt_message("leave_one_out", name="baseline+mrt")):
        compose("baseline", "mrt")
    assert not get_algorithm("mrt").needs().greedy


R, T = 4, 4


def _rollout():
    """4 rows, 3 completion tokens each; the sampler's log-probs 0 and the reference's −1 make
    k1 = 1 per token, Σk1 = 3 per row."""
    lm = np.zeros((R, T), np.int32)
    lm[:, 1:] = 1
    old = jnp.zeros((R, T - 1), jnp.float32)
    return Rollout(tokens=jnp.ones((R, T), jnp.int32), attention_mask=jnp.ones((R, T), jnp.int32),
                   loss_mask=jnp.asarray(lm), logprobs=old, sampling_logprobs=old, lengths=jnp.full(R, 3),
                   stopped_at_eos=jnp.ones(R, bool), group_ids=jnp.zeros(R, jnp.int32), prompt_length=1)


def test_mrt_still_gets_the_kl_through_the_rewards():
    """BaselineConfig('none', kl_coef=β) is accepted and the batch's rewards (what MRT's risk reads)
    are r − βΣk1 = 1 − 0.5·3 = −0.5."""
    cfg = BaselineConfig("none", kl_coef=0.5)
    assert RLConfig(algorithm="mrt", advantage=cfg).algo.needs().reference
    batch, _ = prepare(get_algorithm("mrt"), PrepareInput(_rollout(), jnp.ones(R), ref_logprobs=jnp.full(
        (R, T - 1), -1.0)), cfg)
    np.testing.assert_allclose(np.asarray(batch.rewards), [-0.5] * R, atol=1e-6)


def test_a_moving_average_baseline_is_not_kl_shaped():
    """As BaselineConfig documents: the moving average averages the rewards before the estimator
    shapes them, so with rewards 1, Σk1 = 3, β = 0.5 every advantage is (1 − 1.5) − 1 = −1.5,
    where batch_mean (over the shaped rewards) gives 0."""
    t = moving_average_baseline(0.9)
    signals, _ = t.update(Signals(rewards=jnp.ones(R)), t.init())
    inp = PrepareInput(_rollout(), jnp.ones(R), ref_logprobs=jnp.full((R, T - 1), -1.0), baseline=signals.baseline)
    for baseline, expected in (("moving_average", -1.5), ("batch_mean", 0.0)):
        est = baseline_estimate(inp, BaselineConfig(baseline, kl_coef=0.5))
        np.testing.assert_allclose(np.asarray(est.rewards), [-0.5] * R, atol=1e-6)
        np.testing.assert_allclose(np.asarray(est.advantages), [expected] * R, atol=1e-6)
