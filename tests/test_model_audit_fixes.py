"""Model audit fixes: left padding predicts nothing from pad slots, pad ids outside the vocabulary,
KV-cache overflow, max_position_embeddings kept through load/save, entropy of -inf logits, config.json
errors naming the file and field."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.models import CheckpointFormatError, Model, TransformerConfig, load_pretrained, save_pretrained
from rljax.models.hf import config_from_hf
from rljax.models.logprobs import head_token_kl, head_token_stats, target_mask, token_logprobs_and_entropy
from rljax.ops import entropy_from_logits, logprobs_from_logits

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
CFG = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=32,
                        init_std=0.2)


@pytest.fixture(scope="module")
def small():
    model = Model(CFG)
    return model, model.init(jax.random.key(0))


@functools.partial(jax.jit, static_argnames=("model",))
def _stats(params, tokens, mask, *, model):
    return token_logprobs_and_entropy(params, tokens, mask, model=model)


@functools.partial(jax.jit, static_argnames=("model",))
def _hidden(params, tokens, mask, *, model):
    return model.forward(params, tokens, mask)[0]


# ----------------------------------------------------------------------------- 1. left padding


def test_left_padded_rows_give_the_unpadded_rows_entries(small):
    """Each row left-padded by k: its entries are the unpadded row's (computed alone, without padding),
    shifted by k, and 0 before them: the prediction of the first real token from a pad slot is no entry
    (the unpadded row has none either)."""
    model, params = small
    seqs = [[7, 8, 9, 10, 11], [3, 4, 5], [20, 21, 22, 23, 24, 25, 26]]
    T = 9
    tokens = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for b, s in enumerate(seqs):
        tokens[b, T - len(s):], mask[b, T - len(s):] = s, 1
    lp, ent = map(np.asarray, _stats(params, tokens, mask, model=model))
    for b, s in enumerate(seqs):
        k = T - len(s)
        ref_lp, ref_ent = map(np.asarray, _stats(params, np.array([s], np.int32), np.ones((1, len(s)), np.int32),
                                                 model=model))
        np.testing.assert_allclose(lp[b, k:], ref_lp[0], atol=2e-5, rtol=0)
        np.testing.assert_allclose(ent[b, k:], ref_ent[0], atol=2e-5, rtol=0)
        assert not lp[b, :k].any() and not ent[b, :k].any()
    # t16: the unpadded [7, 8, 9, 10, 11] sums to the left-padded row's sum, with no extra entry
    np.testing.assert_allclose(lp[0].sum(), _stats(params, np.array([seqs[0]], np.int32), np.ones((1, 5), np.int32),
                                                   model=model)[0].sum(), rtol=1e-5)


def test_changing_a_later_token_changes_no_earlier_entry(small):
    """Causality: replacing the last token of a left-padded row changes only the last entry."""
    model, params = small
    tokens = np.array([[0, 0, 7, 8, 9, 10, 11]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1]], np.int32)
    lp, ent = map(np.asarray, _stats(params, tokens, mask, model=model))
    lp2, ent2 = map(np.asarray, _stats(params, np.array([[0, 0, 7, 8, 9, 10, 40]], np.int32), mask, model=model))
    np.testing.assert_array_equal(lp2[:, :-1], lp[:, :-1])
    np.testing.assert_array_equal(ent2, ent)  # entropies read slots 0..5, none of which sees the last token
    assert lp2[0, -1] != lp[0, -1]


def test_target_mask_by_hand():
    """entry t counts where loss_mask[t+1], attention_mask[t+1] and attention_mask[t] are all 1."""
    attention = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1]])
    loss = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    expect = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]], np.float32)
    got = target_mask(jnp.asarray(loss), jnp.asarray(attention))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), expect)


def test_leading_pad_slots_attend_only_to_themselves(small):
    """A leading pad slot has no key to read: it reads its own slot (pad id 0 at position 0), so its
    hidden state is that of the one-token row [0] and does not depend on the later tokens."""
    model, params = small
    mask = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]], np.int32)
    tokens = np.array([[0, 0, 7, 8, 9], [0, 0, 30, 31, 32]], np.int32)
    h = np.asarray(_hidden(params, tokens, mask, model=model))
    alone = np.asarray(_hidden(params, np.zeros((1, 1), np.int32), np.ones((1, 1), np.int32), model=model))[0, 0]
    for b in range(2):
        for slot in range(2):
            np.testing.assert_allclose(h[b, slot], alone, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 2. pad ids outside the vocabulary


@pytest.mark.parametrize("pad", [-1, -100, 50, 32000, 10**6])
def test_pad_id_outside_the_vocabulary_gives_pad_id_0_results(small, pad):
    """Right- and left-padded rows with pad id `pad` (t4: a Llama-2 <pad> = vocab_size turned every
    entry NaN): log-probs, entropies, real tokens' logits and the gradient equal pad id 0's exactly."""
    model, params = small
    tokens = np.array([[5, 6, 7, 8, 9, 0, 0, 0], [0, 0, 0, 11, 12, 13, 14, 15]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]], np.int32)
    padded = np.where(mask == 1, tokens, pad).astype(np.int32)
    for got, want in zip(_stats(params, padded, mask, model=model), _stats(params, tokens, mask, model=model)):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    real = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(model(params, padded, mask))[real], np.asarray(model(params, tokens,
                                                                                                   mask))[real])

    def loss(p, t):
        lp, ent = token_logprobs_and_entropy(p, t, mask, model=model)
        return -(lp * target_mask(mask, mask)).sum() - 0.1 * ent.sum()

    g_pad, g0 = jax.grad(loss)(params, padded), jax.grad(loss)(params, tokens)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), g_pad, g0)


def test_padding_targets_of_the_head_statistics_are_finite(small):
    """head_token_stats / head_token_kl read raw token ids (the losses pass tokens[:, 1:]): a target
    outside [0, V) is clamped into it, a finite entry that the caller's mask drops; in range the
    entries are the plain log-probs (checked against log_softmax by hand)."""
    model, params = small
    V = CFG.vocab_size
    hidden = jax.random.normal(jax.random.key(3), (2, 4, CFG.d_model))
    targets = jnp.array([[1, V, -100, 10**6], [V - 1, 0, 7, -1]], jnp.int32)
    clamped = jnp.clip(targets, 0, V - 1)
    logp = jax.nn.log_softmax(model.logits(params, hidden), axis=-1)
    want = np.asarray(jnp.take_along_axis(logp, clamped[..., None], axis=-1)[..., 0])
    got = head_token_stats(params, hidden, targets, model=model)["logprobs"]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    kl = head_token_kl(params, hidden, params, hidden, targets, model=model)
    np.testing.assert_allclose(np.asarray(kl["logprobs"]), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(kl["ref_logprobs"]), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(kl["kl"]), 0.0, atol=1e-6)
    # the op alone: V -> V - 1 and -3 -> 0, value and gradient of the same (clamped) entry
    z = jnp.array([[0.0, 1.0, 2.0], [0.5, -1.0, 0.0]])
    y = jnp.array([3, -3])
    p = jax.nn.softmax(z, axis=-1)
    np.testing.assert_allclose(logprobs_from_logits(z, y), [np.log(p[0, 2]), np.log(p[1, 0])], rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda z: logprobs_from_logits(z, y).sum())(z),
                               np.eye(3)[[2, 0]] - p, atol=1e-6)


# ----------------------------------------------------------------------------- 3. KV-cache overflow


def test_forward_past_the_end_of_the_kv_cache_raises(small):
    model, params = small
    tokens = np.random.default_rng(0).integers(0, 50, (2, 6)).astype(np.int32)
    cache = model.init_cache(2, 4)
    _, cache = model.forward(params, tokens[:, :4], cache=cache)  # fills all 4 slots
    with pytest.raises(ValueError) as e:
        model.forward(params, tokens[:, 4:6], cache=cache)
    assert str(e.value) == ("KV cache overflow: 2 new tokens at cache.index=4 need 6 slots, but the cache has "
                            "length 4; allocate a longer cache (Model.init_cache(batch, length) with length >= "
                            "prompt + new tokens)")
    with pytest.raises(ValueError, match=r"^KV cache overflow: 5 new tokens at cache.index=0 need 5 slots, but the "
                                         r"cache has length 4"):
        model.forward(params, tokens[:, :5], cache=model.init_cache(2, 4))
    with pytest.raises(ValueError, match=r"^cache has 2 rows but tokens have 1$"):
        model.forward(params, tokens[:1, :1], cache=model.init_cache(2, 4))


def test_a_cache_filled_exactly_matches_the_full_forward(small):
    """4 slots, 2 + 1 + 1 tokens: the last slot is usable and the logits are the full forward's."""
    model, params = small
    tokens = np.random.default_rng(1).integers(0, 50, (2, 4)).astype(np.int32)
    cache = model.init_cache(2, 4)
    pieces = []
    for a, b in ((0, 2), (2, 3), (3, 4)):
        h, cache = model.forward(params, tokens[:, a:b], cache=cache)
        pieces.append(model.logits(params, h))
    assert int(cache.index) == 4
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(model(params, tokens)), atol=1e-4,
                               rtol=0)


