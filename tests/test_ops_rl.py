"""RL kernels against naive per-sample Python references and closed forms (docs/algorithms.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.ops import (clipped_surrogate, discounted_returns, gae, group_advantages, group_range, group_stats, kl_k1,
                       kl_k2, kl_k3, leave_one_out_baseline, whiten)

RNG = np.random.default_rng(0)
# groups of sizes 3, 1, 4, 2 in shuffled order (non-contiguous ids), 10 samples
GIDS = np.array([2, 0, 1, 2, 0, 2, 3, 0, 3, 2])
REWARDS = RNG.normal(size=10).astype(np.float32)


def _groups():
    return {g: np.flatnonzero(GIDS == g) for g in np.unique(GIDS)}


def test_group_stats_match_per_group_numpy():
    mean, std, count = map(np.asarray, group_stats(jnp.asarray(REWARDS), jnp.asarray(GIDS)))
    for g, idx in _groups().items():
        np.testing.assert_allclose(mean[idx], REWARDS[idx].mean(), rtol=1e-6)
        np.testing.assert_allclose(std[idx], REWARDS[idx].std(), rtol=1e-5, atol=1e-7)  # population std
        assert (count[idx] == len(idx)).all()


def test_group_range_matches_per_group_numpy():
    spread = np.asarray(group_range(jnp.asarray(REWARDS), jnp.asarray(GIDS)))
    for g, idx in _groups().items():
        np.testing.assert_allclose(spread[idx], np.ptp(REWARDS[idx]), rtol=1e-6)
    assert spread[GIDS == 1][0] == 0.0  # a group of one is "all equal"


def test_group_advantages_known_answers():
    adv = np.asarray(group_advantages(jnp.asarray(REWARDS), jnp.asarray(GIDS), eps=1e-6))
    for g, idx in _groups().items():
        r = REWARDS[idx]
        np.testing.assert_allclose(adv[idx], (r - r.mean()) / (r.std() + 1e-6), rtol=1e-5, atol=1e-6)
        assert abs(adv[idx].sum()) < 1e-5
    assert adv[GIDS == 1][0] == 0.0  # a group of one has no signal
    equal = np.asarray(group_advantages(jnp.ones(4), jnp.array([0, 0, 1, 1])))
    assert (equal == 0).all()  # equal rewards: no policy gradient
    dr = np.asarray(group_advantages(jnp.asarray(REWARDS), jnp.asarray(GIDS), scale_by_std=False))
    for g, idx in _groups().items():
        np.testing.assert_allclose(dr[idx], REWARDS[idx] - REWARDS[idx].mean(), rtol=1e-5, atol=1e-6)
    # std_scope="batch": the group's mean, the whole batch's population std ("Lite PPO"); tied groups still 0
    lite = np.asarray(group_advantages(jnp.asarray(REWARDS), jnp.asarray(GIDS), std_scope="batch"))
    for g, idx in _groups().items():
        want = (REWARDS[idx] - REWARDS[idx].mean()) / (REWARDS.std() + 1e-6) if np.ptp(REWARDS[idx]) > 0 else 0.0
        np.testing.assert_allclose(lite[idx], want, rtol=1e-5, atol=1e-6)
    # by hand: rewards [1, 0, 0, 0 | 1, 1, 0, 0], batch std sqrt(0.234375)
    hand = np.asarray(group_advantages(jnp.array([1., 0, 0, 0, 1, 1, 0, 0]), jnp.array([0] * 4 + [1] * 4),
                                       std_scope="batch", eps=0.0))
    s = np.sqrt(0.234375)
    np.testing.assert_allclose(hand, [0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s, 0.5 / s, 0.5 / s, -0.5 / s, -0.5 / s],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="std_scope must be 'group' or 'batch'"):
        group_advantages(jnp.asarray(REWARDS), jnp.asarray(GIDS), std_scope="prompt")


@pytest.mark.parametrize("value,n", [(0.7, 8), (1.1, 16), (2.2, 16), (-2.95, 11), (0.1, 8)])
def test_tied_groups_get_exactly_zero_advantage_despite_float_rounding(value, n):
    """A group of n equal rewards whose float32 mean is a few ulps off the reward: (r − μ)/(σ + ε) was
    6e-8 / (6e-8 + 1e-6) ≈ 0.06 for 0.7 x 8 (up to 0.32), pushing the whole group; now Â = 0 exactly,
    beside a group with signal whose advantages are unchanged, and ε = 0 gives no NaN."""
    rewards = jnp.concatenate([jnp.full((n,), value, jnp.float32), jnp.array([0.0, 1.0], jnp.float32)])
    gids = jnp.concatenate([jnp.zeros(n, jnp.int32), jnp.array([1, 1], jnp.int32)])
    for eps in (1e-6, 0.0):
        for scale in (True, False):
            adv = np.asarray(group_advantages(rewards, gids, scale_by_std=scale, eps=eps))
            assert (adv[:n] == 0).all(), (eps, scale, adv[:n])
            expected = np.array([-1.0, 1.0]) / (0.5 + eps) * 0.5 if scale else np.array([-0.5, 0.5])
            np.testing.assert_allclose(adv[n:], expected, rtol=1e-5)


def test_group_ids_outside_the_batch_are_refused():
    """segment sums drop ids >= R: GRPO once gave r / 1e-6 ≈ 1e6 and RLOO 0 for them, silently."""
    with pytest.raises(ValueError, match=r"group_ids\[2\] = 7 is outside \[0, 4\)"):
        group_advantages(jnp.array([1.0, 0.0, 1.0, 0.0]), jnp.array([0, 0, 7, 7]))
    with pytest.raises(ValueError, match=r"group_ids\[0\] = -1 is outside"):
        leave_one_out_baseline(jnp.array([1.0, 0.0]), jnp.array([-1, 0]))
    # inside jit the ids are traced and pass (the sampler's are always in range)
    np.testing.assert_allclose(jax.jit(group_advantages)(jnp.array([1.0, 0.0]), jnp.array([0, 0])), [1.0, -1.0],
                               rtol=1e-5)


def test_leave_one_out_excludes_the_sample_itself():
    b = np.asarray(leave_one_out_baseline(jnp.asarray(REWARDS), jnp.asarray(GIDS)))
    for g, idx in _groups().items():
        for i in idx:
            others = [REWARDS[j] for j in idx if j != i]
            expected = np.mean(others) if others else REWARDS[i]
            np.testing.assert_allclose(b[i], expected, rtol=1e-5, atol=1e-6)
        n = len(idx)
        if n > 1:  # r_i − b_i = n/(n−1) (r_i − μ_g)
            np.testing.assert_allclose(REWARDS[idx] - b[idx], n / (n - 1) * (REWARDS[idx] - REWARDS[idx].mean()),
                                       rtol=1e-5, atol=1e-6)


def test_whiten_masked_moments():
    x = RNG.normal(3.0, 2.0, size=(4, 7)).astype(np.float32)
    m = (RNG.random((4, 7)) > 0.3).astype(np.float32)
    w = np.asarray(whiten(jnp.asarray(x), jnp.asarray(m)))
    on = m > 0
    assert abs(w[on].mean()) < 1e-5 and abs(w[on].std() - 1) < 1e-4 and (w[~on] == 0).all()


def test_whiten_without_spread_gives_zero_not_rounding_noise():
    """Equal masked entries: (x − mean)/(std + ε) read 0.856 for eight 0.7s (mean off by an ulp, std ≈ 6e-8),
    and rewards of 1.0 scaled by 1/ε became 1e8; now 0 with the mean shifted out, x itself without."""
    m = np.ones((1, 8), np.float32)
    np.testing.assert_array_equal(whiten(jnp.full((1, 8), 0.7), jnp.asarray(m)), np.zeros((1, 8)))
    np.testing.assert_array_equal(whiten(jnp.ones((2, 3)), jnp.ones((2, 3)), shift_mean=False), np.ones((2, 3)))
    # off the mask values differ, on it they are equal: still no spread; an empty mask gives zeros
    x, mk = jnp.array([[0.7, 5.0, 0.7]]), jnp.array([[1.0, 0.0, 1.0]])
    np.testing.assert_array_equal(whiten(x, mk), np.zeros((1, 3)))
    np.testing.assert_array_equal(whiten(x, jnp.zeros((1, 3))), np.zeros((1, 3)))
    # with spread, unchanged: (x − mean)/(std + ε) by hand
    np.testing.assert_allclose(whiten(jnp.array([[1.0, 3.0]]), jnp.ones((1, 2))), [[-1.0, 1.0]], rtol=1e-6)


def _naive_returns(r, m, gamma):
    out = np.zeros_like(r)
    for b in range(r.shape[0]):
        for t in range(r.shape[1]):
            out[b, t] = sum(gamma ** (k - t) * r[b, k] * m[b, k] for k in range(t, r.shape[1])) * m[b, t]
    return out


def _layout():
    """Rows: prompt (mask 0), completion (mask 1), padding (mask 0)."""
    m = np.zeros((3, 9), np.float32)
    m[0, 2:7], m[1, 4:9], m[2, 1:3] = 1, 1, 1
    return m


def test_discounted_returns_match_naive():
    m = _layout()
    r = RNG.normal(size=m.shape).astype(np.float32)
    for gamma in (1.0, 0.9):
        np.testing.assert_allclose(discounted_returns(jnp.asarray(r), jnp.asarray(m), gamma),
                                   _naive_returns(r, m, gamma), rtol=1e-5, atol=1e-5)


def _naive_gae(r, v, m, gamma, lam, tail):
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(m[b])
        a_next = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            v_next = v[b, idx[j + 1]] if j + 1 < len(idx) else tail[b]
            delta = r[b, t] + gamma * v_next - v[b, t]
            a_next = delta + gamma * lam * a_next
            adv[b, t] = a_next
    return adv


@pytest.mark.parametrize("gamma,lam,boot", [(1.0, 0.95, False), (0.9, 0.8, True), (1.0, 1.0, False),
                                            (0.99, 0.0, True)])
def test_gae_matches_naive_and_known_limits(gamma, lam, boot):
    m = _layout()
    r = RNG.normal(size=m.shape).astype(np.float32)
    v = RNG.normal(size=m.shape).astype(np.float32)
    tail = RNG.normal(size=3).astype(np.float32) if boot else np.zeros(3, np.float32)
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma=gamma, lam=lam,
                   bootstrap=jnp.asarray(tail) if boot else None)
    ref = _naive_gae(r, v, m, gamma, lam, tail)
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, (ref + v) * m, rtol=1e-5, atol=1e-5)
    if lam == 1.0 and not boot:  # A_t = G_t − V_t
        np.testing.assert_allclose(adv, (_naive_returns(r, m, gamma) - v) * m, rtol=1e-5, atol=1e-5)


def test_kl_estimators_known_answers():
    lp = jnp.asarray(RNG.normal(size=(3, 5)).astype(np.float32))
    for k in (kl_k1, kl_k2, kl_k3):
        assert float(jnp.abs(k(lp, lp)).max()) == 0.0  # π_θ = π_ref
    other = lp + jnp.asarray(RNG.normal(size=(3, 5)).astype(np.float32))
    assert float(kl_k3(lp, other).min()) >= 0.0
    # Monte-Carlo means of k1 and k3 converge to the true KL of two categoricals
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    true_kl = float((p * np.log(p / q)).sum())
    y = jax.random.choice(jax.random.key(0), 4, (200_000,), p=jnp.asarray(p))
    lp_s, lq_s = jnp.log(jnp.asarray(p))[y], jnp.log(jnp.asarray(q))[y]
    assert float(kl_k1(lp_s, lq_s).mean()) == pytest.approx(true_kl, abs=3e-3)
    assert float(kl_k3(lp_s, lq_s).mean()) == pytest.approx(true_kl, abs=3e-3)
    assert float(kl_k2(lp_s, lq_s).mean()) != pytest.approx(true_kl, abs=3e-3)  # k2 is biased here


def test_clipped_surrogate_cases_and_gradients():
    old = jnp.zeros((1, 5))
    lp = jnp.log(jnp.array([[1.0, 1.5, 0.5, 1.5, 0.5]]))
    adv = jnp.array([[2.0, 1.0, 1.0, -1.0, -1.0]])
    loss, clipped = clipped_surrogate(lp, old, adv, eps_low=0.2)
    # ρ = 1: −A; ρ = 1.5, A > 0: clipped to 1.2; ρ = 0.5, A > 0: min is 0.5·A (unclipped);
    # ρ = 1.5, A < 0: min is −1.5 (unclipped); ρ = 0.5, A < 0: clipped to −0.8
    np.testing.assert_allclose(loss, [[-2.0, -1.2, -0.5, 1.5, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[0, 1, 0, 0, 1]])
    g = jax.grad(lambda x: clipped_surrogate(x, old, adv)[0].sum())(lp)
    np.testing.assert_allclose(g, [[-2.0, 0.0, -0.5, 1.5, 0.0]], rtol=1e-6)  # clipped tokens: no gradient
    # clip-higher: ε_high = 0.6 lets ρ = 1.5 through for a positive advantage
    loss_hi, clipped_hi = clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.6)
    assert float(loss_hi[0, 1]) == pytest.approx(-1.5) and float(clipped_hi[0, 1]) == 0.0
    # at the first minibatch (ρ = 1) clipped and unclipped objectives and gradients agree
    a = jnp.asarray(RNG.normal(size=(2, 4)).astype(np.float32))
    x = jnp.asarray(RNG.normal(size=(2, 4)).astype(np.float32))
    g_clip = jax.grad(lambda z: clipped_surrogate(z, x, a)[0].sum())(x)
    g_plain = jax.grad(lambda z: (-jnp.exp(z - x) * a).sum())(x)
    np.testing.assert_allclose(g_clip, g_plain, rtol=1e-6)


def test_batch_std_scope_through_the_registry():
    """GroupAdvantageConfig(std_scope="batch") on the grpo entry: the estimator's advantages are the op's."""
    from rljax.algorithms import get_algorithm
    from rljax.estimators import GroupAdvantageConfig, group_estimate

    algo = get_algorithm("grpo").with_config(advantage=GroupAdvantageConfig(std_scope="batch"))
    assert algo.estimator.config.std_scope == "batch"

    class Inp:  # what group_estimate reads of a PrepareInput
        rewards = jnp.asarray(REWARDS)
        rollout = type("R", (), {"group_ids": jnp.asarray(GIDS)})

    est = group_estimate(Inp, algo.estimator.config)
    np.testing.assert_allclose(np.asarray(est.advantages),
                               np.asarray(group_advantages(jnp.asarray(REWARDS), jnp.asarray(GIDS), std_scope="batch")))
    with pytest.raises(ValueError, match="GroupAdvantageConfig.std_scope: 'group' or 'batch'"):
        GroupAdvantageConfig(std_scope="global")
