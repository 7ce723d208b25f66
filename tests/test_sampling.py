"""Sampler and beam search against full-forward references and closed-form distributions."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import left_padded
from rljax.models import Model, preset
from rljax.models.logprobs import token_logprobs
from rljax.sampling import (MIN_ROWS_PER_GROUP, ROW_GROUP_WEIGHT_BYTES, BeamConfig, SampleConfig, _generate,
                            beam_search, choose_tokens, decode_segments, grow_cache, penalize_repeats, row_groups,
                            sample, seen_tokens)

PROMPTS = left_padded([9, 4, 1, 6], 10, 64, seed=11)
# One greedy config serves every test that needs plain greedy decoding of PROMPTS (one compile
# of the decoder); eos_id=-1: no row stops early, so all 12 steps are compared.
GREEDY = SampleConfig(max_new_tokens=12, greedy=True, eos_id=-1)
# Run op by op, the model compiles every primitive for every new shape: jitted here instead.
_token_logprobs = jax.jit(token_logprobs, static_argnames=("model",))


def _penalized(logits, tokens, mask, upto, penalty):
    """transformers' repetition penalty written out for one row: logits [V] of the position after `upto`
    tokens; every token among tokens[:upto] with mask 1 has its logit divided by penalty if > 0, else
    multiplied."""
    z = np.array(logits, np.float64)
    for v in {int(t) for t, m in zip(tokens[:upto], mask[:upto]) if m}:
        z[v] = z[v] / penalty if z[v] > 0 else z[v] * penalty
    return z


def _greedy_reference(model, params, tokens, mask, steps, penalty=1.0):
    """Greedy decoding by full recomputation: argmax of the full forward at each step (penalty != 1: of its
    logits rescaled by `_penalized`). The rows are right-padded to their final width so one jitted forward
    serves every step (causal attention: the masked pads to the right cannot change earlier logits)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    B, P = tokens.shape
    tokens = np.concatenate([tokens, np.zeros((B, steps), np.int32)], 1)
    mask = np.concatenate([mask, np.zeros((B, steps), np.int32)], 1)
    forward = jax.jit(lambda p, t, m: model(p, t, m))
    for i in range(steps):
        logits = forward(params, tokens, mask)[:, P + i - 1]
        if penalty == 1.0:
            tokens[:, P + i] = np.asarray(jnp.argmax(logits, -1))
        else:
            tokens[:, P + i] = [np.argmax(_penalized(z, t, m, P + i, penalty))
                                for z, t, m in zip(np.asarray(logits), tokens, mask)]
        mask[:, P + i] = 1
    return tokens


def test_greedy_equals_argmax_of_full_forward(tiny):
    model, params = tiny
    r = sample(params, *PROMPTS, jax.random.key(0), model=model, cfg=GREEDY)  # no eos: compare all 12 steps
    ref = _greedy_reference(model, params, r.tokens[:, :r.prompt_length], r.attention_mask[:, :r.prompt_length], 12)
    np.testing.assert_array_equal(np.asarray(r.tokens), ref)
    assert (np.asarray(r.lengths) == 12).all() and not np.asarray(r.stopped_at_eos).any()


@pytest.mark.parametrize("cfg", [GREEDY.replace(greedy=False, temperature=0.0),
                                 GREEDY.replace(greedy=False, temperature=1e-6),
                                 GREEDY.replace(greedy=False, top_k=1, temperature=1.5),
                                 GREEDY.replace(greedy=False, top_p=1e-6)])
def test_limits_agree_with_greedy(tiny, cfg):
    model, params = tiny
    greedy = sample(params, *PROMPTS, jax.random.key(0), model=model, cfg=GREEDY)
    r = sample(params, *PROMPTS, jax.random.key(5), model=model, cfg=cfg)
    np.testing.assert_array_equal(r.tokens, greedy.tokens)


