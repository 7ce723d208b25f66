"""The registry: every algorithm prepares a batch from a real rollout and its loss runs on it."""
import jax
import numpy as np
import pytest

from conftest import left_padded
from rljax.algorithms import ALGORITHMS, check_group_size, compose, get_algorithm, prepare
from rljax.estimators import PrepareInput
from rljax.losses import GRPOConfig
from rljax.models.logprobs import target_mask, token_logprobs
from rljax.rl import RLConfig
from rljax.sampling import SampleConfig, sample


def test_every_algorithm_prepares_and_scores_a_rollout(tiny):
    model, params = tiny
    prompts, mask = left_padded([5, 3, 6], 6, 64, seed=1)
    r = sample(params, prompts, mask, jax.random.key(0), model=model, cfg=SampleConfig(max_new_tokens=6, n=2))
    rewards = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], np.float32)  # prompt 1's samples tie
    ref = token_logprobs(params, r.tokens, r.attention_mask, model=model)
    assert sorted(ALGORITHMS) == ["a2c", "cispo", "dapo", "dr_grpo", "grpo", "gspo", "mrt", "on_policy_distill", "ppo",
                                  "reinforce", "rloo", "scst", "trpo"]
    values = 0.1 * ref  # any V_old [R, T-1] for the actor-critic methods (the model here has no value head)
    inp = PrepareInput(rollout=r, rewards=rewards, ref_logprobs=ref, greedy_rewards=np.ones(6, np.float32),
                       values=values, teacher_logprobs=0.5 * ref)  # any teacher's log-probs (on_policy_distill)
    for name, algo in ALGORITHMS.items():
        if name == "dr_grpo":  # the registry leaves its normaliser to the RL config: C = max_new_tokens
            with pytest.raises(ValueError, match="sampling.max_new_tokens"):
                algo.loss.loss(params, prepare(algo, inp)[0], model=model, cfg=algo.loss.config)
            algo = RLConfig(algorithm="dr_grpo", sampling=SampleConfig(max_new_tokens=6, n=2)).algo
            assert algo.loss.config.constant == 6.0
        batch, keep = prepare(algo, inp)
        loss, metrics = algo.loss.loss(params, batch, model=model, cfg=algo.loss.config)
        assert np.isfinite(float(loss)), name
        if name == "dr_grpo":  # ρ = 1, β = 0: L = −Σ_{b,t} m Â_b / (B · C), B = 6 rows, C = 6 new tokens
            m = np.asarray(target_mask(batch.loss_mask, batch.attention_mask))
            assert float(loss) == pytest.approx(-float(np.sum(np.asarray(batch.advantages)[:, None] * m)) / 36,
                                                rel=1e-4, abs=1e-6)
        if name == "dapo":
            np.testing.assert_array_equal(keep, [True, True, False, False, True, True])
        else:
            assert bool(np.all(keep)), name
        if name in ("grpo", "dapo", "dr_grpo", "gspo", "cispo"):  # sampled log-probs are π_old: ρ = 1 at first
            assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-4)
        if algo.needs().values:  # per-token advantages and returns R = A + V_old on the completion tokens
            assert batch.advantages.shape == ref.shape and batch.returns.shape == ref.shape
        if name in ("ppo", "a2c"):
            assert float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="PrepareInput.values is missing"):
        prepare(ALGORITHMS["ppo"], PrepareInput(rollout=r, rewards=rewards, ref_logprobs=ref))


