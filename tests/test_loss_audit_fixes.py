"""The loss audit's findings, each checked against an answer computed another way: overflowing
importance ratios and KL estimates (closed forms), CISPO's cap (TRL's clamp), discounted returns
with holes in the mask (a naive loop), GAE's truncation bootstrap (a hand computation), and the
PPO epochs sentence of docs/algorithms.md."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, left_padded
from rljax.data.batch import PolicyBatch, Rollout
from rljax.estimators import GAEConfig, PrepareInput, actor_critic_targets, gae_estimate, truncation_bootstrap
from rljax.losses import (CISPOConfig, GRPOConfig, GSPOConfig, PPOConfig, ReinforceConfig, cispo_loss, grpo_loss,
                          gspo_loss, ppo_loss, reinforce_loss)
from rljax.models import Model, preset
from rljax.models.logprobs import token_logprobs
from rljax.ops.advantages import discounted_returns, gae
from rljax.ops.surrogates import clipped_is_weight, clipped_surrogate, sequence_clipped_surrogate

E20 = float(np.exp(np.float32(20.0)))  # e^20 in float32, the saturated ratio (LOG_RATIO_BOUND)


# ----------------------------------------------------------------------------- 1. overflowing ratios, kernels


def _surrogate_and_grad(d, a, eps_low=0.2, eps_high=0.28):
    """Per-token loss, clipped flag and d(loss)/d(log-ratio) of clipped_surrogate at log-ratios d."""
    old = jnp.zeros_like(d)

    def f(x):
        return clipped_surrogate(x, old, a, eps_low=eps_low, eps_high=eps_high)

    loss, clipped = f(d)
    return loss, clipped, jax.grad(lambda x: f(x)[0].sum())(d)


def test_clipped_surrogate_log_ratio_100_and_minus_100_match_closed_forms():
    """d = ℓ − ℓ_old = ±100, A = 1, 0, −1 (ε_low 0.2, ε_high 0.28), by cases of −min(ρA, clip(ρ)A):
    d = 100: A = 1 → −1.28, no gradient (the clip wins); A = 0 → 0; A = −1 → e^20 (the ratio saturates at
    the bound: dual-clip with c = e^20, no gradient; e^100 itself is inf in float32).
    d = −100: A = 1 → −e^−100 ≈ 0 with gradient −e^−100 ≈ 0; A = 0 → 0; A = −1 → 0.8 (the clip wins)."""
    d = jnp.array([[100.0, 100.0, 100.0, -100.0, -100.0, -100.0]])
    a = jnp.array([[1.0, 0.0, -1.0, 1.0, 0.0, -1.0]])
    loss, clipped, g = _surrogate_and_grad(d, a)
    assert bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(jnp.isfinite(g)))
    tiny = np.exp(-100.0)
    np.testing.assert_allclose(loss[0], [-1.28, 0.0, E20, -tiny, 0.0, 0.8], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(g[0], [0.0, 0.0, 0.0, -tiny, 0.0, 0.0], atol=1e-30)
    np.testing.assert_array_equal(clipped[0], [1, 0, 1, 0, 0, 1])


def _unbounded_surrogate(lp, old, a, eps_low, eps_high):
    """The kernel as it was before the bound: exp of the raw log-ratio."""
    ratio = jnp.exp(lp - old)
    return -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * a)


def test_clipped_surrogate_is_bit_for_bit_the_unbounded_one_where_that_is_finite():
    """A ≥ 0 at any log-ratio up to 80, and A < 0 up to the bound 20: loss and gradient identical."""
    rng = np.random.default_rng(0)
    d = jnp.asarray(rng.uniform(-80, 80, (4, 64)).astype(np.float32))
    a = jnp.asarray(np.abs(rng.normal(size=(4, 64))).astype(np.float32) * (rng.random((4, 64)) > 0.2))
    old = jnp.zeros_like(d)
    for dd, aa in ((d, a), (jnp.clip(d, -80, 20), -a)):
        new = clipped_surrogate(dd, old, aa, eps_low=0.2, eps_high=0.28)[0]
        ref = _unbounded_surrogate(dd, old, aa, 0.2, 0.28)
        np.testing.assert_array_equal(new, ref)
        g_new = jax.grad(lambda x: clipped_surrogate(x, old, aa, eps_low=0.2, eps_high=0.28)[0].sum())(dd)
        g_ref = jax.grad(lambda x: _unbounded_surrogate(x, old, aa, 0.2, 0.28).sum())(dd)
        np.testing.assert_array_equal(g_new, g_ref)
    # the unbounded kernel is NaN where the bounded one is not (the audit's finding)
    assert bool(jnp.isnan(_unbounded_surrogate(jnp.float32(100.0), 0.0, 0.0, 0.2, 0.2)))


def test_sequence_clipped_surrogate_mean_log_ratio_100_and_minus_100():
    """GSPO with every token's log-ratio ±100 (mean ±100) and an inf old log-prob off the mask: the same
    closed forms per sequence as the token kernel (ε_low 3e-4, ε_high 4e-4)."""
    mask = jnp.array([[0.0, 1.0, 1.0]] * 6)
    d = jnp.array([[0.0, 100.0, 100.0]] * 3 + [[0.0, -100.0, -100.0]] * 3)
    old = jnp.where(mask > 0, 0.0, -jnp.inf)  # off the mask: selected out, not multiplied by 0
    a = jnp.array([1.0, 0.0, -1.0, 1.0, 0.0, -1.0])

    def f(x):
        return sequence_clipped_surrogate(x, old, a, mask, eps_low=3e-4, eps_high=4e-4)

    loss, clipped = f(d)
    g = jax.grad(lambda x: f(x)[0].sum())(d)
    assert bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(loss, [-1.0004, 0.0, E20, -np.exp(-100.0), 0.0, 1 - 3e-4], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(g, np.zeros((6, 3)), atol=1e-30)
    np.testing.assert_array_equal(clipped, [1, 0, 1, 0, 0, 1])


# ----------------------------------------------------------------------------- 1. overflowing ratios, losses


@pytest.fixture(scope="module")
def micro():
    """(model, params): the tiny preset with one layer, enough for per-token checks."""
    model = Model(preset("tiny", n_layers=1))
    return model, jax.jit(model.init)(jax.random.key(0))


@pytest.fixture(scope="module")
def extreme(micro):
    """A batch with in-mask log-ratios ±100 and, off the mask, ℓ_old = −200 (ratio e^200) and ℓ_ref = 100
    (k3 = e^100): rows 0..3 carry one extreme token each (A = 1 / 0 at +100, A = −1 / 1 at −100)."""
    model, params = micro
    tokens, attn = left_padded([9, 9, 7, 7, 5, 4], 10, 64, seed=3)
    loss_mask = attn.copy()
    loss_mask[:, :6] = 0
    lp = np.asarray(jax.jit(functools.partial(token_logprobs, model=model))(params, tokens, attn))
    m = (loss_mask[:, 1:] * attn[:, 1:] * attn[:, :-1]).astype(np.float32)
    first = [int(np.flatnonzero(m[i])[0]) for i in range(6)]
    adv = np.array([1.0, 0.0, -1.0, 1.0, 0.5, -0.5], np.float32)
    shift = np.zeros_like(lp)
    for i, s in zip(range(4), (100.0, 100.0, -100.0, -100.0)):
        shift[i, first[i]] = s  # log-ratio ℓ − ℓ_old = s at the row's first completion token
    old = np.where(m > 0, lp - shift, -200.0).astype(np.float32)
    ref = np.where(m > 0, lp + np.random.default_rng(1).normal(0, 0.3, lp.shape), 100.0).astype(np.float32)
    extreme = (shift != 0) & (m > 0)
    return dict(tokens=tokens, attn=attn, loss_mask=loss_mask, lp=lp, m=m, old=old, ref=ref, adv=adv,
                extreme=extreme)


def _batch(e, adv=None, **changes):
    b = PolicyBatch(tokens=e["tokens"], attention_mask=e["attn"], loss_mask=e["loss_mask"], old_logprobs=e["old"],
                    advantages=e["adv"] if adv is None else adv, rewards=e["adv"],
                    group_ids=np.array([0, 0, 1, 1, 2, 2]), ref_logprobs=e["ref"])
    return b.replace(**changes) if changes else b


@functools.partial(jax.jit, static_argnames=("loss", "model", "cfg"))
def _value_and_grad(params, batch, *, loss, model, cfg):
    (value, metrics), g = jax.value_and_grad(lambda p: loss(p, batch, model=model, cfg=cfg), has_aux=True)(params)
    return value, metrics, g


def _finite_tree(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _assert_trees_close(g, g_ref):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-7), g, g_ref)


def _ordinary_surrogate_sum(params, e, adv_tok, model):
    """Σ over the in-mask tokens with ℓ_old = ℓ (ratio ≈ 1, inside every clip range) of −ρ A: the only
    tokens with a gradient; the extreme ones add constants (−1.28·1, 0·…, −e^−100, and 0.8 at A = −1)."""
    lp = token_logprobs(params, e["tokens"], e["attn"], model=model)
    on = jnp.asarray((e["m"] > 0) & ~e["extreme"])
    # the exponent is selected first: where(on, exp(…), 0) would still give 0·inf = NaN in the gradient
    return jnp.where(on, -jnp.exp(jnp.where(on, lp - e["old"], 0.0)) * adv_tok, 0.0).sum()


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_clip_losses_with_overflowing_ratios_and_a_zero_kl_coef_match_the_closed_form(micro, extreme, kind):
    """token_mean of the per-token closed forms: (Σ_ordinary −ρA − 1.28 + 0 + 0.8 − e^−100)/N with N the
    completion tokens, and its gradient; finite although in-mask ratios are e^±100, off-mask ones e^200, and
    GRPO's k3 is e^100 off the mask (kl_coef 0: the estimate adds exactly 0)."""
    model, params = micro
    e = extreme
    n = e["m"].sum()
    adv_tok = e["adv"][:, None] * e["m"]
    if kind == "grpo":
        cfg, loss_fn, batch = GRPOConfig(kl_coef=0.0, eps_high=0.28, aggregation="token_mean"), grpo_loss, _batch(e)
    else:  # per-token advantages; the tiny model has no value head, so the loss is the actor's alone
        cfg, loss_fn, batch = PPOConfig(eps=0.2), ppo_loss, _batch(e, adv=adv_tok)
    hi = 1.28 if kind == "grpo" else 1.2
    value, metrics, g = _value_and_grad(params, batch, loss=loss_fn, model=model, cfg=cfg)
    assert np.isfinite(float(value)) and _finite_tree(g)
    ordinary = jax.jit(_ordinary_surrogate_sum, static_argnames="model")
    const = -hi * 1.0 + 0.8 - np.exp(-100.0)
    assert float(value) == pytest.approx((float(ordinary(params, e, adv_tok, model)) + const) / n, rel=1e-5)
    g_ref = jax.jit(jax.grad(lambda p: ordinary(p, e, adv_tok, model) / n))(params)
    _assert_trees_close(g, g_ref)
    # the clipped tokens: row 0 (A > 0 past 1 + ε_high) and row 2 (A < 0 below 1 − ε_low)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / n)


