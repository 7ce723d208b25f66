"""Implicit rewards: inverse-propensity weighting on simulated clicks, and the implicit PRM."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rljax.data.arithmetic import make_split
from rljax.data.reward_collate import collate_feedback, collate_outcomes
from rljax.data.synthetic import KINDS, simulated_feedback
from rljax.losses.reward_model import FeedbackConfig, ImplicitPRMConfig, feedback_loss, implicit_prm_loss
from rljax.models import Model, preset
from rljax.models.logprobs import target_mask, token_logprobs
from rljax.ops.implicit_rewards import implicit_q, implicit_step_rewards, ipw_targets
from rljax.ops.ranking import binary_cross_entropy
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()


def test_inverse_propensity_weighting_is_unbiased_and_the_naive_estimate_is_not():
    train, _ = make_split(3000, 1, levels=(1, 2), seed=0)
    rows = simulated_feedback(train, 0)  # 15,000 displays, examined with probability 1 / position
    clicks = np.array([r["click"] for r in rows], np.float32)
    prop = np.array([r["propensity"] for r in rows], np.float32)
    rel = np.array([r["relevance"] for r in rows])
    ipw = np.asarray(ipw_targets(jnp.asarray(clicks), jnp.asarray(prop)))
    se = ipw.std() / np.sqrt(len(ipw))
    assert abs(ipw.mean() - rel.mean()) < 3 * se  # unbiased: within noise of the true mean relevance
    bias = clicks.mean() - rel.mean()
    assert bias < -20 * clicks.std() / np.sqrt(len(clicks))  # naive clicks: far below relevance
    np.testing.assert_allclose(clicks.mean(), (rel / np.array([r["position"] for r in rows])).mean(), atol=0.01)
    # a tabular logistic model per kind, fitted with feedback_loss's objective, converges to each kind's mean
    # target (the loss is linear in y): with IPW that mean is within noise of the kind's relevance, naive is far below
    kind = np.array([KINDS.index(r["kind"]) for r in rows])
    for ipw_on in (True, False):
        y = ipw if ipw_on else clicks
        loss = lambda z, y=jnp.asarray(y): binary_cross_entropy(z[kind], y).mean()  # noqa: E731
        z = jnp.zeros(len(KINDS))
        opt = optax.adam(0.1)
        st = opt.init(z)
        for _ in range(400):
            u, st = opt.update(jax.grad(loss)(z), st)
            z = optax.apply_updates(z, u)
        fitted = 1 / (1 + np.exp(-np.asarray(z)))
        np.testing.assert_allclose(fitted, [y[kind == k].mean() for k in range(len(KINDS))], atol=2e-3)
        for k in range(len(KINDS)):
            sel = kind == k
            se = y[sel].std() / np.sqrt(sel.sum())
            gap = fitted[k] - rel[sel].mean()
            assert abs(gap) < 3.5 * se if ipw_on else gap < -5 * se, (KINDS[k], ipw_on, gap, se)


def test_feedback_loss_by_hand_and_collation():
    from rljax.data.adapters import Interaction

    model = Model(preset("tiny", n_layers=1, heads=("reward",)))
    params = model.init(jax.random.key(0))
    params = {**params, "reward_head": jax.random.normal(jax.random.key(1), params["reward_head"].shape)}
    rows = [Interaction("1+1=", "2", click=True, position=2, propensity=0.5),
            Interaction("1+1=", "3", click=False, position=1, propensity=1.0),
            ("2*2=", "4", 1, 0.01)]
    b = collate_feedback(TOK, rows)
    hidden, _ = model.forward(params, b.tokens, b.attention_mask)
    r = np.asarray(model.rewards(params, hidden, b.attention_mask))
    sp = lambda x: np.log1p(np.exp(x))  # noqa: E731
    y = np.array([1 / 0.5, 0.0, 1 / 0.05])  # the last propensity is clipped at 0.05
    loss, _ = feedback_loss(params, b, model=model, cfg=FeedbackConfig())
    np.testing.assert_allclose(loss, np.mean(sp(r) - y * r), rtol=1e-5)
    naive, _ = feedback_loss(params, b, model=model, cfg=FeedbackConfig(ipw=False))
    np.testing.assert_allclose(naive, np.mean(sp(r) - np.array([1, 0, 1]) * r), rtol=1e-5)
    with pytest.raises(ValueError, match="row 0: no 'like' signal"):
        collate_feedback(TOK, rows, signal="like")
    with pytest.raises(ValueError, match="row 0: propensity must be in"):
        collate_feedback(TOK, [("p", "c", 1, 1.5)])


def test_implicit_step_rewards_sum_to_the_outcome_reward():
    rng = np.random.default_rng(0)
    lp, ref = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32), jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]])
    ends = jnp.array([[0, 0, 0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0, 0, 0]])
    beta = 0.1
    steps = np.asarray(implicit_step_rewards(lp, ref, mask, ends, beta))
    r = beta * np.sum((np.asarray(lp) - np.asarray(ref)) * np.asarray(mask), axis=1)
    np.testing.assert_allclose(steps.sum(axis=1), r, rtol=1e-5, atol=1e-6)
    assert np.all(steps[np.asarray(ends) == 0] == 0)
    d = beta * (np.asarray(lp) - np.asarray(ref)) * np.asarray(mask)
    np.testing.assert_allclose(steps[0, [3, 5, 6]], [d[0, 2:4].sum(), d[0, 4:6].sum(), d[0, 6]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(implicit_q(lp, ref, mask, beta))[:, -1], r, rtol=1e-5, atol=1e-6)


def test_implicit_prm_loss_by_hand_and_zero_at_the_reference():
    model = Model(preset("tiny", n_layers=1))
    ref_params = model.init(jax.random.key(0))
    ref_lp = lambda t, m: token_logprobs(ref_params, jnp.asarray(t), jnp.asarray(m), model=model)  # noqa: E731
    rows = [("1+1=", "2", 1), ("1+1=", "3;answer:3", 0.0), ("2*3=", "6", 1)]
    b = collate_outcomes(TOK, rows, ref_lp)
    cfg = ImplicitPRMConfig(beta=0.5)
    loss0, m0 = implicit_prm_loss(ref_params, b, model=model, cfg=cfg)
    np.testing.assert_allclose(loss0, np.log(2), rtol=1e-5)  # π_θ = π_ref: r = 0 for every completion
    params = model.init(jax.random.key(5))
    lp = np.asarray(token_logprobs(params, jnp.asarray(b.tokens), jnp.asarray(b.attention_mask), model=model))
    mask = np.asarray(target_mask(jnp.asarray(b.loss_mask), jnp.asarray(b.attention_mask)))
    r = 0.5 * ((lp - np.asarray(b.ref_logprobs)) * mask).sum(axis=1)
    y = np.array([1, 0, 1.0])
    loss, _ = implicit_prm_loss(params, b, model=model, cfg=cfg)
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(r)) - y * r), rtol=1e-5)