def test_sampled_logprobs_equal_token_logprobs(tiny):
    model, params = tiny
    cfg = SampleConfig(max_new_tokens=16, temperature=0.7, top_k=20, n=3)
    r = sample(params, *PROMPTS, jax.random.key(1), model=model, cfg=cfg)
    assert r.tokens.shape == (12, 16 + 16) and r.logprobs.shape == (12, 31)
    # token_logprobs and the full forward's logits, in one program
    lp, logits = jax.jit(lambda p, t, m: (token_logprobs(p, t, m, model=model), model(p, t, m)))(
        params, r.tokens, r.attention_mask)
    on = np.asarray(r.loss_mask[:, 1:]).astype(bool)
    np.testing.assert_allclose(np.asarray(r.logprobs)[on], np.asarray(lp)[on], atol=1e-5)
    assert (np.asarray(r.logprobs)[~on] == 0).all()
    # under the sampling distribution: log softmax of the truncated, tempered logits
    logits = np.asarray(logits, np.float64)[:, :-1] / 0.7
    kth = np.sort(logits, -1)[..., -20][..., None]
    z = np.where(logits < kth, -np.inf, logits)
    logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ref = np.take_along_axis(z, np.asarray(r.tokens)[:, 1:, None], -1)[..., 0] - logz
    np.testing.assert_allclose(np.asarray(r.sampling_logprobs)[on], ref[on], atol=1e-4)
    np.testing.assert_array_equal(r.group_ids, np.repeat(np.arange(4), 3))


