"""The shared RL iteration on a 64-armed bandit: every policy-gradient algorithm moves mass to the best arms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.models import Model, preset
from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig

V = 64
ARM_REWARD = np.linspace(0.0, 1.0, V).astype(np.float32)  # token y pays y / 63: the best arm is 63


def decode(ids):
    return [" ".join(str(int(t)) for t in row) for row in ids]


def reward_fn(prompts, completions, **_):
    return [float(ARM_REWARD[int(c.split()[0])]) for c in completions]


def arm_probs(model, params):
    logits = model(params, jnp.ones((1, 1), jnp.int32))[0, -1]
    return np.asarray(jax.nn.softmax(logits))


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo", "scst", "mrt", "grpo"])
def test_algorithms_move_probability_to_the_best_arms(algorithm):
    model = Model(preset("tiny", n_layers=1))
    params = model.init(jax.random.key(0))
    cfg = RLConfig(algorithm=algorithm,
                   sampling=SampleConfig(max_new_tokens=1, n=8, eos_id=-1, min_prompt_bucket=1),
                   optimizer=OptimizerConfig(lr=3e-2, schedule="constant", clip_norm=None))
    it = make_rl_iteration(model, cfg, reward_fn, decode)
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    prompts = np.ones((4, 1), np.int32)
    before = float(arm_probs(model, params) @ ARM_REWARD)
    for i in range(25):
        state, metrics = it(state, prompts, None)
    probs = arm_probs(model, state.policy.params)
    after = float(probs @ ARM_REWARD)
    assert before == pytest.approx(0.5, abs=0.05)  # near-uniform start
    assert after > 0.8, (algorithm, after)  # expected reward under the policy rose
    assert probs[-8:].sum() > 0.5 and metrics["reward_mean"] > 0.7


def test_bad_reward_functions_and_group_size_fail_clearly():
    from rljax.rewards import RewardError

    model = Model(preset("tiny", n_layers=1))
    params = model.init(jax.random.key(0))
    sampling = SampleConfig(max_new_tokens=1, n=2, eos_id=-1, min_prompt_bucket=1)
    state = create_rl_state(model, params, RLConfig(algorithm="grpo", sampling=sampling), jax.random.key(1))
    prompts = np.ones((2, 1), np.int32)
    for bad, match in [(lambda p, c, **_: [0.0] * (len(c) + 1), "expected \\(4,\\)"),
                       (lambda p, c, **_: [float("nan")] * len(c), "non-finite")]:
        it = make_rl_iteration(model, RLConfig(algorithm="grpo", sampling=sampling), bad, decode)
        with pytest.raises(RewardError, match=match):
            it(state, prompts, None, jax.random.key(0))
    with pytest.raises(ValueError, match="needs n >= 2"):
        make_rl_iteration(model, RLConfig(algorithm="grpo", sampling=sampling.replace(n=1)), reward_fn, decode)


def test_failed_reward_calls_score_the_configured_value_and_are_counted_in_the_metrics():
    """RLConfig.reward_call reaches the reward function: a judge that raises on odd arms scores
    them failure_value (0) and the iteration reports how many there were."""
    from rljax.rewards import RewardCallConfig

    model = Model(preset("tiny", n_layers=1))
    params = model.init(jax.random.key(0))
    sampling = SampleConfig(max_new_tokens=1, n=4, eos_id=-1, min_prompt_bucket=1)
    seen = []

    def odd_arms_fail(prompts, completions, **_):
        seen.extend(completions)
        if any(int(c.split()[0]) % 2 for c in completions):
            raise TimeoutError("judge unavailable")
        return reward_fn(prompts, completions)

    cfg = RLConfig(algorithm="grpo", sampling=sampling,
                   reward_call=RewardCallConfig(on_failure="value", failure_value=0.0, batch_size=1, workers=2))
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    _, metrics = make_rl_iteration(model, cfg, odd_arms_fail, decode)(state, np.ones((3, 1), np.int32), None)
    arms = [int(c.split()[0]) for c in seen]
    assert len(arms) == 12 and 0 < sum(a % 2 for a in arms) < 12  # both kinds were drawn
    assert metrics["reward_failed"] == sum(a % 2 for a in arms)
    assert metrics["reward_mean"] == pytest.approx(np.mean([0.0 if a % 2 else ARM_REWARD[a] for a in arms]))
    with pytest.raises(TypeError, match="RLConfig.reward_call"):
        RLConfig(reward_call=dict(timeout_s=1.0))


def test_kl_regularised_reinforce_reaches_the_closed_form_optimum():
    """max E[r] − β KL(π‖π_ref) has π* ∝ π_ref exp(r/β) (docs/algorithms.md); REINFORCE with the
    KL in the reward converges to it: total variation < 0.05."""
    from rljax.estimators import BaselineConfig

    beta = 0.25
    model = Model(preset("tiny", n_layers=1))
    params = model.init(jax.random.key(0))
    ref = arm_probs(model, params)
    target = ref * np.exp(ARM_REWARD / beta)
    target /= target.sum()
    cfg = RLConfig(algorithm="rloo", advantage=BaselineConfig("leave_one_out", kl_coef=beta),
                   sampling=SampleConfig(max_new_tokens=1, n=16, eos_id=-1, min_prompt_bucket=1),
                   optimizer=OptimizerConfig(lr=2e-2, schedule="cosine", total_steps=200, end_lr_ratio=0.05,
                                             clip_norm=None))
    it = make_rl_iteration(model, cfg, reward_fn, decode)
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    prompts = np.ones((8, 1), np.int32)
    tv_start = 0.5 * np.abs(ref - target).sum()
    for i in range(200):
        state, _ = it(state, prompts, None)
    tv = 0.5 * np.abs(arm_probs(model, state.policy.params) - target).sum()
    assert tv_start > 0.3 and tv < 0.05, (tv_start, tv)


def test_running_reward_normaliser_makes_the_update_invariant_to_the_reward_scale():
    """REINFORCE without a baseline sees (r − mean) / std of every reward so far: an affine
    change of the reward (×10, +3) leaves the loss unchanged and the learned policy unchanged
    up to float32 noise that Adam's normalised steps amplify (params with ~0 gradient); without
    the normaliser the shift alone changes the policy by far more. The state counts the rewards."""
    from rljax.estimators import BaselineConfig
    from rljax.rewards.learned import running_normaliser
    from rljax.transforms import normalise_rewards

    model = Model(preset("tiny", n_layers=1))
    params = model.init(jax.random.key(0))
    norm = running_normaliser(eps=0.0)
    finals, first_losses = {}, {}
    for normalise in (True, False):
        for scale, shift in ((1.0, 0.0), (10.0, 3.0)):
            def scaled(prompts, completions, **_):
                return [scale * r + shift for r in reward_fn(prompts, completions)]

            cfg = RLConfig(algorithm="reinforce", advantage=BaselineConfig("none"),
                           sampling=SampleConfig(max_new_tokens=1, n=8, eos_id=-1, min_prompt_bucket=1),
                           optimizer=OptimizerConfig(lr=3e-2, schedule="constant", clip_norm=None),
                           transforms=(normalise_rewards(norm),) if normalise else ())
            it = make_rl_iteration(model, cfg, scaled, decode)
            state = create_rl_state(model, params, cfg, jax.random.key(1))
            for i in range(3):
                state, m = it(state, np.ones((4, 1), np.int32), None)
                if i == 0:
                    first_losses[normalise, scale] = m["loss"]
            if normalise:
                assert int(state.transforms[0].count) == 3 * 32
            finals[normalise, scale] = arm_probs(model, state.policy.params)
    np.testing.assert_allclose(first_losses[True, 1.0], first_losses[True, 10.0], rtol=1e-4)
    assert np.abs(finals[True, 1.0] - finals[True, 10.0]).max() < 5e-3
    assert np.abs(finals[False, 1.0] - finals[False, 10.0]).max() > 5e-2
    with pytest.raises(ValueError, match="RLState.transforms"):  # a state made for another chain
        cfg = RLConfig(algorithm="reinforce", sampling=SampleConfig(max_new_tokens=1, n=8, eos_id=-1),
                       transforms=(normalise_rewards(norm),))
        make_rl_iteration(model, cfg, reward_fn, decode)(create_rl_state(model, params, RLConfig("reinforce"),
                                                                         jax.random.key(1)),
                                                         np.ones((4, 1), np.int32), None)
