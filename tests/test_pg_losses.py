"""Policy-gradient losses against naive per-sample references and the known answers of docs/algorithms.md."""
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import left_padded
from rljax.estimators import BaselineConfig, GroupAdvantageConfig, PrepareInput, baseline_advantages, group_estimate
from rljax.losses import (GRPOConfig, MRTConfig, PolicyBatch, ReinforceConfig, grpo_loss, mrt_distribution, mrt_loss,
                          reinforce_loss)
from rljax.models.logprobs import token_logprobs


def _batch(model, params, seed=0, ref_shift=0.3):
    """6 rows (3 prompts x 2 samples), completions of different lengths, one row with a single token."""
    rng = np.random.default_rng(seed)
    tokens, attn = left_padded([9, 9, 7, 7, 5, 4], 10, 64, seed=seed)
    loss_mask = attn.copy()
    loss_mask[:, :6] = 0  # the first 6 slots are prompt
    lp = np.asarray(jax.jit(functools.partial(token_logprobs, model=model))(params, tokens, attn))
    old = lp + rng.normal(0, 0.1, lp.shape).astype(np.float32)
    ref = lp + rng.normal(0, ref_shift, lp.shape).astype(np.float32)
    rewards = rng.normal(size=6).astype(np.float32)
    return PolicyBatch(tokens=tokens, attention_mask=attn, loss_mask=loss_mask, old_logprobs=old,
                       advantages=rewards - rewards.mean(), rewards=rewards,
                       group_ids=np.array([0, 0, 1, 1, 2, 2]), ref_logprobs=ref), lp


def _mask(b):
    return (b.loss_mask[:, 1:] * b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).astype(np.float64)


def test_reinforce_loss_matches_naive(tiny):
    model, params = tiny
    b, lp = _batch(model, params)
    m = _mask(b)
    beta = 0.1
    cfg = ReinforceConfig(kl_coef=beta, kl_estimator="k3")
    loss, metrics = jax.jit(functools.partial(reinforce_loss, model=model, cfg=cfg))(params, b)
    d = b.ref_logprobs - lp
    k3 = np.exp(d) - 1 - d
    naive = np.mean([((-b.advantages[i] * lp[i] + beta * k3[i]) * m[i]).sum() for i in range(6)])
    assert float(loss) == pytest.approx(naive, rel=1e-4)
    assert float(metrics["kl_k1"]) == pytest.approx(((lp - b.ref_logprobs) * m).sum() / m.sum(), rel=1e-4)
    # the gradient is that of −mean_i A_i Σ_t ℓ_t (+ KL): REINFORCE's estimator
    g = jax.jit(jax.grad(lambda p: reinforce_loss(p, b, model=model, cfg=ReinforceConfig())[0]))(params)
    g_ref = jax.jit(jax.grad(lambda p: -jnp.mean(jnp.asarray(b.advantages) * (
        token_logprobs(p, b.tokens, b.attention_mask, model=model) * m).sum(1))))(params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g, g_ref)


def test_reinforce_baselines():
    r = jnp.array([1.0, 0.0, 3.0, 1.0])
    gid = jnp.array([0, 0, 1, 1])
    np.testing.assert_allclose(baseline_advantages(r, gid, "none"), r)
    np.testing.assert_allclose(baseline_advantages(r, gid, "batch_mean"), r - 1.25)
    np.testing.assert_allclose(baseline_advantages(r, gid, "leave_one_out"),
                               [1.0, -1.0, 2.0, -2.0])  # b_i = the other sample of the pair
    np.testing.assert_allclose(baseline_advantages(r, gid, "greedy", greedy_rewards=jnp.array([1.0, 1.0, 3.0, 3.0])),
                               [0.0, -1.0, 0.0, -2.0])
    np.testing.assert_allclose(baseline_advantages(r, gid, "moving_average", running=jnp.float32(0.5)), r - 0.5)
    # SCST: when the greedy output is the best sample, every advantage is <= 0
    with pytest.raises(ValueError, match="greedy_rewards"):
        baseline_advantages(r, gid, "greedy")
    with pytest.raises(ValueError, match="baseline"):
        BaselineConfig(baseline="median")