def test_kl_terms_are_zero_off_the_mask_and_with_a_zero_coefficient(micro, extreme):
    """Off-mask ℓ_ref − ℓ ≈ 100 (k3 = inf there before the fix): with β = 0.04 (plain and ρ-weighted k3)
    the loss is the naive in-mask sum; with β = 0 and an in-mask k3 of e^100 it equals the loss without
    a reference exactly, and the metrics stay finite where the mask keeps the overflow out."""
    model, params = micro
    e = dict(extreme)
    # in-mask log-ratios 0 here, so ρ·k3 stays finite; off the mask the overflows stay
    e["old"] = np.where(e["m"] > 0, e["lp"], -200.0).astype(np.float32)
    e["extreme"] = np.zeros_like(e["extreme"])
    n = e["m"].sum()
    adv_tok = e["adv"][:, None] * e["m"]
    on = jnp.asarray(e["m"] > 0)

    def naive(p, weighted):
        lp = token_logprobs(p, e["tokens"], e["attn"], model=model)
        d = jnp.where(on, e["ref"] - lp, 0.0)  # selected before exp, as above
        k3 = jnp.expm1(d) - d
        rho = jnp.exp(jnp.where(on, lp - e["old"], 0.0))
        kl = rho * k3 if weighted else k3
        return jnp.where(on, -rho * adv_tok + 0.04 * kl, 0.0).sum() / n

    for weighted in (False, True):
        cfg = GRPOConfig(kl_coef=0.04, aggregation="token_mean", kl_ratio_weighted=weighted)
        value, metrics, g = _value_and_grad(params, _batch(e), loss=grpo_loss, model=model, cfg=cfg)
        assert float(value) == pytest.approx(float(jax.jit(naive, static_argnums=1)(params, weighted)), rel=1e-5)
        _assert_trees_close(g, jax.jit(jax.grad(naive), static_argnums=1)(params, weighted))
        assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    # β = 0 with an in-mask k3 of e^100 (ℓ_ref − ℓ = 100 at one completion token): exactly the reference-free loss
    ref = e["ref"].copy()
    ref[4, np.flatnonzero(e["m"][4])[0]] += 100.0
    for loss_fn, cfg in ((grpo_loss, GRPOConfig(kl_coef=0.0, aggregation="token_mean")),
                         (reinforce_loss, ReinforceConfig()), (cispo_loss, CISPOConfig())):
        with_ref = _value_and_grad(params, _batch(e, ref_logprobs=ref), loss=loss_fn, model=model, cfg=cfg)
        without = _value_and_grad(params, _batch(e, ref_logprobs=None), loss=loss_fn, model=model, cfg=cfg)
        # two programs (the reference one also computes the KL metrics): equal up to XLA's fusion rounding
        assert np.isfinite(float(with_ref[0])) and _finite_tree(with_ref[2])
        assert float(with_ref[0]) == pytest.approx(float(without[0]), rel=1e-6)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7), with_ref[2], without[2])
    # the penalty itself is exactly 0 at β = 0, the overflowing in-mask k3 included; at β > 0 it is 0 off the mask
    from rljax.losses.policy_gradient import _kl_terms
    lp, m = jnp.asarray(e["lp"]), jnp.asarray(e["m"])
    zero, metrics = _kl_terms(lp, _batch(e, ref_logprobs=ref), GRPOConfig(kl_coef=0.0), m)
    np.testing.assert_array_equal(zero, np.zeros_like(e["lp"]))
    assert np.isinf(float(metrics["kl_k3"]))  # the in-mask overflow shows in the metric, never as NaN
    pen, _ = _kl_terms(lp, _batch(e, ref_logprobs=ref), GRPOConfig(kl_coef=0.04), m)
    np.testing.assert_array_equal(np.asarray(pen)[e["m"] == 0], 0.0)