# ----------------------------------------------------------------------------- 4. max_position_embeddings


def test_save_keeps_the_source_checkpoints_max_position_embeddings(tmp_path):
    """load(max_seq_len=N) bounds the cache; the saved checkpoint still advertises its source's context
    (t10: 32768 -> 512 before), and loading it back with the same override gives the same config."""
    path = os.path.join(FIXTURES, "qwen2")
    source = json.load(open(os.path.join(path, "config.json")))["max_position_embeddings"]
    assert source == 64
    cfg, params = load_pretrained(path, config_overrides={"max_seq_len": 16})
    assert (cfg.max_seq_len, cfg.max_position_embeddings) == (16, 64)
    out = save_pretrained(params, cfg, str(tmp_path / "short"))
    assert json.load(open(os.path.join(out, "config.json")))["max_position_embeddings"] == 64
    assert load_pretrained(out, config_overrides={"max_seq_len": 16})[0] == cfg
    plain, _ = load_pretrained(out)
    assert (plain.max_seq_len, plain.max_position_embeddings) == (64, None)
    # without an override nothing is kept; a longer max_seq_len than the source's is what is written
    assert load_pretrained(path)[0].max_position_embeddings is None
    cfg_long, params_long = load_pretrained(path, config_overrides={"max_seq_len": 128})
    out = save_pretrained(params_long, cfg_long, str(tmp_path / "long"))
    assert json.load(open(os.path.join(out, "config.json")))["max_position_embeddings"] == 128