def test_needs_are_declared_per_config_and_pairs_are_checked():
    from rljax.estimators import BaselineConfig, GroupAdvantageConfig
    from rljax.losses import GRPOConfig, ReinforceConfig

    assert get_algorithm("grpo").needs().reference  # GRPO's k3 term (β = 0.04)
    assert not get_algorithm("grpo").needs(loss=GRPOConfig(kl_coef=0.0)).reference
    assert get_algorithm("dapo").needs().group_filter and not get_algorithm("grpo").needs().group_filter
    assert get_algorithm("grpo").needs(advantage=GroupAdvantageConfig(drop_equal_groups=True)).group_filter
    assert get_algorithm("scst").needs().greedy and not get_algorithm("rloo").needs().greedy
    assert get_algorithm("ppo").needs().values and not get_algorithm("ppo").needs().critic
    assert get_algorithm("trpo").needs().critic
    assert get_algorithm("on_policy_distill").needs().teacher and not get_algorithm("grpo").needs().teacher
    assert get_algorithm("reinforce").needs(advantage=BaselineConfig("none", kl_coef=0.1)).reference
    assert get_algorithm("reinforce").needs(loss=ReinforceConfig(kl_coef=0.1)).reference
    # any estimator with any loss that takes its output
    rloo_clip = compose("baseline", "clip")
    assert rloo_clip.estimator.name == "baseline" and rloo_clip.loss.name == "clip"
    with pytest.raises(ValueError, match="token-level"):
        compose("group", "ppo")
    with pytest.raises(KeyError, match="unknown policy loss"):
        compose("group", "ppo2")
    with pytest.raises(TypeError, match="RLConfig.loss: grpo takes a GRPOConfig"):
        get_algorithm("grpo").configs(loss=ReinforceConfig())
    # MRT's loss is a softmax over each prompt's samples: minibatches would deal a group's rows apart (a row alone
    # got Q = 1 and no gradient); GRPO's groups live in its advantages, computed before the minibatches
    from rljax.rl import RLConfig
    from rljax.sampling import SampleConfig

    four = SampleConfig(max_new_tokens=4, n=4)
    with pytest.raises(ValueError, match=r"RLConfig.minibatches: mrt's loss \(mrt\) takes each prompt's 4 samples "
                                         r"together, and minibatches=2 would split them"):
        RLConfig(algorithm="mrt", sampling=four, minibatches=2)
    RLConfig(algorithm="mrt", sampling=four, epochs=2)
    RLConfig(algorithm="grpo", sampling=four, minibatches=2)
    # a value-fitting loss needs the estimator's returns; values need a loss that fits them
    for loss in ("a2c", "ppo", "trpo"):
        with pytest.raises(ValueError, match=rf"policy loss '{loss}' fits a value function on the estimator's "
                                             r"returns; estimator 'distill' gives none"):
            compose("distill", loss)
    for loss in ("clip", "cispo"):
        with pytest.raises(ValueError, match=rf"estimator 'gae' reads V\(s\) .* with '{loss}' V would stay"):
            compose("gae", loss)
    # kl_in follows where a kl_coef lives: GAE's reward penalty for PPO, the loss's term for GRPO's clip
    ppo = compose("gae", "ppo")
    assert ppo.kl_in == "reward" and ppo.with_kl_coef(0.3).estimator.config.kl_coef == 0.3
    assert compose("group", "clip").with_kl_coef(0.3).loss.config.kl_coef == 0.3
    with pytest.raises(ValueError, match=r"no KL penalty to set; its estimator 'group' \(kl_in='reward'\)"):
        compose("group", "clip", kl_in="reward").with_kl_coef(0.1)


def test_a_constant_normaliser_left_none_is_the_max_completion_length():
    """RLConfig fills in Dr. GRPO's C (and any constant-aggregated loss's C left None) from
    sampling.max_new_tokens; a constant given explicitly stays; a non-positive one is refused."""
    sampling = SampleConfig(max_new_tokens=24, n=2)
    assert RLConfig(algorithm="dr_grpo", sampling=sampling).algo.loss.config.constant == 24.0
    assert get_algorithm("dr_grpo").loss.config.constant is None
    mine = GRPOConfig(aggregation="constant", constant=3.0, kl_coef=0.0)
    assert RLConfig(algorithm="dr_grpo", loss=mine, sampling=sampling).algo.loss.config.constant == 3.0
    assert RLConfig(algorithm="grpo", loss=GRPOConfig(aggregation="constant"),
                    sampling=sampling).algo.loss.config.constant == 24.0
    assert RLConfig(algorithm="grpo", sampling=sampling).algo.loss.config.constant is None  # not aggregated so
    with pytest.raises(ValueError, match="GRPOConfig.constant: must be positive"):
        GRPOConfig(aggregation="constant", constant=0.0)


def test_group_methods_need_two_samples():
    check_group_size(get_algorithm("reinforce"), 1)
    for name in ("rloo", "grpo", "mrt", "dapo"):
        with pytest.raises(ValueError, match="needs n >= 2"):
            check_group_size(get_algorithm(name), 1)
    with pytest.raises(KeyError, match="unknown algorithm"):
        get_algorithm("ppo2")


def test_preference_reward_model_and_oreo_methods_are_named_the_same_way():
    """name -> default config, the config's type picks the loss: every registered reward-model
    objective reaches its loss (a wrong batch is refused naming the batch type it trains on),
    and the OREO names carry the paper's α per level."""
    from rljax.losses.oreo import OREO_LEVELS, OREO_METHODS
    from rljax.losses.preference import PREFERENCE_METHODS
    from rljax.losses.reward_model import REWARD_MODEL_OBJECTIVES, reward_model_loss

    expected = {"bradley_terry": "RankingBatch", "plackett_luce": "RankingBatch", "pointwise": "ScoreBatch",
                "verifier": "TokenLabelBatch", "prm": "TokenLabelBatch", "feedback": "FeedbackBatch",
                "implicit_prm": "OutcomeBatch"}
    assert set(REWARD_MODEL_OBJECTIVES) == set(expected)
    for name, cfg in REWARD_MODEL_OBJECTIVES.items():
        with pytest.raises(ValueError, match=f"trains on {expected[name]}"):
            reward_model_loss(None, object(), model=None, cfg=cfg)
    assert {name: cfg.level for name, cfg in OREO_METHODS.items()} == {f"oreo_{lv}": lv for lv in OREO_LEVELS}
    assert "dpo" in PREFERENCE_METHODS and "kto" in PREFERENCE_METHODS