def test_mrt_known_answers(tiny):
    model, params = tiny
    b, lp = _batch(model, params)
    m = _mask(b)
    s = (lp * m).sum(1)
    # α → 0: uniform Q, loss = mean over prompts of the mean cost, zero gradient
    cfg0 = MRTConfig(alpha=0.0)
    loss0, _ = jax.jit(functools.partial(mrt_loss, model=model, cfg=cfg0))(params, b)
    cost = 1 - b.rewards
    assert float(loss0) == pytest.approx(np.mean([cost[[0, 1]].mean(), cost[[2, 3]].mean(), cost[[4, 5]].mean()]),
                                         rel=1e-5)
    g0 = jax.jit(jax.grad(lambda p: mrt_loss(p, b, model=model, cfg=cfg0)[0]))(params)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) == 0.0
    # general α: naive per-group softmax
    alpha = 0.7
    loss, _ = jax.jit(functools.partial(mrt_loss, model=model, cfg=MRTConfig(alpha=alpha)))(params, b)
    naive = 0.0
    for g in range(3):
        idx = [2 * g, 2 * g + 1]
        q = np.exp(alpha * s[idx] - (alpha * s[idx]).max())
        naive += (q / q.sum() * cost[idx]).sum()
    assert float(loss) == pytest.approx(naive / 3, rel=1e-4)
    # one candidate per group: Q = 1, the loss is the constant cost, no gradient
    q1 = mrt_distribution(jnp.array([-3.0, -1.0]), jnp.array([0, 1]), 0.5)
    np.testing.assert_allclose(q1, [1.0, 1.0])
    # a row with no counted token (log p = 0, p = 1) is left out of Q: it once took ~all of its group's mass
    empty = b.replace(loss_mask=np.where(np.arange(6)[:, None] == 3, 0, b.loss_mask))
    loss_e, _ = jax.jit(functools.partial(mrt_loss, model=model, cfg=MRTConfig(alpha=alpha)))(params, empty)
    q_rest = [np.exp(alpha * s[idx] - (alpha * s[idx]).max()) for idx in ([0, 1], [4, 5])]
    naive_e = sum((q / q.sum() * cost[idx]).sum() for q, idx in zip(q_rest, ([0, 1], [4, 5]))) + cost[2]
    assert float(loss_e) == pytest.approx(naive_e / 3, rel=1e-4)
    np.testing.assert_allclose(mrt_distribution(jnp.array([-3.0, 0.0, -1.0]), jnp.array([0, 0, 1]), 0.5,
                                                jnp.array([True, False, False])), [1.0, 0.0, 0.0])


def test_grpo_first_minibatch_equals_unclipped_and_matches_naive(tiny):
    model, params = tiny
    b, lp = _batch(model, params)
    b = b.replace(old_logprobs=lp)  # first minibatch of an iteration: π_θ = π_old, ρ = 1
    m = _mask(b)
    cfg = GRPOConfig(kl_coef=0.04)
    loss, metrics = jax.jit(functools.partial(grpo_loss, model=model, cfg=cfg))(params, b)
    d = b.ref_logprobs - lp
    per_tok = -b.advantages[:, None] + 0.04 * (np.exp(d) - 1 - d)
    naive = np.mean([(per_tok[i] * m[i]).sum() / m[i].sum() for i in range(6)])  # seq-mean of token-means
    assert float(loss) == pytest.approx(naive, rel=1e-4, abs=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)

    def unclipped(p):
        cur = token_logprobs(p, b.tokens, b.attention_mask, model=model)
        ratio = jnp.exp(cur - jax.lax.stop_gradient(cur))
        per = -ratio * jnp.asarray(b.advantages)[:, None]
        return jnp.mean((per * m).sum(1) / m.sum(1))

    g = jax.jit(jax.grad(lambda p: grpo_loss(p, b, model=model, cfg=GRPOConfig(kl_coef=0.0))[0]))(params)
    g_ref = jax.jit(jax.grad(unclipped))(params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g, g_ref)


