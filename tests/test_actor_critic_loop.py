"""A2C and PPO through the shared RL iteration on the 64-armed bandit of test_rl_bandit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.estimators import GAEConfig
from rljax.losses.actor_critic import PPOConfig, with_value_head
from rljax.losses.kl_control import adaptive_kl_controller
from rljax.models import Model, preset
from rljax.phases import PromptBatch
from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig
from rljax.transforms import kl_control
from tests.test_rl_bandit import ARM_REWARD, arm_probs, decode, reward_fn

SAMPLING = SampleConfig(max_new_tokens=1, n=16, eos_id=-1, min_prompt_bucket=1)


def _setup():
    model, params = with_value_head(Model(preset("tiny", n_layers=1)), Model(preset("tiny", n_layers=1)).init(
        jax.random.key(0)))
    return model, params


def _prompt_value(model, params):
    """V at the bandit's one-token prompt: what the critic predicts before the arm is drawn."""
    from rljax.losses.actor_critic import token_values

    return float(token_values(params, jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32), model=model)[0, 0])


@pytest.mark.parametrize("algorithm,advantage,epochs,separate", [
    ("a2c", None, 1, False),
    # PPO with the value head on the policy (15 s) in the slow tier: a2c covers that critic, PPO the separate one
    pytest.param("ppo", GAEConfig(kl_coef=0.0), 2, False, marks=pytest.mark.slow),
    ("ppo", GAEConfig(kl_coef=0.0), 2, True)])
def test_actor_critic_moves_mass_to_the_best_arms(algorithm, advantage, epochs, separate):
    """The policy learns the bandit and the critic (value head on the policy's backbone,
    or a separate model) learns V(prompt) = E_π[r] = Σ_y π(y) r(y), closed form."""
    model, params = _setup()
    assert float(params["value_head"].sum()) == 0.0  # the critic starts at V = 0
    critic_model = critic_params = None
    if separate:
        critic_model, critic_params = model, params
        model = Model(preset("tiny", n_layers=1))
        params = {k: v for k, v in params.items() if not k.startswith("value_")}
    # lr 2e-2: at 3e-2 PPO's policy turned near-deterministic within 10 iterations and which arm it
    # settled on depended on float rounding (0.905 with one product library, a stuck 0.698 with another)
    opt = OptimizerConfig(lr=2e-2, schedule="constant", clip_norm=None, head_lr=1e-2)
    cfg = RLConfig(algorithm=algorithm, advantage=advantage, sampling=SAMPLING.replace(n=8), optimizer=opt,
                   epochs=epochs,
                   minibatches=epochs)  # A2C: one synchronous update per batch; PPO: 2 epochs x 2 minibatches
    it = make_rl_iteration(model, cfg, reward_fn, decode, critic_model=critic_model)
    state = create_rl_state(model, params, cfg, jax.random.key(1), critic_model=critic_model,
                            critic_params=critic_params)
    values, expected = [], []
    for i in range(25):
        state, m = it(state, np.ones((4, 1), np.int32), None)
        if i >= 15:
            values.append(_prompt_value(critic_model, state.critic.params) if separate
                          else _prompt_value(model, state.policy.params))
            expected.append(float(arm_probs(model, state.policy.params) @ ARM_REWARD))
    assert expected[-1] > 0.8 and m["reward_mean"] > 0.7
    # Adam at a constant head lr keeps the critic's estimate moving by several hundredths around
    # its target from one iteration to the next, so the estimate is its mean over the last 10
    assert abs(np.mean(values) - np.mean(expected)) < 0.03, (values, expected)


