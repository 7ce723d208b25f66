"""Actor-critic losses against naive per-token references; reward placement; KL controller wiring."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.data.batch import PolicyBatch
from rljax.estimators import GAEConfig, actor_critic_targets, token_rewards
from rljax.losses.actor_critic import A2CConfig, PPOConfig, a2c_loss, policy_value_terms, ppo_loss
from rljax.models import Model
from rljax.models.config import TransformerConfig
from rljax.models.logprobs import token_logprobs_and_entropy
from rljax.ops import place_at_last


def test_place_at_last_puts_the_reward_on_the_last_masked_token():
    mask = jnp.asarray([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    out = place_at_last(jnp.asarray([1.0, 2.0, 3.0, 4.0]), mask)
    np.testing.assert_array_equal(out, [[0, 0, 1, 0], [0, 0, 0, 2], [0, 0, 0, 0], [4, 0, 0, 0]])


def test_token_rewards_and_targets_match_a_naive_loop():
    rng = np.random.default_rng(0)
    B, T, beta, gamma, lam = 3, 6, 0.1, 0.9, 0.8
    mask = np.zeros((B, T), np.float32)
    mask[0, 1:5], mask[1, 2:], mask[2, 0:3] = 1, 1, 1
    old, ref, v = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(3))
    rewards = rng.normal(size=B).astype(np.float32)
    r = np.asarray(token_rewards(jnp.asarray(rewards), jnp.asarray(mask), jnp.asarray(old), jnp.asarray(ref), beta))
    cfg = GAEConfig(gamma=gamma, lam=lam, kl_coef=beta, whiten_advantages=False)
    adv, ret = actor_critic_targets(rewards, jnp.asarray(v), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(mask),
                                    cfg)
    for b in range(B):
        idx = np.flatnonzero(mask[b])
        want = -beta * (old[b, idx] - ref[b, idx])
        want[-1] += rewards[b]
        np.testing.assert_allclose(r[b, idx], want, rtol=1e-6)
        assert np.all(r[b, mask[b] == 0] == 0)
        a, nxt_v, nxt_a = np.zeros(len(idx)), 0.0, 0.0
        for k in reversed(range(len(idx))):  # GAE over the masked tokens only, V = 0 after the last
            delta = want[k] + gamma * nxt_v - v[b, idx[k]]
            a[k] = delta + gamma * lam * nxt_a
            nxt_v, nxt_a = v[b, idx[k]], a[k]
        np.testing.assert_allclose(np.asarray(adv)[b, idx], a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ret)[b, idx], a + v[b, idx], rtol=1e-5, atol=1e-6)


# The model's computations run compiled: op-by-op (eager) execution compiles every primitive
# separately, which costs far more than one program per shape and config.
_token_logprobs_and_entropy = jax.jit(token_logprobs_and_entropy, static_argnames=("model",))
_init = jax.jit(lambda model, key: model.init(key), static_argnums=0)


def _model():
    cfg = TransformerConfig(vocab_size=13, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32,
                            max_seq_len=16, heads=("lm", "value"))
    return Model(cfg)


def _batch(model, params, seed, perturb=0.0):
    rng = np.random.default_rng(seed)
    B, T = 4, 7
    tokens = jnp.asarray(rng.integers(1, 13, (B, T)), jnp.int32)
    attn = np.ones((B, T), np.int32)
    attn[1, :2] = 0
    attn[2, -2:] = 0
    loss = attn.copy()
    loss[:, :3] = 0
    lp, _ = _token_logprobs_and_entropy(params, tokens, jnp.asarray(attn), model=model)
    old = lp + perturb * jnp.asarray(rng.normal(size=lp.shape), jnp.float32)
    return PolicyBatch(tokens=tokens, attention_mask=jnp.asarray(attn), loss_mask=jnp.asarray(loss),
                       old_logprobs=old, advantages=jnp.asarray(rng.normal(size=(B, T - 1)), jnp.float32),
                       rewards=jnp.zeros(B), group_ids=jnp.arange(B),
                       returns=jnp.asarray(rng.normal(size=(B, T - 1)), jnp.float32),
                       old_values=jnp.asarray(rng.normal(size=(B, T - 1)) * 0.1, jnp.float32))


def _naive_ppo(lp, ent, values, batch, mask, cfg):
    """Per-token Python loop of the PPO loss (token mean over the mask)."""
    total, n = {"actor": 0.0, "value": 0.0, "entropy": 0.0}, 0
    old, A, R, V0 = (np.asarray(x, np.float64) for x in (batch.old_logprobs, batch.advantages, batch.returns,
                                                          batch.old_values))
    for b, t in zip(*np.nonzero(mask)):
        rho = np.exp(lp[b, t] - old[b, t])
        total["actor"] += -min(rho * A[b, t], np.clip(rho, 1 - cfg.eps, 1 + cfg.eps) * A[b, t])
        vc = V0[b, t] + np.clip(values[b, t] - V0[b, t], -cfg.value_clip, cfg.value_clip)
        total["value"] += 0.5 * max((values[b, t] - R[b, t]) ** 2, (vc - R[b, t]) ** 2)
        total["entropy"] += ent[b, t]
        n += 1
    return {k: v / n for k, v in total.items()}


def test_ppo_loss_matches_a_naive_reference_with_padding():
    model = _model()
    params = _init(model, jax.random.key(0))
    params["value_head"] = jax.random.normal(jax.random.key(1), params["value_head"].shape) * 0.5
    batch = _batch(model, params, 1, perturb=0.3)  # ratios away from 1: some tokens clip
    cfg = PPOConfig(entropy_coef=0.01)

    @jax.jit
    def compiled(params, batch):  # the loss, its per-token terms and the value head read off the hidden states
        hidden, _ = model.forward(params, batch.tokens, batch.attention_mask)
        return (ppo_loss(params, batch, model=model, cfg=cfg), policy_value_terms(params, batch, model),
                model.values(params, hidden))

    (loss, m), terms, head_values = compiled(params, batch)
    lp, ent, values, mask = (np.asarray(x, np.float64) for x in terms)
    want = _naive_ppo(lp, ent, values, batch, mask, cfg)
    np.testing.assert_allclose(float(m["actor_loss"]), want["actor"], rtol=1e-5)
    np.testing.assert_allclose(float(m["value_loss"]), want["value"], rtol=1e-5)
    np.testing.assert_allclose(float(loss), want["actor"] + 0.5 * want["value"] - 0.01 * want["entropy"], rtol=1e-5)
    assert 0 < float(m["clip_fraction"]) < 1
    # the value head is the one the model computes: V_t at position t of the forward pass
    live = np.asarray(batch.attention_mask[:, 1:])
    np.testing.assert_allclose(values, np.asarray(head_values)[:, :-1] * live, rtol=1e-6)


def test_ppo_at_ratio_one_has_the_a2c_policy_gradient_and_masked_tokens_get_none():
    model = _model()
    params = _init(model, jax.random.key(2))
    batch = _batch(model, params, 3)  # old log-probs = current: the first minibatch of an iteration
    ppo = PPOConfig(value_coef=0.0)
    a2c = A2CConfig(value_coef=0.0)
    full = PPOConfig()

    @functools.partial(jax.jit, static_argnames=("loss", "cfg"))
    def grad(params, batch, *, loss, cfg):  # -> (the loss's metrics, its gradient)
        return jax.grad(lambda p: loss(p, batch, model=model, cfg=cfg), has_aux=True)(params)[::-1]

    m_ppo, g_ppo = grad(params, batch, loss=ppo_loss, cfg=ppo)
    _, g_a2c = grad(params, batch, loss=a2c_loss, cfg=a2c)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_ppo, g_a2c)
    assert float(m_ppo["clip_fraction"]) == 0.0
    # changing advantages, returns or old values on tokens outside the mask changes nothing
    mask = np.asarray(batch.loss_mask[:, 1:] * batch.attention_mask[:, 1:])
    noise = jnp.asarray((1 - mask) * 100.0, jnp.float32)
    other = batch.replace(advantages=batch.advantages + noise, returns=batch.returns + noise,
                          old_values=batch.old_values - noise)
    _, g1 = grad(params, batch, loss=ppo_loss, cfg=full)
    _, g2 = grad(params, other, loss=ppo_loss, cfg=full)  # the same program on the changed batch
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), g1, g2)


def test_value_clipping_by_hand():
    """V_old = 0, R = 1, ε_V = 0.2: V = 0.5 -> max(0.25, (0.2 − 1)²) / 2 = 0.32; no clip -> 0.125."""
    from rljax.losses.actor_critic import _value_error

    b = PolicyBatch(tokens=None, attention_mask=None, loss_mask=None, old_logprobs=None, advantages=None,
                    rewards=None, group_ids=None, returns=jnp.ones((1, 1)), old_values=jnp.zeros((1, 1)))
    assert float(_value_error(jnp.full((1, 1), 0.5), b, 0.2)[0, 0]) == pytest.approx(0.32)
    assert float(_value_error(jnp.full((1, 1), 0.5), b, None)[0, 0]) == pytest.approx(0.125)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="PPOConfig.eps"):
        PPOConfig(eps=0.0)
    with pytest.raises(ValueError, match="GAEConfig.lam"):
        GAEConfig(lam=1.5)
    with pytest.raises(ValueError, match="A2CConfig.value_coef"):
        A2CConfig(value_coef=-1.0)
    with pytest.raises(ValueError, match="PPOConfig.value_clip"):
        PPOConfig(value_clip=-1.0)
    with pytest.raises(ValueError, match="PPOConfig.value_clip: must be positive and finite"):
        PPOConfig(value_clip=float("nan"))
    with pytest.raises(ValueError, match="A2CConfig.entropy_coef"):
        A2CConfig(entropy_coef=float("nan"))
    # a batch without the estimator's value targets names the missing field, not a NoneType error
    from rljax.losses.actor_critic import _value_error
    b = PolicyBatch(tokens=None, attention_mask=None, loss_mask=None, old_logprobs=None, advantages=None,
                    rewards=None, group_ids=None)
    with pytest.raises(ValueError, match=r"PolicyBatch.returns is None; it comes from a value estimator"):
        _value_error(jnp.zeros((1, 1)), b, None)
    with pytest.raises(ValueError, match=r"PolicyBatch.old_values is None"):
        _value_error(jnp.zeros((1, 1)), b.replace(returns=jnp.ones((1, 1))), 0.2)


def test_critic_from_a_reward_model_reads_the_reward_head_at_every_position():
    """V_t at a row's last real token equals the reward model's score of the row."""
    from rljax.losses.actor_critic import critic_from_reward_model, token_values

    rm = Model(TransformerConfig(vocab_size=13, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32,
                                 max_seq_len=16, heads=("lm", "reward")))
    params = _init(rm, jax.random.key(5))
    params["reward_head"] = jax.random.normal(jax.random.key(6), params["reward_head"].shape)
    params["reward_bias"] = jnp.float32(0.3)
    critic_model, critic = critic_from_reward_model(rm, params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 13, (3, 6)), jnp.int32)
    attn = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])

    @jax.jit
    def compiled(params, critic, tokens, attn):  # the reward model's scores, the critic's full and aligned values
        hidden, _ = rm.forward(params, tokens, attn)
        return (rm.rewards(params, hidden, attn), critic_model.values(critic, critic_model.forward(critic, tokens,
                                                                                                  attn)[0]),
                token_values(critic, tokens, attn, model=critic_model))

    scores, values, aligned = (np.asarray(x) for x in compiled(params, critic, tokens, attn))
    # token_values drops the last position; take V at the last real token from the full value head instead
    last = [5, 5, 3]
    np.testing.assert_allclose(values[np.arange(3), last], scores, rtol=1e-5)
    np.testing.assert_allclose(aligned, values[:, :-1] * np.asarray(attn[:, 1:]), rtol=1e-6)
    with pytest.raises(ValueError, match="no reward head"):
        critic_from_reward_model(_model(), _init(_model(), jax.random.key(0)))
    multi = Model(dataclasses.replace(rm.config, reward_outputs=3))
    with pytest.raises(ValueError, match=r"the reward head has 3 outputs \(reward_outputs\), but a value head has one"):
        critic_from_reward_model(multi, params)


def test_reward_whitening_and_clipping_happen_before_the_kl_penalty():
    """Sequence rewards r -> r / std(r) (no mean shift), then clipped to ±c, then placed on the last token."""
    rewards = np.array([0.0, 4.0, -2.0, 6.0], np.float32)
    mask = jnp.ones((4, 3))
    zeros = jnp.zeros((4, 3))
    cfg = GAEConfig(whiten_rewards=True, reward_clip=1.5, kl_coef=0.0, whiten_advantages=False, lam=1.0)
    adv, ret = actor_critic_targets(rewards, zeros, zeros, zeros, mask, cfg)
    want = np.clip(rewards / (rewards.std() + 1e-8), -1.5, 1.5)
    np.testing.assert_allclose(np.asarray(ret)[:, -1], want, rtol=1e-5)  # V = 0, γ = λ = 1: R_t = final reward
    np.testing.assert_allclose(np.asarray(adv), np.repeat(want[:, None], 3, axis=1), rtol=1e-5)