def test_gspo_row_with_mean_log_ratio_100_is_the_constant_clip_term(micro, extreme):
    """A row whose every token has ℓ − ℓ_old = 100 and A = 1: its term is −(1 + ε_high)·A, constant.
    So the loss is that of the batch with the row's A = 0 (term 0) plus −(1 + ε_high)/rows, and the
    gradients are equal."""
    model, params = micro
    e = extreme
    m = e["m"]
    old = np.where(m > 0, e["lp"] + np.random.default_rng(2).normal(0, 0.01, m.shape), -200.0).astype(np.float32)
    old[0] = np.where(m[0] > 0, e["lp"][0] - 100.0, -200.0)
    cfg = GSPOConfig()
    value, _, g = _value_and_grad(params, _batch(e, old_logprobs=old), loss=gspo_loss, model=model, cfg=cfg)
    assert np.isfinite(float(value)) and _finite_tree(g)
    adv0 = e["adv"].copy()
    adv0[0] = 0.0
    old0 = old.copy()
    old0[0] = np.where(m[0] > 0, e["lp"][0], 0.0)
    v0, _, g0 = _value_and_grad(params, _batch(e, adv=adv0, old_logprobs=old0), loss=gspo_loss, model=model, cfg=cfg)
    assert float(value) == pytest.approx(float(v0) - (1 + cfg.eps_high) * 1.0 / 6, rel=1e-5)
    _assert_trees_close(g, g0)