def test_same_key_same_samples_different_key_different(tiny):
    model, params = tiny
    cfg = SampleConfig(max_new_tokens=12, temperature=1.0, n=2)
    a = sample(params, *PROMPTS, jax.random.key(7), model=model, cfg=cfg)
    b = sample(params, *PROMPTS, jax.random.key(7), model=model, cfg=cfg)
    c = sample(params, *PROMPTS, jax.random.key(8), model=model, cfg=cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    # the n samples of one prompt differ from each other
    assert (np.asarray(a.completions[0]) != np.asarray(a.completions[1])).any()


def test_repetition_penalty_greedy_equals_penalized_argmax_of_full_forward(tiny):
    """Greedy decoding with repetition_penalty 1.5 equals a full-forward reference that rescales by hand the
    logits of the row's real prompt tokens and of its completion so far; without the penalty the rows differ."""
    model, params = tiny
    cfg = GREEDY.replace(repetition_penalty=1.5)
    r = sample(params, *PROMPTS, jax.random.key(0), model=model, cfg=cfg)
    P = r.prompt_length
    tokens = _greedy_reference(model, params, r.tokens[:, :P], r.attention_mask[:, :P], 12, penalty=1.5)
    np.testing.assert_array_equal(np.asarray(r.tokens), tokens)
    plain = sample(params, *PROMPTS, jax.random.key(0), model=model, cfg=GREEDY)
    assert (np.asarray(plain.tokens) != tokens).any()  # the penalty changed some choices
    # the policy's log-probs stay the model's own
    lp = _token_logprobs(params, r.tokens, r.attention_mask, model=model)
    on = np.asarray(r.loss_mask[:, 1:]).astype(bool)
    np.testing.assert_allclose(np.asarray(r.logprobs)[on], np.asarray(lp)[on], atol=1e-5)


def test_repetition_penalty_sampling_logprobs_are_the_penalized_distribution(tiny):
    """Sampled with temperature 0.7, top_k 20 and repetition_penalty 0.8 (< 1 favours repeats):
    sampling_logprobs are the log-softmax of the rescaled (before the temperature), tempered, truncated logits,
    written out per row and position; logprobs are the model's."""
    model, params = tiny
    cfg = SampleConfig(max_new_tokens=16, temperature=0.7, top_k=20, n=3, repetition_penalty=0.8)
    r = sample(params, *PROMPTS, jax.random.key(1), model=model, cfg=cfg)
    lp, logits = jax.jit(lambda p, t, m: (token_logprobs(p, t, m, model=model), model(p, t, m)))(
        params, r.tokens, r.attention_mask)
    on = np.asarray(r.loss_mask[:, 1:]).astype(bool)
    np.testing.assert_allclose(np.asarray(r.logprobs)[on], np.asarray(lp)[on], atol=1e-5)
    tokens, mask, logits = np.asarray(r.tokens), np.asarray(r.attention_mask), np.asarray(logits)
    slp = np.asarray(r.sampling_logprobs)
    checked = 0
    for b, t in zip(*np.nonzero(on)):  # position t predicts token t + 1
        z = _penalized(logits[b, t], tokens[b], mask[b], t + 1, 0.8) / 0.7
        z = np.where(z < np.sort(z)[-20], -np.inf, z)
        ref = z[tokens[b, t + 1]] - (np.log(np.exp(z - z.max()).sum()) + z.max())
        np.testing.assert_allclose(slp[b, t], ref, atol=1e-4)
        checked += 1
    assert checked == on.sum() > 100


def test_seen_tokens_and_penalize_repeats():
    tokens = np.array([[0, 0, 5, 3, 5], [1, 2, 3, 3, 4]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)  # row 0 left-padded: its pad id 0 is not seen
    seen = np.asarray(seen_tokens(jnp.asarray(tokens), jnp.asarray(mask), 7))
    np.testing.assert_array_equal(seen, [[0, 0, 0, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0, 0]])
    z = penalize_repeats(jnp.array([[2.0, 1.0, 0.0, -1.0, -3.0]]), jnp.array([[True, False, True, True, False]]), 2.0)
    np.testing.assert_allclose(z, [[1.0, 1.0, 0.0, -2.0, -3.0]])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^SampleConfig.repetition_penalty: must be a (number|finite number > 0 "
                                             r"\(1 = off\)), got"):
            SampleConfig(repetition_penalty=bad)


def test_choose_tokens_matches_closed_form_distribution():
    logits = jnp.tile(jnp.array([[2.0, 1.0, 0.0, -1.0, -3.0]]), (40_000, 1))
    cases = [
        (SampleConfig(temperature=0.7, top_k=3), np.r_[np.exp(np.array([2.0, 1.0, 0.0]) / 0.7), 0, 0]),
        # top_p = 0.8: mass above the 3rd token is 0.870 >= 0.8, so two tokens remain
        (SampleConfig(top_p=0.8), np.r_[np.exp([2.0, 1.0]), 0, 0, 0]),
        (SampleConfig(temperature=2.0), np.exp(np.array([2.0, 1.0, 0.0, -1.0, -3.0]) / 2.0)),
        # min_p = 0.3: p_i / p_max = e^{z_i - 2} = 1, 0.37, 0.14, ...: two tokens remain; at temperature 2
        # e^{(z_i - 2) / 2} = 1, 0.61, 0.37, 0.22: three
        (SampleConfig(min_p=0.3), np.r_[np.exp([2.0, 1.0]), 0, 0, 0]),
        (SampleConfig(min_p=0.3, temperature=2.0), np.r_[np.exp(np.array([2.0, 1.0, 0.0]) / 2.0), 0, 0]),
        # after top_p = 0.9 (three tokens) min_p = 0.2 keeps two
        (SampleConfig(top_p=0.9, min_p=0.2), np.r_[np.exp([2.0, 1.0]), 0, 0, 0]),
    ]
    for cfg, expected in cases:
        expected = expected / expected.sum()
        tok, slp = jax.jit(choose_tokens, static_argnames=("cfg",))(logits, jax.random.key(3), cfg)
        freq = np.bincount(np.asarray(tok), minlength=5) / tok.shape[0]
        np.testing.assert_allclose(freq, expected, atol=0.01)
        np.testing.assert_allclose(np.exp(np.asarray(slp)), expected[np.asarray(tok)], rtol=1e-5)


def test_stops_at_eos_and_masks_the_rest(tiny):
    model, params = tiny
    cfg = GREEDY
    free = sample(params, *PROMPTS, jax.random.key(0), model=model, cfg=cfg)
    P = free.prompt_length
    eos = int(free.tokens[0, P + 3])  # make row 0's 4th greedy token the eos
    r = sample(params, *PROMPTS, jax.random.key(0), model=model, cfg=cfg.replace(eos_id=eos))
    toks, lm = np.asarray(r.tokens), np.asarray(r.loss_mask)
    for i in range(4):
        gen = np.asarray(free.tokens[i, P:])
        hits = np.flatnonzero(gen == eos)
        n = hits[0] + 1 if len(hits) else cfg.max_new_tokens
        assert int(r.lengths[i]) == n and bool(r.stopped_at_eos[i]) == bool(len(hits))
        np.testing.assert_array_equal(toks[i, P:P + n], gen[:n])
        assert (toks[i, P + n:] == cfg.pad_id).all() and lm[i, P:].sum() == n
    assert int(r.lengths[0]) <= 4 and bool(r.stopped_at_eos[0])


def test_decode_segments():
    assert decode_segments(128, 4) == (32, 64, 96, 128)
    assert decode_segments(256, 4) == (64, 128, 192, 256)
    assert decode_segments(100, 4) == (40, 72, 100)  # 3 segments of >= 32, ends on multiples of 8
    assert decode_segments(63, 4) == (63,) and decode_segments(64, 4) == (32, 64)
    assert decode_segments(128, 1) == (128,) and decode_segments(1, 4) == (1,)
    with pytest.raises(ValueError, match="SampleConfig.cache_segments: must be >= 1"):
        SampleConfig(cache_segments=0)


def test_grow_cache_appends_empty_slots(tiny):
    model, _ = tiny
    cache = model.init_cache(2, 8)
    cache = cache.replace(valid=cache.valid.at[:, :3].set(True), k=tuple(k + 1 for k in cache.k), index=jnp.int32(3))
    grown = grow_cache(cache, 12)
    assert grown.length == 12 and int(grown.index) == 3
    np.testing.assert_array_equal(grown.valid[:, :8], cache.valid)
    assert not np.asarray(grown.valid[:, 8:]).any() and not np.asarray(grown.k[0][:, :, 8:]).any()
    np.testing.assert_array_equal(grown.k[0][:, :, :8], cache.k[0])
    with pytest.raises(ValueError, match="cannot shrink a 8-slot cache to 4"):
        grow_cache(cache, 4)


def test_segmented_cache_samples_exactly_as_one_cache(tiny):
    """64 new tokens decode in two segments (a 32-slot-longer cache for the second): the same
    tokens, log-probs and stops as one full-length cache, with rows stopping in the first
    segment, in the second and not at all; the log-probs are the full forward's."""
    model, params = tiny
    one = SampleConfig(max_new_tokens=64, temperature=1.0, n=2, eos_id=-1, cache_segments=1)
    free = sample(params, *PROMPTS, jax.random.key(4), model=model, cfg=one)
    P = free.prompt_length
    gen = np.asarray(free.tokens[:, P:])
    # an eos that some row draws in the first 32 steps and another only later (the same draws
    # happen until a row's first eos, so the stops are predictable from the free run)
    firsts = {t: [np.flatnonzero(r == t)[0] if (r == t).any() else 99 for r in gen] for t in np.unique(gen)}
    eos = next(t for t, f in firsts.items() if min(f) < 32 and any(32 <= x < 64 for x in f) and max(f) == 99)
    cfgs = [one.replace(eos_id=int(eos)), one.replace(eos_id=int(eos), cache_segments=4)]
    a, b = (sample(params, *PROMPTS, jax.random.key(4), model=model, cfg=c) for c in cfgs)
    for field in ("tokens", "attention_mask", "loss_mask", "logprobs", "sampling_logprobs", "lengths",
                  "stopped_at_eos"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    lengths = np.asarray(b.lengths)
    assert (lengths <= 32).any() and ((lengths > 32) & (lengths < 64)).any() and (lengths == 64).any()
    lp = _token_logprobs(params, b.tokens, b.attention_mask, model=model)
    on = np.asarray(b.loss_mask[:, 1:]).astype(bool)
    np.testing.assert_allclose(np.asarray(b.logprobs)[on], np.asarray(lp)[on], atol=1e-5)


ROLLOUT_FIELDS = ("tokens", "attention_mask", "loss_mask", "logprobs", "sampling_logprobs", "lengths",
                  "stopped_at_eos", "group_ids")


def test_row_groups_sample_exactly_as_one_group(tiny):
    """16 rows decoded as 1, 2 and 4 groups on host threads (`cpu_row_groups`): the same tokens,
    log-probs, stops and group ids bit for bit, rows stopping at different steps."""
    model, params = tiny
    cfg = SampleConfig(max_new_tokens=40, temperature=1.0, n=4, eos_id=5)
    assert [row_groups(16, params, model, cfg.replace(cpu_row_groups=g)) for g in (1, 2, 4)] == [1, 2, 4]
    one, *grouped = (sample(params, *PROMPTS, jax.random.key(4), model=model, cfg=cfg.replace(cpu_row_groups=g))
                     for g in (1, 2, 4))
    for other in grouped:
        for field in ROLLOUT_FIELDS:
            np.testing.assert_array_equal(getattr(one, field), getattr(other, field), err_msg=field)
    lengths = np.asarray(one.lengths)
    assert (lengths < 40).any() and (lengths == 40).any() and len(set(lengths.tolist())) > 2
    np.testing.assert_array_equal(one.group_ids, np.repeat(np.arange(4), 4))
    # inside a caller's jit the groups give way to one program (tracers cannot cross threads)
    jitted = jax.jit(lambda p: sample(p, *PROMPTS, jax.random.key(4), model=model,
                                      cfg=cfg.replace(cpu_row_groups=2)).tokens)(params)
    np.testing.assert_array_equal(jitted, one.tokens)


def test_a_rows_sample_does_not_depend_on_the_rows_after_it(tiny):
    """Each row draws with its own key (fold_in(key, row)): the first two prompts sampled alone
    give the rows they give among all four."""
    model, params = tiny
    cfg = SampleConfig(max_new_tokens=12, temperature=1.0, n=2, eos_id=-1, cpu_row_groups=1)
    four = sample(params, *PROMPTS, jax.random.key(7), model=model, cfg=cfg)
    two = sample(params, PROMPTS[0][:2], PROMPTS[1][:2], jax.random.key(7), model=model, cfg=cfg)
    assert two.prompt_length == four.prompt_length
    for field in ROLLOUT_FIELDS:
        np.testing.assert_array_equal(getattr(two, field), np.asarray(getattr(four, field))[:4], err_msg=field)
    assert not (np.asarray(four.tokens[0::2]) == np.asarray(four.tokens[1::2])).all()  # n samples differ


def test_row_groups_rule(tiny):
    """Auto: one group per core, at most ROW_GROUP_WEIGHT_BYTES of weights read per step over all
    groups, at least MIN_ROWS_PER_GROUP rows each, a divisor of the rows; k: the largest divisor <= k."""
    model, params = tiny
    auto = SampleConfig()
    assert MIN_ROWS_PER_GROUP == 8
    assert row_groups(128, params, model, auto, cores=2) == 2
    assert row_groups(128, params, model, auto, cores=8) == 8
    assert row_groups(24, params, model, auto, cores=4) == 3  # 24 // 8
    assert row_groups(20, params, model, auto, cores=4) == 2  # 20 // 8 = 2, a divisor
    assert row_groups(15, params, model, auto, cores=2) == 1  # 7 rows a group would be too few
    assert row_groups(9, params, model, auto, cores=2) == 1
    assert row_groups(13, params, model, auto.replace(cpu_row_groups=4)) == 1  # a prime
    assert row_groups(4, params, model, auto, cores=2, per_row=4) == 2  # value search: 4 prompts x 4 candidates
    assert row_groups(4, params, model, auto, cores=2, per_row=3) == 1  # 12 candidate rows: too few for two
    assert row_groups(16, params, model, auto.replace(cpu_row_groups=3)) == 2
    assert row_groups(4, params, model, auto.replace(cpu_row_groups=8)) == 4
    # weights: float32 parameters of 40 MiB allow two groups, of 50 MiB one (96 MiB in all)
    big = {"w": jax.ShapeDtypeStruct((40 * 2**20 // 4,), np.float32)}
    assert ROW_GROUP_WEIGHT_BYTES == 96 * 2**20
    assert row_groups(128, big, model, auto, cores=8) == 2
    assert row_groups(128, {"w": jax.ShapeDtypeStruct((50 * 2**20 // 4,), np.float32)}, model, auto, cores=8) == 1
    bf16 = Model(model.config.replace(dtype="bfloat16"))  # bf16 compute: the weights are read as bf16
    assert row_groups(128, big, bf16, auto, cores=8) == 4
    traced = jax.jit(lambda p: jnp.int32(row_groups(128, p, model, auto, cores=8)))(params)
    assert int(traced) == 1  # params traced by a caller's jit: one program, one thread
    meshed = Model(model.config, mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
    assert row_groups(128, params, meshed, auto, cores=8) == 1  # a mesh: the devices split the rows
    with pytest.raises(ValueError, match="SampleConfig.cpu_row_groups: must be >= 0"):
        SampleConfig(cpu_row_groups=-1)
    with pytest.raises(ValueError, match=r"BeamConfig.cpu_row_groups: must be >= 0 \(0 = auto, 1 = off\), got -2"):
        BeamConfig(cpu_row_groups=-2)


def test_unstacked_layers_give_the_same_forward(tiny):
    model, params = tiny
    loop = Model(model.config.replace(scan_layers=False))
    un = loop.unstack_layers(params)
    assert isinstance(un["layers"], tuple) and len(un["layers"]) == model.config.n_layers
    assert loop.unstack_layers(un) is un
    tokens, mask = PROMPTS
    np.testing.assert_allclose(loop(un, tokens, mask), loop(params, tokens, mask), atol=1e-6)
    with pytest.raises(ValueError, match="unstacked layer parameters"):
        Model(model.config.replace(scan_layers=True))(un, tokens, mask)


def test_new_prompts_in_the_same_bucket_do_not_recompile(tiny):
    model, params = tiny
    cfg = SampleConfig(max_new_tokens=5, temperature=1.0, min_prompt_bucket=16)
    before = _generate._cache_size()
    for n, seed in [(3, 0), (7, 1), (12, 2), (16, 3)]:
        sample(params, *left_padded([n, 2], n, 64, seed=seed), jax.random.key(seed), model=model, cfg=cfg)
    assert _generate._cache_size() - before == 1


def test_right_padded_prompts_are_realigned(tiny):
    model, params = tiny
    left_t, left_m = PROMPTS
    right_t, right_m = np.zeros_like(left_t), np.zeros_like(left_m)
    for i in range(4):
        n = left_m[i].sum()
        right_t[i, :n], right_m[i, :n] = left_t[i, -n:], 1
    cfg = SampleConfig(max_new_tokens=12, temperature=1.0, n=2)  # test_same_key_...'s config: no new compile
    a = sample(params, left_t, left_m, jax.random.key(4), model=model, cfg=cfg)
    b = sample(params, right_t, right_m, jax.random.key(4), model=model, cfg=cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_bad_prompts_raise(tiny):
    model, params = tiny
    cfg = SampleConfig(max_new_tokens=8)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        sample(params, np.ones((1, 510), np.int32), None, key, model=model, cfg=cfg)
    with pytest.raises(ValueError, match=r"max_new_tokens=512 leaves no room for a prompt in the KV cache "
                                         r"\(config.max_seq_len=512\)"):
        sample(params, np.ones((1, 1), np.int32), None, key, model=model, cfg=SampleConfig(max_new_tokens=512))
    with pytest.raises(ValueError, match="prompt row 1 is empty"):
        sample(params, np.ones((2, 3), np.int32), np.array([[1, 1, 1], [0, 0, 0]]), key, model=model, cfg=cfg)
    with pytest.raises(ValueError, match="empty"):
        sample(params, np.ones((2, 0), np.int32), None, key, model=model, cfg=cfg)
    with pytest.raises(ValueError, match=r"prompt_tokens\[0, 1\] = 99 is outside the vocabulary \[0, 64\)"):
        sample(params, np.array([[1, 99, 3]]), None, key, model=model, cfg=cfg)
    with pytest.raises(ValueError, match="prompt_mask shape"):
        sample(params, np.ones((2, 3), np.int32), np.ones((2, 4), np.int32), key, model=model, cfg=cfg)
    with pytest.raises(ValueError, match="top_p"):
        SampleConfig(top_p=0.0)
    with pytest.raises(ValueError, match=r"SampleConfig.min_p: must be in \[0, 1\] \(0 = off\), got 1.5"):
        SampleConfig(min_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SampleConfig(temperature=-1.0)
    # fields read from a JSON / YAML file or flags: the type is checked, naming the field
    for cls, field, value, why in ((SampleConfig, "temperature", float("nan"), "must be a number, got nan"),
                                   (SampleConfig, "n", 2.0, "must be an int, got 2.0"),
                                   (SampleConfig, "top_k", 2.5, "must be an int, got 2.5"),
                                   (SampleConfig, "max_new_tokens", "8", "must be an int, got '8'"),
                                   (SampleConfig, "greedy", "false", "must be True or False, got 'false'"),
                                   (SampleConfig, "top_p", None, "must be a number, got None"),
                                   (BeamConfig, "length_penalty", float("nan"), "must be a number, got nan"),
                                   (BeamConfig, "num_beams", True, "must be an int, got True"),
                                   (BeamConfig, "early_stopping", 1, "must be True or False, got 1")):
        with pytest.raises(ValueError, match=f"^{cls.__name__}.{field}: {why}$"):
            cls(**{field: value})
    assert SampleConfig(n=np.int64(2), temperature=1, greedy=np.bool_(False)).n == 2  # numpy scalars and ints are fine


# ------------------------------------------------------------------ beam search

def _all_hypotheses(V, N, eos):
    """Every completion beam search can return: eos-terminated ones shorter than N, and all of length N."""
    for L in range(1, N + 1):
        for seq in itertools.product(range(V), repeat=L):
            if eos in seq[:-1] or (L < N and seq[-1] != eos):
                continue
            yield seq


def test_wide_beam_search_is_exact_search():
    """With a beam wide enough to keep every prefix, beam search equals brute force."""
    V, N, alpha = 4, 3, 0.8
    model = Model(preset("tiny", vocab_size=V, n_layers=2))  # two layers: the search is what is tested
    params = model.init(jax.random.key(5))
    # sharpen the random model so the ranking is not a near-tie
    params["lm_head"] = params["lm_head"] * 60.0
    prompt = np.array([[1, 3, 3, 1]], np.int32)
    cfg = BeamConfig(num_beams=18, max_new_tokens=N, length_penalty=alpha, eos_id=2, min_prompt_bucket=4)
    res = beam_search(params, prompt, None, model=model, cfg=cfg)

    hyps = list(_all_hypotheses(V, N, cfg.eos_id))
    seqs = np.array([np.r_[prompt[0], h, [0] * (N - len(h))] for h in hyps], np.int32)
    masks = np.array([np.r_[np.ones(4), np.ones(len(h)), np.zeros(N - len(h))] for h in hyps], np.int32)
    lp = np.asarray(_token_logprobs(params, seqs, masks, model=model))[:, 3:].sum(1)  # completion tokens only
    lens = np.array([len(h) for h in hyps])
    scores = lp / lens**alpha
    order = np.argsort(-scores)
    np.testing.assert_allclose(res.scores[0], scores[order[:18]], rtol=1e-4)
    best = hyps[order[0]]
    np.testing.assert_array_equal(res.tokens[0, 0, 4:4 + len(best)], best)
    assert int(res.lengths[0, 0]) == len(best)


def test_beam_scores_match_rescoring_and_one_beam_is_greedy(tiny):
    model, params = tiny
    greedy = sample(params, *PROMPTS, jax.random.key(0), model=model, cfg=GREEDY)
    used = set(np.asarray(greedy.completions).ravel().tolist())
    eos = next(t for t in range(3, 64) if t not in used)  # an eos greedy never emits
    one = beam_search(params, *PROMPTS, model=model,
                      cfg=BeamConfig(num_beams=1, max_new_tokens=GREEDY.max_new_tokens, eos_id=eos))
    np.testing.assert_array_equal(one.tokens[:, 0], greedy.tokens)

    res = beam_search(params, *PROMPTS, model=model,
                      cfg=BeamConfig(num_beams=4, max_new_tokens=8, length_penalty=1.0, eos_id=5))
    B, K, T = res.tokens.shape
    lp = _token_logprobs(params, res.tokens.reshape(B * K, T), res.attention_mask.reshape(B * K, T), model=model)
    gen = np.asarray(res.attention_mask.reshape(B * K, T))[:, 1:].copy()
    gen[:, :res.prompt_length - 1] = 0
    sums = (np.asarray(lp) * gen).sum(1).reshape(B, K)
    np.testing.assert_allclose(res.logprob_sums, sums, atol=1e-4)
    np.testing.assert_allclose(res.scores, sums / np.asarray(res.lengths), atol=1e-4)
    assert (np.diff(np.asarray(res.scores), axis=1) <= 1e-6).all()  # best first
    # the prompts searched as 1, 2 and 4 groups on host threads (`cpu_row_groups`): the same hypotheses,
    # their scores equal up to rounding (each group size is its own compiled program: 1 ulp seen)
    emitted = np.asarray(greedy.completions)[:, :4].ravel().tolist()
    cfg = BeamConfig(num_beams=4, max_new_tokens=8, length_penalty=1.0,  # an eos greedy emits early: early stops
                     eos_id=max(set(emitted), key=emitted.count))
    assert [row_groups(4, params, model, dataclasses.replace(cfg, cpu_row_groups=g), per_row=4) for g in (1, 2, 4)] \
        == [1, 2, 4]
    one, *grouped = (beam_search(params, *PROMPTS, model=model, cfg=dataclasses.replace(cfg, cpu_row_groups=g))
                     for g in (1, 2, 4))
    for other in grouped:
        for field in ("tokens", "attention_mask", "lengths"):
            np.testing.assert_array_equal(getattr(one, field), getattr(other, field), err_msg=field)
        for field in ("scores", "logprob_sums"):
            np.testing.assert_allclose(getattr(one, field), getattr(other, field), rtol=1e-6, err_msg=field)
    assert len(set(np.asarray(one.lengths).ravel().tolist())) > 2  # hypotheses end at different steps