def test_a_fresh_value_head_at_the_backbone_lr_is_warned_about():
    import warnings

    model, params = _setup()
    with pytest.warns(UserWarning, match="head_lr"):
        create_rl_state(model, params, RLConfig("ppo", optimizer=OptimizerConfig(lr=1e-5)), jax.random.key(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_rl_state(model, params, RLConfig("ppo", optimizer=OptimizerConfig(lr=1e-5, head_lr=1e-3)),
                        jax.random.key(0))
        trained = {**params, "value_head": params["value_head"] + 0.1}  # not fresh: e.g. a reward model's head
        create_rl_state(model, trained, RLConfig("ppo", optimizer=OptimizerConfig(lr=1e-5)), jax.random.key(0))
    with pytest.raises(TypeError, match="RLConfig"):
        create_rl_state(model, params, OptimizerConfig(lr=1e-5), jax.random.key(0))


def test_critic_settings_without_a_separate_critic_are_warned_about():
    import warnings

    model, _ = _setup()  # PPO with the value head on the policy: no RLState.critic to apply them to
    with pytest.warns(UserWarning, match=r"RLConfig.critic_optimizer / critic_epochs are set \(critic_epochs=4\), "
                                         r"but there is no separate critic \(critic_model=None\): ppo does not use "
                                         r"them \(its value head trains with the policy's optimizer and epochs\)"):
        make_rl_iteration(model, RLConfig("ppo", sampling=SAMPLING, critic_epochs=4), reward_fn, decode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_rl_iteration(model, RLConfig("ppo", sampling=SAMPLING), reward_fn, decode)


@pytest.mark.slow  # 200 PPO iterations; KL-regularised REINFORCE checks the same optimum in the default run
def test_ppo_with_a_kl_penalty_reaches_the_closed_form_optimum():
    """Per-token reward r − β k1 with PPO's clipped updates: π → π* ∝ π_ref exp(r/β), TV < 0.05."""
    beta = 0.25
    model, params = _setup()
    ref = arm_probs(model, params)
    target = ref * np.exp(ARM_REWARD / beta)
    target /= target.sum()
    cfg = RLConfig(algorithm="ppo", advantage=GAEConfig(kl_coef=beta), sampling=SAMPLING,
                   optimizer=OptimizerConfig(lr=2e-2, schedule="cosine", total_steps=400, end_lr_ratio=0.05,
                                             clip_norm=None), epochs=2, minibatches=1)
    it = make_rl_iteration(model, cfg, reward_fn, decode)
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    for _ in range(200):
        state, _ = it(state, np.ones((8, 1), np.int32), None)
    tv = 0.5 * np.abs(arm_probs(model, state.policy.params) - target).sum()
    assert tv < 0.05, tv


def test_adaptive_kl_controller_in_the_loop_and_early_stop():
    """β rises while the policy's KL to the reference is above the target; with a tiny
    target_kl the iteration stops after the first minibatch whose KL is too large."""
    model, params = _setup()
    ctl = adaptive_kl_controller(init_beta=0.01, target=1e-3, horizon=100)
    cfg = RLConfig(algorithm="ppo", loss=PPOConfig(), sampling=SAMPLING.replace(n=8),
                   optimizer=OptimizerConfig(lr=3e-2, schedule="constant", clip_norm=None), epochs=4, minibatches=2,
                   transforms=(kl_control(ctl),), target_kl=1e-4)
    it = make_rl_iteration(model, cfg, reward_fn, decode)
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    betas, updates = [], []
    for _ in range(6):
        state, m = it(state, np.ones((4, 1), np.int32), None)
        betas.append(m["kl_coef"])
        updates.append(m["updates"])
        # the logged β is the one used; the state holds the controller's next value
        e = np.clip(m["kl_per_sequence"] / 1e-3 - 1, -0.2, 0.2)
        np.testing.assert_allclose(float(state.transforms[0].beta), m["kl_coef"] * (1 + e * 32 / 100), rtol=1e-5)
    assert betas[0] == pytest.approx(0.01) and betas[-1] > betas[1]  # KL above target: β grows
    # the first update (at π_old) always runs; at the start one update moves the policy past the tiny target,
    # later the policy is nearly deterministic and moves less
    assert updates[0] == 1 and all(1 <= u <= 8 for u in updates), updates
    with pytest.raises(ValueError, match="value head"):
        make_rl_iteration(Model(preset("tiny", n_layers=1)), RLConfig(algorithm="ppo", sampling=SAMPLING), reward_fn,
                          decode)
    with pytest.raises(ValueError, match="target_kl"):
        RLConfig(algorithm="grpo", target_kl=0.0)
    with pytest.raises(ValueError, match="no KL penalty in the reward"):  # GRPO's KL is a loss term
        RLConfig(algorithm="grpo", transforms=(kl_control(ctl),))


class ArmPrompts:
    def batch_at(self, position):
        return PromptBatch(tokens=np.ones((4, 1), np.int32), mask=None, metadata={})


def _phase(run_dir, algorithm, steps, staleness=0, actors=1):
    from rljax.metrics import read_metrics
    from rljax.phases import LoopConfig, rl

    model, params = _setup()
    cfg = RLConfig(algorithm=algorithm, sampling=SAMPLING.replace(n=8), staleness=staleness, actors=actors,
                   optimizer=OptimizerConfig(lr=3e-2, schedule="constant", clip_norm=None))
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    state = rl(state, ArmPrompts(), reward_fn, cfg, model=model, decode=decode, run_dir=str(run_dir),
               loop=LoopConfig(steps=steps, log_every=1, progress=False))
    return model, state, [r for r in read_metrics(str(run_dir)) if "rl/reward_mean" in r]


def test_a3c_with_zero_staleness_is_a2c_bit_for_bit(tmp_path):
    _, a2c, _ = _phase(tmp_path / "a2c", "a2c", 4)
    _, a3c, rows = _phase(tmp_path / "a3c", "a2c", 4, staleness=0, actors=2)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a3c.policy.params), jax.device_get(a2c.policy.params))
    assert all("rl/staleness" not in r for r in rows)


def test_a3c_with_stale_actors_reports_the_lag_and_still_learns(tmp_path):
    model, state, rows = _phase(tmp_path, "a2c", 30, staleness=2, actors=2)
    lags = [r.get("rl/staleness", 0.0) for r in rows]
    assert lags == [0.0, 1.0] + [2.0] * 28  # batch i was sampled with the params of iteration max(0, i − 2)
    weights = [r["rl/importance_weight"] for r in rows if "rl/importance_weight" in r]
    assert weights and all(0.0 < w <= 1.0 for w in weights) and min(weights) < 1.0  # truncated at c̄ = 1
    # the loop's throughput counts the rollout's tokens: 4 prompts x 8 samples x (1 prompt + 1 completion token)
    assert all(r["rl/tokens"] == 64 and r["rl/tokens_per_s"] > 0 for r in rows)
    assert float(arm_probs(model, state.policy.params) @ ARM_REWARD) > 0.8


@pytest.mark.slow  # 25-75 s: the default suite keeps its 15-minute budget; .ci/run runs the slow tier
def test_trpo_in_the_loop_keeps_every_step_in_the_trust_region_and_learns(tmp_path):
    """TRPO with a separate critic (initialised from the policy): each iteration's step has
    KL ≤ δ, measured again here from the params before and after; the policy improves."""
    from rljax.losses.trpo import TRPOConfig

    delta = 0.1
    model = Model(preset("tiny", n_layers=1))
    params = model.init(jax.random.key(0))
    critic_model, critic_params = with_value_head(model, params)
    cfg = RLConfig(algorithm="trpo", loss=TRPOConfig(max_kl=delta), sampling=SAMPLING,
                   optimizer=OptimizerConfig(lr=1e-2, schedule="constant"), critic_epochs=4)
    it = make_rl_iteration(model, cfg, reward_fn, decode, critic_model=critic_model)
    state = create_rl_state(model, params, cfg, jax.random.key(1), critic_model=critic_model,
                            critic_params=critic_params)
    value_losses = []
    for _ in range(40):
        before = arm_probs(model, state.policy.params)
        state, m = it(state, np.ones((4, 1), np.int32), None)
        after = arm_probs(model, state.policy.params)
        kl = float(np.sum(before * (np.log(before) - np.log(after))))  # the one state of the bandit, exactly
        assert kl <= delta * (1 + 1e-3), kl
        np.testing.assert_allclose(kl, m["kl"], rtol=1e-3, atol=1e-6)
        value_losses.append(m["critic_value_loss"])
    assert float(arm_probs(model, state.policy.params) @ ARM_REWARD) > 0.8
    assert np.mean(value_losses[-5:]) < np.mean(value_losses[:5])  # the critic fits the returns
    with pytest.raises(ValueError, match="separate critic"):
        make_rl_iteration(model, cfg, reward_fn, decode)
