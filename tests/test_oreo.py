"""OREO kernels and losses against the closed forms of docs/algorithms.md (bandit and two-step chain),
the gradient identities and stop-gradients, the exact KL, and the joint step's update order."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rljax.data.batch import OREOBatch
from rljax.losses import actor_critic as _actor_critic
from rljax.losses import oreo as _oreo
from rljax.losses.oreo import OREOConfig, oreo_value_loss
from rljax.models import Model, preset
from rljax.models import logprobs as _logprobs
from rljax.ops.soft_bellman import (first_completion_token, oreo_policy_residuals, oreo_value_residuals, suffix_sums)
from rljax.oreo_training import create_oreo_state, make_oreo_step, value_model_of, value_params_from
from rljax.state import OptimizerConfig, make_train_step

LOG_HALF = math.log(0.5)
# Jitted once per shape and config: run op by op (eagerly), the model's forward, losses and their
# gradients took most of this file's time.
oreo_policy_loss = jax.jit(_oreo.oreo_policy_loss, static_argnames=("model", "cfg"))
oreo_policy_terms = jax.jit(_oreo.oreo_policy_terms, static_argnames=("model", "cfg"))
token_values = jax.jit(_actor_critic.token_values, static_argnames=("model",))
head_token_kl = jax.jit(_logprobs.head_token_kl, static_argnames=("model", "chunk_size"))
forward = jax.jit(lambda params, tokens, mask, model: model.forward(params, tokens, mask)[0], static_argnames="model")
logits_of = jax.jit(lambda params, hidden, model: model.logits(params, hidden), static_argnames="model")
full_logits = jax.jit(lambda params, tokens, mask, model: model(params, tokens, mask), static_argnames="model")


def test_bandit_value_trained_on_exact_log_ratios_is_v_star():
    """One action, R = 1 for "correct" (π_ref = p), 0 otherwise; ℓ* = log π*/π_ref with
    π* ∝ π_ref e^{R/β}. Fitting V by gradient descent on the value loss over rows drawn
    from π_ref converges to V* = β log(1 − p + p e^{1/β}) (β = 1, p = 0.5: 0.620115)."""
    beta, p = 1.0, 0.5
    Z = 1 - p + p * math.exp(1 / beta)
    pi_star = p * math.exp(1 / beta) / Z
    assert pi_star == pytest.approx(0.731059, abs=1e-6)
    ell = jnp.array([[math.log(pi_star / p)], [math.log((1 - pi_star) / (1 - p))]], jnp.float32)
    rewards, mask = jnp.array([1.0, 0.0]), jnp.ones((2, 1))

    def loss(v):
        res = oreo_value_residuals(jnp.full((2, 1), v), ell, rewards, mask, beta=beta)
        return jnp.mean(res**2)  # rows weighted by π_ref: p = 0.5 each

    v, opt = jnp.float32(0.0), optax.sgd(0.5)
    state = opt.init(v)

    @jax.jit
    def update(v, state):
        upd, state = opt.update(jax.grad(loss)(v), state)
        return optax.apply_updates(v, upd), state

    for _ in range(200):
        v, state = update(v, state)
    assert float(v) == pytest.approx(0.620115, abs=1e-5)
    assert float(v) == pytest.approx(beta * math.log(Z), abs=1e-5)


def _chain():
    """The two-step chain: paths AA, AB, BA, BB with R = 1 only for AA, β = 1, uniform
    π_ref. Returns V*, π* and the per-path arrays [4, 2] (values, log-ratios) and rewards."""
    v_a, v_b = math.log(0.5 * math.e + 0.5), 0.0
    v_root = math.log(math.e / 4 + 3 / 4)
    pi_root_a = 0.5 * math.exp(v_a - v_root)
    pi_a_a = 0.5 * math.exp(1.0 - v_a)  # from s = A, action A earns R = 1
    pi_b_a = 0.5
    paths = ["AA", "AB", "BA", "BB"]

    def pi(state, action):
        pa = {"": pi_root_a, "A": pi_a_a, "B": pi_b_a}[state]
        return pa if action == "A" else 1 - pa

    values = np.array([[v_root, v_a if p[0] == "A" else v_b] for p in paths], np.float32)
    ell = np.array([[math.log(pi("", p[0]) / 0.5), math.log(pi(p[0], p[1]) / 0.5)] for p in paths], np.float32)
    rewards = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
    return dict(v_a=v_a, v_root=v_root, pi_root_a=pi_root_a), values, ell, rewards


def test_two_step_chain_closed_form_has_zero_residuals_and_minimises_the_losses():
    consts, values, ell, rewards = _chain()
    assert consts["v_a"] == pytest.approx(0.620115, abs=1e-6)
    assert consts["v_root"] == pytest.approx(0.357374, abs=1e-6)
    assert consts["pi_root_a"] == pytest.approx(0.650245, abs=1e-6)
    mask = jnp.ones((4, 2))
    v, lr, r = map(jnp.asarray, (values, ell, rewards))
    np.testing.assert_allclose(oreo_value_residuals(v, lr, r, mask, beta=1.0), 0.0, atol=1e-6)
    for starts in (mask, first_completion_token(mask)):  # token level (= step level here) and response level
        np.testing.assert_allclose(oreo_policy_residuals(v, lr, r, mask, starts, beta=1.0), 0.0, atol=1e-6)

    # A tabular model: V per state, π(A|s) = sigmoid(logit_s); the losses' gradient is 0 at (V*, π*)
    # and the loss grows away from it.
    state_of = np.array([[0, 1], [0, 1], [0, 2], [0, 2]])  # root, A, B
    took_a = jnp.asarray([[p[0] == "A", p[1] == "A"] for p in ["AA", "AB", "BA", "BB"]])

    @jax.jit
    def losses(table):
        vs, logits = table[:, 0], table[:, 1]
        val = vs[state_of]
        log_pa = jax.nn.log_sigmoid(logits[state_of])
        log_pb = jax.nn.log_sigmoid(-logits[state_of])
        ratio = jnp.where(took_a, log_pa, log_pb) - LOG_HALF
        lv = jnp.mean(oreo_value_residuals(val, ratio, r, mask, beta=1.0) ** 2)
        lp = jnp.mean(oreo_policy_residuals(val, ratio, r, mask, mask, beta=1.0) ** 2)
        return lv + lp

    logit = lambda q: math.log(q / (1 - q))  # noqa: E731
    star = jnp.array([[consts["v_root"], logit(consts["pi_root_a"])],
                      [consts["v_a"], logit(0.5 * math.exp(1 - consts["v_a"]))], [0.0, 0.0]], jnp.float32)
    assert float(losses(star)) == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(jax.jit(jax.grad(losses))(star), 0.0, atol=1e-5)
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert float(losses(star + 0.1 * rng.standard_normal(star.shape).astype(np.float32))) > 1e-4


def test_policy_gradient_is_two_beta_over_t_sum_delta_grad_logpi():
    """L = (1/T) Σ_t δ_t², δ_t = sg V_t − R + β ℓ_t + sg β Σ_{i>t} ℓ_i:
    ∇L = (2β/T) Σ_t δ_t ∇log π(a_t)."""
    rng = np.random.default_rng(1)
    T, V, beta = 6, 5, 0.3
    logits = jnp.asarray(rng.standard_normal((T, V)), jnp.float32)
    actions = jnp.asarray(rng.integers(0, V, T))
    ref = jnp.asarray(rng.standard_normal(T) - 1.6, jnp.float32)
    values = jnp.asarray(rng.standard_normal(T), jnp.float32)
    mask = jnp.ones((1, T))

    def log_pi(lg):
        return jax.nn.log_softmax(lg)[jnp.arange(T), actions]

    def loss(lg):
        res = oreo_policy_residuals(values[None], (log_pi(lg) - ref)[None], jnp.array([1.0]), mask, mask, beta=beta)
        return jnp.mean(res**2)

    delta = oreo_policy_residuals(values[None], (log_pi(logits) - ref)[None], jnp.array([1.0]), mask, mask,
                                  beta=beta)[0]
    per_token = jax.jit(jax.jacobian(log_pi))(logits)  # [T, T, V]
    expected = 2 * beta / T * jnp.einsum("t,tiv->iv", delta, per_token)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(logits), expected, rtol=1e-5, atol=1e-6)


def test_stop_gradients_future_log_ratios_values_and_steps():
    rng = np.random.default_rng(2)
    B, T, beta = 2, 7, 0.5
    v = jnp.asarray(rng.standard_normal((B, T)), jnp.float32)
    lr = jnp.asarray(rng.standard_normal((B, T)), jnp.float32)
    r = jnp.array([1.0, 0.0])
    mask = jnp.asarray(np.array([[0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]]), jnp.float32)
    # value residuals: identity in V, nothing in ℓ
    jv, jl = jax.jit(jax.jacobian(lambda a, b: oreo_value_residuals(a, b, r, mask, beta=beta), argnums=(0, 1)))(v, lr)
    np.testing.assert_allclose(jnp.einsum("btbt->bt", jv), mask)
    np.testing.assert_allclose(jl, 0.0)
    # token-level policy residuals: β on the own token only, nothing through V
    jv, jl = jax.jit(jax.jacobian(lambda a, b: oreo_policy_residuals(a, b, r, mask, mask, beta=beta),
                                  argnums=(0, 1)))(v, lr)
    np.testing.assert_allclose(jv, 0.0)
    expected = beta * jnp.einsum("bt,bc,ts->btcs", mask, jnp.eye(B), jnp.eye(T))
    np.testing.assert_allclose(jl, expected, atol=1e-6)
    # step level: steps start at 1 and 4 (row 0) and 2, 3, 6 (row 1); gradient only through the step's tokens
    starts = jnp.asarray(np.array([[0, 1, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1]]), jnp.float32)
    res = oreo_policy_residuals(v, lr, r, mask, starts, beta=beta)
    jl = jax.jit(jax.jacobian(lambda b: oreo_policy_residuals(v, b, r, mask, starts, beta=beta)))(lr)
    steps = {0: {1: [1, 2, 3], 4: [4, 5]}, 1: {2: [2], 3: [3, 4, 5], 6: [6]}}
    S = np.asarray(suffix_sums(lr, mask))
    for b, row in steps.items():
        for t in range(T):
            want = np.zeros((B, T))
            if t in row:
                want[b, row[t]] = beta
                after = S[b, row[t][-1] + 1] if row[t][-1] + 1 < T else 0.0
                own = float(np.asarray(lr)[b, row[t]].sum())
                np.testing.assert_allclose(res[b, t], v[b, t] - r[b] + beta * (own + after), rtol=1e-5, atol=1e-6)
            else:
                assert float(res[b, t]) == 0.0
            np.testing.assert_allclose(jl[b, t], want, atol=1e-6)


@pytest.fixture(scope="module")
def small():
    # one layer: every check here is per token or per parameter, so depth adds compile time only
    model = Model(preset("tiny", n_layers=1))
    return model, jax.jit(model.init)(jax.random.key(0))  # eager init compiles op by op


def _batch(model, seed=0, B=4, T=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, model.config.vocab_size, (B, T)).astype(np.int32)
    lengths = rng.integers(T // 2, T + 1, B)
    attn = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    loss = attn * (np.arange(T)[None] >= 4)
    starts = loss * (rng.random((B, T)) < 0.3)
    starts[:, 4] = 1
    return OREOBatch(tokens=jnp.asarray(tokens * attn), attention_mask=jnp.asarray(attn),
                     loss_mask=jnp.asarray(loss.astype(np.int32)),
                     rewards=jnp.asarray(rng.integers(0, 2, B), jnp.float32),
                     step_starts=jnp.asarray(starts.astype(np.int32)))


def test_exact_kl_matches_full_vocabulary_and_chunking(small):
    model, params = small
    other = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), params)
    b = _batch(model)
    h = forward(params, b.tokens, b.attention_mask, model=model)
    rh = forward(other, b.tokens, b.attention_mask, model=model)
    out = head_token_kl(params, h, other, rh, b.tokens, model=model)
    p = jax.nn.log_softmax(logits_of(params, h, model=model))
    q = jax.nn.log_softmax(logits_of(other, rh, model=model))
    np.testing.assert_allclose(out["kl"], np.sum(np.exp(p) * (p - q), -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["logprobs"], np.take_along_axis(p, b.tokens[..., None], -1)[..., 0], rtol=1e-6)
    chunked = head_token_kl(params, h, other, rh, b.tokens, model=model, chunk_size=5)
    for k in out:
        np.testing.assert_allclose(chunked[k], out[k], rtol=1e-5, atol=1e-6)


def test_policy_loss_equals_naive_reference(small):
    """The loss from the model equals one written from full logits with the formulas above."""
    model, params = small
    ref = jax.tree.map(lambda x: x + 0.03 * jax.random.normal(jax.random.key(4), x.shape), params)
    b = _batch(model, seed=1)
    values = jnp.asarray(np.random.default_rng(5).standard_normal((4, 15)), jnp.float32)
    p = np.asarray(jax.nn.log_softmax(full_logits(params, b.tokens, b.attention_mask, model=model)))[:, :-1]
    q = np.asarray(jax.nn.log_softmax(full_logits(ref, b.tokens, b.attention_mask, model=model)))[:, :-1]
    for level in ("token", "step", "response"):
        for est in ("exact", "k3"):
            cfg = OREOConfig(beta=0.1, level=level, kl_estimator=est)
            loss, _ = oreo_policy_loss(params, b.replace(values=values), model=model, cfg=cfg, ref_params=ref)
            y = np.asarray(b.tokens)[:, 1:]
            lp = np.take_along_axis(p, y[..., None], -1)[..., 0]
            lq = np.take_along_axis(q, y[..., None], -1)[..., 0]
            m = np.asarray(b.loss_mask)[:, 1:] * np.asarray(b.attention_mask)[:, 1:]
            st = {"token": m, "step": np.asarray(b.step_starts)[:, 1:] * m,
                  "response": m * (np.cumsum(m, 1) == 1)}[level]
            kl = np.sum(np.exp(p) * (p - q), -1) if est == "exact" else np.expm1(lq - lp) - (lq - lp)
            total = 0.0
            for i in range(4):
                ell = (lp[i] - lq[i]) * m[i]
                idx = np.flatnonzero(st[i])
                bounds = list(idx[1:]) + [len(ell)]
                res = [float(values[i, t]) - float(b.rewards[i]) + 0.1 * ell[t:].sum() for t, e in zip(idx, bounds)]
                total += np.mean(np.square(res)) + cfg.alpha * (kl[i] * m[i]).sum() / m[i].sum()
            assert float(loss) == pytest.approx(total / 4, rel=1e-4), (level, est)


def test_value_model_starts_at_zero_without_the_lm_head(small):
    model, params = small
    vp = value_params_from(model, params)
    vm = value_model_of(model)
    assert "lm_head" not in vp and vm.config.heads == ("value",)
    b = _batch(model)
    np.testing.assert_array_equal(token_values(vp, b.tokens, b.attention_mask, model=vm), 0.0)
    np.testing.assert_array_equal(vp["layers"]["attn"]["q_proj"], params["layers"]["attn"]["q_proj"])


def test_joint_step_equals_two_calls_with_pre_update_quantities(small):
    """The actor uses the values before the critic's update, the critic the log-ratios before
    the actor's: the same as two separate train steps fed those quantities."""
    model, params = small
    cfg = OREOConfig(beta=0.1, level="step")
    opt = OptimizerConfig(lr=1e-3, schedule="constant")
    b = _batch(model, seed=2)
    _, state = create_oreo_state(model, params, opt, jax.random.key(1))
    # the value head must be non-zero for the test to see the order
    head = jnp.full_like(state.value.params["value_head"], 0.3)
    state = state.replace(value=state.value.replace(params={**state.value.params, "value_head": head}))
    vm = value_model_of(model)
    v_old = token_values(state.value.params, b.tokens, b.attention_mask, model=vm)
    # the actor's loss with the pre-update values (one compiled program serves both losses below)
    before, (_, ell) = oreo_policy_terms(state.policy.params, b.replace(values=v_old), model=model, cfg=cfg,
                                         ref_params=params)
    pol = make_train_step(functools.partial(_oreo.oreo_policy_loss, model=model, cfg=cfg, ref_params=params), opt,
                          donate=False)(state.policy, b.replace(values=v_old))[0]
    val = make_train_step(functools.partial(oreo_value_loss, model=vm, cfg=cfg), opt, donate=False)(
        state.value, b.replace(log_ratios=ell))[0]
    joint, metrics = make_oreo_step(model, cfg, opt, donate=False)(state, b)
    # Adam's first step is lr·g/(|g| + ε) elementwise: a near-zero gradient entry amplifies float noise, so
    # params agree to 2% of a step (lr 1e-3; 1.1% seen for 1 of 16,384 weights with Eigen's products)
    for a, c in zip(jax.tree.leaves(joint.policy.params), jax.tree.leaves(pol.params)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=2e-5)
    for a, c in zip(jax.tree.leaves(joint.value.params), jax.tree.leaves(val.params)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=2e-5)
    # the losses show the order directly: the actor's loss is the one with the pre-update values
    v_new = token_values(val.params, b.tokens, b.attention_mask, model=vm)
    after, _ = oreo_policy_terms(state.policy.params, b.replace(values=v_new), model=model, cfg=cfg,
                                 ref_params=params)
    assert float(metrics["loss"]) == pytest.approx(float(before), rel=1e-5)
    assert abs(float(after) - float(before)) > 1e-3 * abs(float(before))
    assert int(joint.step) == 1 and int(metrics["skipped"]) == 0
    assert {"policy_loss", "value_loss", "kl", "loss"} <= set(metrics)


def test_config_and_missing_fields():
    with pytest.raises(ValueError, match="OREOConfig.level"):
        OREOConfig(level="episode")
    with pytest.raises(ValueError, match="OREOConfig.kl_estimator"):
        OREOConfig(kl_estimator="k2")
    assert OREOConfig(level="step").alpha == 0.1 and OREOConfig(level="response", kl_coef=0.0).alpha == 0.0


def test_step_level_without_step_starts_is_an_error(small):
    model, params = small
    b = _batch(model).replace(step_starts=None)
    with pytest.raises(ValueError, match="step_starts"):
        oreo_policy_loss(params, b.replace(values=jnp.zeros((4, 15))), model=model, cfg=OREOConfig(level="step"),
                         ref_params=params)
    with pytest.raises(ValueError, match="batch.values"):
        oreo_policy_loss(params, b, model=model, cfg=OREOConfig(), ref_params=params)
