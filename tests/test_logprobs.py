"""token_logprobs / entropy against a naive full-vocabulary reference; chunking changes nothing."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import left_padded
from rljax.models.logprobs import token_logprobs, token_logprobs_and_entropy
from rljax.ops import entropy_from_logits, logprobs_from_logits


def _naive(model, params, tokens, mask):
    logits = np.asarray(model(params, tokens, mask), np.float64)[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    ent = -(np.exp(logp) * logp).sum(-1)
    live = np.asarray(mask)[:, 1:] * np.asarray(mask)[:, :-1]  # a pad slot predicts nothing
    return picked * live, ent * live


def test_kernels_known_answers():
    logits = jnp.zeros((3, 5))
    np.testing.assert_allclose(entropy_from_logits(logits), np.log(5.0) * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(logprobs_from_logits(logits, jnp.array([0, 2, 4])), -np.log(5.0) * np.ones(3),
                               rtol=1e-6)
    z = jnp.array([[2.0, 0.0]])
    np.testing.assert_allclose(logprobs_from_logits(z, jnp.array([0])), [-np.log1p(np.exp(-2.0))], rtol=1e-6)


def test_logprobs_from_logits_derivatives_closed_form():
    """dℓ/dz = onehot(target) - softmax(z) (by hand), in reverse mode, forward mode and
    forward-over-reverse (TRPO's Fisher-vector products), against float64 numpy; the reverse
    pass of the compiled gradient has no scatter (the rule's one-hot is a comparison)."""
    z = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 11)), np.float64) * 3
    y = np.asarray(jax.random.randint(jax.random.key(1), (3, 4), 0, 11))
    w = np.asarray(jax.random.normal(jax.random.key(2), (3, 4)), np.float64)
    t = np.asarray(jax.random.normal(jax.random.key(3), z.shape), np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(11)[y]
    grad_ref = w[..., None] * (onehot - p)
    # d/dt of the gradient along t: -w p ⊙ (t - Σ p t)
    hvp_ref = -w[..., None] * p * (t - (p * t).sum(-1, keepdims=True))

    f = lambda z: jnp.sum(jnp.asarray(w, jnp.float32) * logprobs_from_logits(z, jnp.asarray(y)))  # noqa: E731
    z32, t32 = jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32)
    np.testing.assert_allclose(jax.grad(f)(z32), grad_ref, atol=1e-6)
    np.testing.assert_allclose(jax.jvp(f, (z32,), (t32,))[1], (grad_ref * t).sum(), rtol=1e-5)
    np.testing.assert_allclose(jax.jvp(jax.grad(f), (z32,), (t32,))[1], hvp_ref, atol=1e-5)
    assert "scatter" not in jax.jit(jax.grad(f)).lower(z32).compile().as_text()
    assert jax.grad(f)(z32.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_token_logprobs_match_naive_and_chunking(tiny):
    model, params = tiny
    tokens, mask = left_padded([11, 6, 3], 11, 64, seed=0)
    ref_lp, ref_ent = _naive(model, params, tokens, mask)
    for chunk in (None, 3, 4, 100):
        lp, ent = token_logprobs_and_entropy(params, tokens, mask, model=model, chunk_size=chunk)
        assert lp.shape == (3, 10)
        np.testing.assert_allclose(lp, ref_lp, atol=2e-5)
        np.testing.assert_allclose(ent, ref_ent, atol=2e-5)
        np.testing.assert_allclose(token_logprobs(params, tokens, mask, model=model, chunk_size=chunk), ref_lp,
                                   atol=2e-5)


def test_chunked_gradient_equals_unchunked(tiny):
    model, params = tiny
    tokens, mask = left_padded([9, 5], 9, 64, seed=1)

    def loss(p, chunk):
        return token_logprobs(p, tokens, mask, model=model, chunk_size=chunk).sum()

    g_full = jax.grad(loss)(params, None)
    g_chunk = jax.grad(loss)(params, 3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_full, g_chunk)


def test_large_vocab_is_chunked_automatically(monkeypatch, tiny):
    """Past the element budget the time axis is split; the answer is unchanged."""
    import rljax.models.logprobs as lpmod

    model, params = tiny
    tokens, mask = left_padded([8, 8], 8, 64, seed=2)
    ref = token_logprobs(params, tokens, mask, model=model)
    monkeypatch.setattr(lpmod, "MAX_LOGITS_ELEMENTS", 2 * 3 * 64)  # room for 3 steps of 2 rows
    assert lpmod._chunk_size(2, 7, 64, None) == 3
    np.testing.assert_allclose(lpmod.token_logprobs(params, tokens, mask, model=model), ref, atol=1e-5)


def test_logits_budget_follows_the_device():
    """256 MiB of float32 logits a chunk on a CPU; 1/16 of an accelerator's memory (an H200's
    139 GiB: 2.2e9 elements, so Qwen2.5-0.5B's 32 x 383 x 151,936 logits are one chunk), never less
    than the CPU's, and 4x the CPU's where the device reports no limit."""
    import rljax.models.logprobs as lpmod

    class Device:
        def __init__(self, platform, stats):
            self.platform, self._stats = platform, stats

        def memory_stats(self):
            return self._stats

    cpu = lpmod.MAX_LOGITS_ELEMENTS
    assert cpu == 1 << 26
    assert lpmod.max_logits_elements(Device("cpu", None)) == cpu
    h200 = lpmod.max_logits_elements(Device("gpu", {"bytes_limit": 139 << 30}))
    assert h200 == (139 << 30) // 64
    assert lpmod._chunk_size(32, 383, 151_936, None, budget=h200) == 383
    assert lpmod._chunk_size(32, 383, 151_936, None, budget=cpu) == 13
    assert lpmod.max_logits_elements(Device("gpu", {"bytes_limit": 1 << 30})) == cpu
    assert lpmod.max_logits_elements(Device("tpu", None)) == 4 * cpu
    assert lpmod.max_logits_elements() == cpu  # this process runs on a CPU