def test_a_model_built_from_scratch_writes_its_max_seq_len(tmp_path):
    model = Model(CFG)
    out = save_pretrained(model.init(jax.random.key(0)), CFG, str(tmp_path / "scratch"))
    assert json.load(open(os.path.join(out, "config.json")))["max_position_embeddings"] == CFG.max_seq_len
    with pytest.raises(ValueError, match=r"^TransformerConfig.max_position_embeddings: must be positive or None, "
                                         r"got 0$"):
        CFG.replace(max_position_embeddings=0)


# ----------------------------------------------------------------------------- 5. entropy of -inf logits


def test_entropy_with_minus_inf_logits():
    """[1, 2, -inf] has the entropy of [1, 2] (closed form -Σ p log p, t18 gave NaN); the gradient is
    finite: that of [1, 2] on the finite logits, 0 on the filtered one."""
    z = jnp.array([[1.0, 2.0, -jnp.inf], [-jnp.inf, 0.0, -jnp.inf]])
    p = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    np.testing.assert_allclose(entropy_from_logits(z), [-(p * np.log(p)).sum(), 0.0], rtol=1e-6, atol=1e-7)
    g = np.asarray(jax.grad(lambda z: entropy_from_logits(z).sum())(z))
    assert np.isfinite(g).all()
    g_ref = np.asarray(jax.grad(lambda z: entropy_from_logits(z).sum())(z[:1, :2]))
    np.testing.assert_allclose(g[0, :2], g_ref[0], atol=1e-7)
    np.testing.assert_array_equal(g[0, 2], 0.0)
    np.testing.assert_array_equal(g[1], 0.0)