def test_grpo_advantages_and_variants():
    r = jnp.array([1.0, 0.0, 1.0, 1.0, 0.5])
    gid = jnp.array([0, 0, 1, 1, 2])
    rollout = SimpleNamespace(group_ids=gid)
    est = group_estimate(PrepareInput(rollout=rollout, rewards=r), GroupAdvantageConfig(drop_equal_groups=True))
    np.testing.assert_allclose(est.advantages, [1.0, -1.0, 0.0, 0.0, 0.0], atol=1e-5)  # (r − μ)/(σ + ε), σ = 0.5
    np.testing.assert_array_equal(est.keep, [True, True, False, False, False])  # equal-reward groups, singletons
    dr = group_estimate(PrepareInput(rollout=rollout, rewards=r), GroupAdvantageConfig(scale_by_std=False))
    np.testing.assert_allclose(dr.advantages, [0.5, -0.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(dr.keep, [True] * 5)
    with pytest.raises(ValueError, match="constant"):
        GRPOConfig(aggregation="constant", constant=-1.0)
    with pytest.raises(ValueError, match="eps_low"):
        GRPOConfig(eps_low=1.5)


def test_padding_and_masked_positions_do_not_matter(tiny):
    model, params = tiny
    b, lp = _batch(model, params)
    m = _mask(b)
    garbage = np.where(m > 0, b.old_logprobs, 123.0).astype(np.float32)
    ref_garbage = np.where(m > 0, b.ref_logprobs, -77.0).astype(np.float32)
    for fn, cfg in ((grpo_loss, GRPOConfig()), (reinforce_loss, ReinforceConfig(kl_coef=0.1))):
        a = fn(params, b, model=model, cfg=cfg)[0]
        c = fn(params, b.replace(old_logprobs=garbage, ref_logprobs=ref_garbage), model=model, cfg=cfg)[0]
        assert float(a) == pytest.approx(float(c), rel=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        reinforce_loss(params, b.replace(ref_logprobs=None), model=model, cfg=ReinforceConfig(kl_coef=0.1))


def test_accumulated_minibatches_equal_one_update_on_the_whole_batch(tiny):
    # RL's epochs x minibatches with grad_accum = minibatches: the micro-batches' gradients, weighted
    # by their token counts (token_mean), make the one update of the whole batch, however the
    # permutation splits rows of 1 to 4 completion tokens
    import functools

    from rljax.rl import RLConfig, _optimizer_step, scan_updates
    from rljax.state import OptimizerConfig, create_state, make_optimizer

    model, params = tiny
    b, _ = _batch(model, params)
    loss_mask = np.asarray(b.loss_mask).copy()
    for row, keep in enumerate([1, 4, 2, 4, 1, 3]):  # completion tokens per row (all rows have 4)
        loss_mask[row, 6 + keep:] = 0
    b = b.replace(loss_mask=loss_mask)
    loss = functools.partial(grpo_loss, model=model, cfg=GRPOConfig(aggregation="token_mean", kl_coef=0.0))

    def run(minibatches, grad_accum):
        cfg = OptimizerConfig(lr=10.0, schedule="constant", clip_norm=None, eps=1.0, grad_accum=grad_accum)
        state = create_state(model, cfg, jax.random.key(0), params=params)
        step = _optimizer_step(make_optimizer(cfg), loss)
        state, _, made = jax.jit(lambda s, x: scan_updates(step, s, x, jax.random.key(3), epochs=1,
                                                           minibatches=minibatches))(state, b)
        assert int(made) == minibatches
        return state.params

    whole, acc = run(1, 1), run(2, 2)
    moved = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(params)))
    diff = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(acc)))
    assert moved > 1e-2 and diff < 1e-4 * moved
    with pytest.raises(ValueError, match="grad_accum"):
        RLConfig(optimizer=OptimizerConfig(grad_accum=2), minibatches=3)
    with pytest.raises(ValueError, match="target_kl"):
        RLConfig(algorithm="ppo", optimizer=OptimizerConfig(grad_accum=2), minibatches=2, target_kl=0.01)
