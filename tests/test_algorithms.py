"""The registry: every algorithm prepares a batch from a real rollout and its loss runs on it."""
import jax
import numpy as np
import pytest

from conftest import left_padded
from rljax.algorithms import ALGORITHMS, check_group_size, get_algorithm
from rljax.models.logprobs import token_logprobs
from rljax.sampling import SampleConfig, sample


def test_every_algorithm_prepares_and_scores_a_rollout(tiny):
    model, params = tiny
    prompts, mask = left_padded([5, 3, 6], 6, 64, seed=1)
    r = sample(params, prompts, mask, jax.random.key(0), model=model, cfg=SampleConfig(max_new_tokens=6, n=2))
    rewards = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], np.float32)  # prompt 1's samples tie
    ref = token_logprobs(params, r.tokens, r.attention_mask, model=model)
    assert sorted(ALGORITHMS) == ["a2c", "a3c", "dapo", "dr_grpo", "grpo", "mrt", "ppo", "reinforce", "rloo", "scst",
                                  "trpo"]
    values = 0.1 * ref  # any V_old [R, T-1] for the actor-critic methods (the model here has no value head)
    for name, algo in ALGORITHMS.items():
        cfg = algo.config
        if name == "dr_grpo":
            cfg = algo.with_config(constant=6.0).config
        batch, keep = algo.prepare(r, rewards, cfg, ref_logprobs=ref, greedy_rewards=np.ones(6, np.float32),
                                   values=values)
        loss, metrics = algo.loss(params, batch, model=model, cfg=cfg)
        assert np.isfinite(float(loss)), name
        if name == "dapo":
            np.testing.assert_array_equal(keep, [True, True, False, False, True, True])
        else:
            assert bool(np.all(keep)), name
        if name in ("grpo", "dapo", "dr_grpo"):  # sampled log-probs are π_old: first minibatch has ρ = 1
            assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-4)
        if algo.uses_values:  # per-token advantages and returns R = A + V_old on the completion tokens
            assert batch.advantages.shape == ref.shape and batch.returns.shape == ref.shape
        if name in ("ppo", "a2c", "a3c"):
            assert float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="value head's values"):
        ALGORITHMS["ppo"].prepare(r, rewards, ALGORITHMS["ppo"].config, ref_logprobs=ref)


def test_group_methods_need_two_samples():
    check_group_size(get_algorithm("reinforce"), 1)
    for name in ("rloo", "grpo", "mrt", "dapo"):
        with pytest.raises(ValueError, match="needs n >= 2"):
            check_group_size(get_algorithm(name), 1)
    with pytest.raises(KeyError, match="unknown algorithm"):
        get_algorithm("ppo2")