# ----------------------------------------------------------------------------- 2. CISPO's cap


def test_cispo_default_cap_is_five_as_trl_clamps_it():
    """TRL's cispo weight is min(ρ, epsilon_high) with epsilon_high = 5; ours is clip(ρ, ·, 1 + ε_high)."""
    cfg = CISPOConfig()
    assert cfg.eps_high == 4.0
    from rljax.algorithms import ALGORITHMS
    assert ALGORITHMS["cispo"].loss.config.eps_high == 4.0
    log_ratio = np.array([[-1.0, 0.0, 1.0, np.log(5.0) - 1e-3, 3.0, 100.0]], np.float32)
    w, clipped = clipped_is_weight(jnp.asarray(log_ratio), jnp.zeros_like(log_ratio), eps_low=cfg.eps_low,
                                   eps_high=cfg.eps_high)
    trl = np.minimum(np.exp(log_ratio.astype(np.float64)), 5.0)  # torch.clamp(coef_1, max=epsilon_high)
    np.testing.assert_allclose(w, trl, rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[0, 0, 0, 0, 1, 1]])


# ----------------------------------------------------------------------------- 3. discounted returns with holes


def _naive_returns_over_masked(r, m, gamma):
    """G at each masked position: Σ_j γ^j r over the row's masked positions from it on, in order."""
    out = np.zeros_like(r, dtype=np.float64)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(m[b])
        for j, t in enumerate(idx):
            out[b, t] = sum(gamma ** i * r[b, k] for i, k in enumerate(idx[j:]))
    return out


def _holes():
    """Rows: prompt, completion with holes, padding; one row with a hole at its end and one empty."""
    m = np.zeros((4, 10), np.float32)
    m[0, [2, 3, 5, 8, 9]] = 1
    m[1, [1, 4, 5, 6]] = 1
    m[2, [0, 9]] = 1
    return m