def test_entropy_derivatives_closed_form():
    """dH/dz = -p ⊙ (log p + H) (by hand) in reverse and forward mode, and forward-over-reverse (TRPO's
    Fisher-vector products) against autodiff of the plain -Σ p log p, on finite logits (float64 numpy)."""
    z = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 11)), np.float64) * 3
    w = np.asarray(jax.random.normal(jax.random.key(2), (3, 4)), np.float64)
    t = np.asarray(jax.random.normal(jax.random.key(3), z.shape), np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    H = -(p * np.log(p)).sum(-1, keepdims=True)
    grad_ref = -w[..., None] * p * (np.log(p) + H)
    w32, z32, t32 = (jnp.asarray(a, jnp.float32) for a in (w, z, t))
    f = lambda z: jnp.sum(w32 * entropy_from_logits(z))  # noqa: E731
    plain = lambda z: jnp.sum(w32 * -jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z), -1))  # noqa: E731
    np.testing.assert_allclose(f(z32), (w * H[..., 0]).sum(), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(f)(z32), grad_ref, atol=1e-5)
    np.testing.assert_allclose(jax.jvp(f, (z32,), (t32,))[1], (grad_ref * t).sum(), rtol=1e-4)
    np.testing.assert_allclose(jax.jvp(jax.grad(f), (z32,), (t32,))[1], jax.jvp(jax.grad(plain), (z32,), (t32,))[1],
                               atol=1e-4)


# ----------------------------------------------------------------------------- 6. config.json errors


def test_kv_heads_not_dividing_heads_names_the_file_and_field(tmp_path):
    src = os.path.join(FIXTURES, "qwen2")
    bad = shutil.copytree(src, tmp_path / "bad")
    hf = json.load(open(bad / "config.json"))
    N = hf["num_attention_heads"]
    hf["num_key_value_heads"] = N - 1
    json.dump(hf, open(bad / "config.json", "w"))
    file = os.path.join(str(bad), "config.json")
    with pytest.raises(CheckpointFormatError) as e:
        load_pretrained(str(bad))
    assert str(e.value) == (f"{file}: num_key_value_heads={N - 1} does not make a valid model "
                            f"(TransformerConfig.n_kv_heads: {N - 1} must divide n_heads={N})")
    # an override is the caller's argument, not the file's: its error is the config's own
    hf_ok = json.load(open(os.path.join(src, "config.json")))
    with pytest.raises(ValueError, match=r"^TransformerConfig.n_kv_heads: 3 must divide n_heads="):
        config_from_hf(hf_ok, source=file, n_kv_heads=3)
    hf_ok["max_position_embeddings"] = 0
    with pytest.raises(CheckpointFormatError, match=r"max_position_embeddings=0 does not make a valid model "
                                                    r"\(TransformerConfig.max_seq_len: must be positive, got 0\)"):
        config_from_hf(hf_ok, source=file)


def test_float16_compute_dtype_runs(small):
    """dtype "float16" (documented with float32 / bfloat16): log-probs close to float32's."""
    model, params = small
    half = Model(CFG.replace(dtype="float16"))
    tokens = np.array([[5, 6, 7, 8, 9]], np.int32)
    mask = np.ones_like(tokens)
    lp16 = np.asarray(_stats(params, tokens, mask, model=half)[0])
    lp32 = np.asarray(_stats(params, tokens, mask, model=model)[0])
    np.testing.assert_allclose(lp16, lp32, atol=5e-2, rtol=0)