def test_discounted_returns_discount_once_per_masked_token_across_holes():
    m = _holes()
    r = np.random.default_rng(3).normal(size=m.shape).astype(np.float32)
    for gamma in (1.0, 0.9, 0.5):
        np.testing.assert_allclose(discounted_returns(jnp.asarray(r), jnp.asarray(m), gamma),
                                   _naive_returns_over_masked(r, m, gamma), rtol=1e-5, atol=1e-6)
    # by hand, row 2 (positions 0 and 9, eight unmasked between): G_0 = r_0 + γ r_9, not r_0 + γ^9 r_9
    g = discounted_returns(jnp.asarray(r), jnp.asarray(m), 0.5)
    assert float(g[2, 0]) == pytest.approx(r[2, 0] + 0.5 * r[2, 9], rel=1e-6)


def test_gae_with_lambda_one_is_returns_minus_values_with_holes():
    """GAE skips unmasked positions; discounted_returns now does too, so A = G − V and R = G (λ = 1)
    hold with holes in the mask (before, G discounted by γ^9 across row 2's gap, GAE by γ)."""
    m = _holes()
    rng = np.random.default_rng(4)
    r = rng.normal(size=m.shape).astype(np.float32)
    v = rng.normal(size=m.shape).astype(np.float32)
    gamma = 0.9
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma=gamma, lam=1.0)
    g = discounted_returns(jnp.asarray(r), jnp.asarray(m), gamma)
    np.testing.assert_allclose(adv, (np.asarray(g) - v) * m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, np.asarray(g) * m, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 4. GAE's truncation bootstrap


def _rollout(stopped):
    """Two rows, T = 5: prompt tokens 0-1, completion tokens 2-4, i.e. target mask [0, 1, 1, 1]."""
    R = len(stopped)
    loss_mask = np.tile(np.array([0, 0, 1, 1, 1], np.int32), (R, 1))
    return Rollout(tokens=np.full((R, 5), 7, np.int32), attention_mask=np.ones((R, 5), np.int32), loss_mask=loss_mask,
                   logprobs=np.zeros((R, 4), np.float32), sampling_logprobs=np.zeros((R, 4), np.float32),
                   lengths=np.full(R, 3), stopped_at_eos=np.asarray(stopped), group_ids=np.arange(R), prompt_length=2)


def test_gae_bootstraps_a_truncated_row_with_its_last_value():
    """γ = 0.9, λ = 0.5, r = (0, 0, 1) on the completion, V = (0.5, 1, 2); by hand:
    truncated (tail V_last = 2):  δ = (0.4, 0.8, 1 + 1.8 − 2 = 0.8), A = (0.922, 1.16, 0.8);
    finished  (tail 0):           δ = (0.4, 0.8, −1),               A = (0.5575, 0.35, −1)."""
    values = np.array([[0.0, 0.5, 1.0, 2.0]] * 2, np.float32)
    rewards = np.array([1.0, 1.0], np.float32)
    cfg = GAEConfig(gamma=0.9, lam=0.5, kl_coef=0.0, whiten_advantages=False, bootstrap_truncated=True)
    est = gae_estimate(PrepareInput(rollout=_rollout([False, True]), rewards=rewards, values=values), cfg)
    want = np.array([[0.0, 0.922, 1.16, 0.8], [0.0, 0.5575, 0.35, -1.0]])
    np.testing.assert_allclose(est.advantages, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(est.returns, (want + values) * [0, 1, 1, 1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(truncation_bootstrap(values, np.array([[0, 1, 1, 1]] * 2), np.array([False, True])),
                               [2.0, 0.0])
    # off (the default): both rows take V = 0 after the last token, as the finished one does
    off = gae_estimate(PrepareInput(rollout=_rollout([False, True]), rewards=rewards, values=values),
                       GAEConfig(gamma=0.9, lam=0.5, kl_coef=0.0, whiten_advantages=False))
    np.testing.assert_allclose(off.advantages, [want[1], want[1]], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"GAEConfig.bootstrap_truncated: actor_critic_targets needs stopped="):
        actor_critic_targets(rewards, values, np.zeros((2, 4)), None, np.array([[0, 1, 1, 1]] * 2), cfg)


# ----------------------------------------------------------------------------- 5. PPO's epochs


def test_ppo_epochs_sentence_is_in_the_docs_and_runs():
    from rljax.rl import RLConfig

    with open(os.path.join(ROOT, "docs", "algorithms.md")) as f:
        assert 'RLConfig(algorithm="ppo", epochs=4)' in f.read()
    assert RLConfig(algorithm="ppo", epochs=4).epochs == 4 and RLConfig(algorithm="ppo").epochs == 1
